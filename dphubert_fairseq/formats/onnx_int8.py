"""int8 deployment: an ONNX export (``onnx_export``) dynamically quantised, checked against the torch fp32
model before it is written.

``quantize_int8`` runs ``onnxruntime.quantization.quantize_dynamic`` on the fp32 file: the weights of the
operators in ``QUANTIZED_OPS`` (the linear layers) become int8 (symmetric, per output channel), their inputs
are quantised at run time from each batch's own range. Then the CNN's convolutions after the first become int8
matrix products whose inputs are quantised per group of frames (``onnx_int8_conv``: onnxruntime's own
quantisation leaves them float32, and they are most of a pruned student's time). The norms, softmax, the
first conv layer and the positional convolution stay float32; the file's inputs and outputs are the fp32
file's. Then it runs the int8 file with onnxruntime on the check batch and compares every hidden state with
the torch model's: the cosine similarity of the whole tensor and the largest absolute deviation. The file is
written (atomically) only when every hidden state's cosine is at least ``min_cosine`` (default
``MIN_COSINE``). When the file with an int8 CNN falls below the floor and the one with a float32 CNN does not,
the latter is written and the report says so (``cnn_int8`` false, ``cnn_int8_cosine``); when both fall below,
a one-line ``DPHuBERTError`` names the file, the hidden state and its cosine.
"""

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic_files import atomic_write
from ..errors import DPHuBERTError
from ..models.dphubert import DPHuBERTModel
from .onnx_export import cpu_session, require_onnx
from .onnx_int8_conv import quantize_convs

#: the floor of every hidden state's cosine similarity to torch fp32 below which no int8 file is written
MIN_COSINE = 0.99
#: the operators whose weights are quantised: the linear layers (q, k, v, out, FFN, feature projection)
QUANTIZED_OPS = ("MatMul", "Gemm")
#: the file's ``quantization`` metadata, by whether the CNN is int8
QUANTIZATION = {
    False: f"int8 dynamic (onnxruntime), weights of {', '.join(QUANTIZED_OPS)}",
    True: f"int8 dynamic (onnxruntime), weights of {', '.join(QUANTIZED_OPS)}; CNN convolutions after the first "
    "as int8 matrix products, inputs scaled per group of stride frames",
}


@dataclass
class Int8Report:
    """What ``quantize_int8`` wrote and how closely it follows the torch fp32 model, per hidden state."""

    path: str
    checked_on: str
    min_cosine: float
    worst_output: str
    max_abs_diff: float
    floor: float
    cnn_int8: bool  # the CNN's convolutions (after the first) are int8 matrix products
    cnn_int8_cosine: Optional[float]  # the lowest cosine with an int8 CNN, when that fell below the floor
    outputs: Dict[str, Dict[str, float]] = field(default_factory=dict)  # name -> {cosine, max_abs_diff}

    def summary(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "checked_on": self.checked_on,
            "min_cosine": self.min_cosine,
            "worst_output": self.worst_output,
            "max_abs_diff": self.max_abs_diff,
            "floor": self.floor,
            "cnn_int8": self.cnn_int8,
            "cnn_int8_cosine": self.cnn_int8_cosine,
            "outputs": self.outputs,
        }


def int8_summary_line(summary: Dict[str, Any]) -> str:
    """The one line ``dphubert-export`` prints for an ``Int8Report.summary()``."""
    if summary["cnn_int8"]:
        cnn = "linear layers and CNN int8"
    elif summary["cnn_int8_cosine"] is None:
        cnn = "linear layers int8, the CNN float32"
    else:
        cnn = (
            f"linear layers int8, the CNN float32 (with it int8 the lowest cosine was "
            f"{summary['cnn_int8_cosine']:.4f})"
        )
    return (
        f"onnx int8: {summary['path']} checked with onnxruntime on {summary['checked_on']}: lowest cosine to "
        f"torch fp32 {summary['min_cosine']:.6f} ({summary['worst_output']}, floor {summary['floor']}), max abs "
        f"diff {summary['max_abs_diff']:.3g}; {cnn}"
    )


def int8_path(onnx_path: str) -> str:
    """Where the int8 file of ``onnx_path`` goes: ``OUT.onnx`` -> ``OUT.int8.onnx``."""
    stem, ext = os.path.splitext(onnx_path)
    return f"{stem}.int8{ext or '.onnx'}"


def empty_weight_nodes(proto) -> List[str]:
    """The ``QUANTIZED_OPS`` nodes of an ONNX model whose weight has no element (a block with 0 heads or 0
    FFN units: onnxruntime's quantiser cannot take an empty tensor's range)."""
    empty = {t.name for t in proto.graph.initializer if any(d == 0 for d in t.dims)}
    return [
        node.name for node in proto.graph.node if node.op_type in QUANTIZED_OPS and empty & set(node.input)
    ]


def agreement(
    session, model: DPHuBERTModel, source: torch.Tensor, padding_mask: torch.Tensor
) -> Dict[str, Dict[str, float]]:
    """Per output of an onnxruntime session of an export: its cosine similarity to ``model.hidden_states``
    (the whole ``(B, T, D)`` tensor as one vector) and the largest absolute deviation; cosine -inf where a
    shape differs or a value is not finite."""
    outputs = session.run(None, {"source": source.numpy(), "padding_mask": padding_mask.numpy()})
    with torch.no_grad():
        expected = model.hidden_states(source, padding_mask)
    out = {}
    for meta, got, want in zip(session.get_outputs(), outputs, expected):
        want = want.numpy().astype(np.float64)
        got = got.astype(np.float64)
        if got.shape != want.shape or not np.isfinite(got).all():
            out[meta.name] = {"cosine": -math.inf, "max_abs_diff": math.inf}
            continue
        norms = np.linalg.norm(got) * np.linalg.norm(want)
        cosine = float((got * want).sum() / norms) if norms > 0 else float(np.array_equal(got, want))
        out[meta.name] = {"cosine": cosine, "max_abs_diff": float(np.abs(got - want).max())}
    return out


def _checked(
    onnxruntime, proto, model, source, padding_mask, path
) -> Tuple[bytes, Dict[str, Dict[str, float]]]:
    data = proto.SerializeToString()
    try:
        return data, agreement(cpu_session(onnxruntime, data), model, source, padding_mask)
    except Exception as err:
        raise DPHuBERTError(
            f"{path}: onnxruntime cannot run the int8 file: {str(err).splitlines()[0]}"
        ) from err


def _lowest(outputs: Dict[str, Dict[str, float]]) -> Tuple[str, float]:
    worst = min(outputs, key=lambda name: outputs[name]["cosine"])
    return worst, outputs[worst]["cosine"]


def quantize_int8(
    fp32_path: str,
    path: str,
    model: DPHuBERTModel,
    check: Tuple[torch.Tensor, torch.Tensor, str],
    min_cosine: float = MIN_COSINE,
    cnn: bool = True,
) -> Int8Report:
    """Quantise the ONNX export ``fp32_path`` of ``model`` (pruned, CPU, float32, eval) to ``path`` once every
    hidden state of the int8 file on ``check`` ``(source, padding_mask, description)`` has a cosine of at least
    ``min_cosine`` to the torch model's; ``path`` is left as it was otherwise. ``cnn``: also the CNN's
    convolutions (``onnx_int8_conv``), falling back to a float32 CNN when that alone meets the floor."""
    onnx, onnxruntime = require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic  # with onnxruntime, the optional extra

    source, padding_mask, described = check
    with tempfile.TemporaryDirectory() as tmp:
        quantised = os.path.join(tmp, "int8.onnx")
        quantize_dynamic(
            fp32_path,
            quantised,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=empty_weight_nodes(onnx.load(fp32_path)),
        )
        linear = onnx.load(quantised)
    candidates = []  # (proto, CNN int8), the faster first
    if cnn:
        with_cnn = copy.deepcopy(linear)
        if quantize_convs(onnx, with_cnn):
            candidates.append((with_cnn, True))
    candidates.append((linear, False))
    cnn_cosine = None
    for proto, cnn_int8 in candidates:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "quantization", QUANTIZATION[cnn_int8]
        data, outputs = _checked(onnxruntime, proto, model, source, padding_mask, path)
        worst, lowest = _lowest(outputs)
        if lowest >= min_cosine:
            break
        if cnn_int8:
            cnn_cosine = lowest
    else:
        raise DPHuBERTError(
            f"{path}: the int8 file does not follow the model closely enough: cosine {lowest:.4f} to torch fp32 "
            f"in {worst} on {described}, below the floor {min_cosine}; the file was not written"
        )
    atomic_write(path, lambda f: f.write(data))
    return Int8Report(
        path=str(path),
        checked_on=described,
        min_cosine=lowest,
        worst_output=worst,
        max_abs_diff=max(o["max_abs_diff"] for o in outputs.values()),
        floor=min_cosine,
        cnn_int8=cnn_int8,
        cnn_int8_cosine=cnn_cosine,
        outputs=outputs,
    )
