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
``MIN_COSINE``). When the file with an int8 CNN falls below the floor, or onnxruntime cannot run it, and the
one with a float32 CNN meets the floor, the latter is written and the report says why (``cnn_int8`` false,
``cnn_int8_cosine`` or ``cnn_int8_error``); when both fall below, a one-line ``DPHuBERTError`` names the file,
the hidden state and its cosine. ``checked_int8`` does all that but the write (``dphubert-export`` checks every
file before it writes any). onnxruntime's quantiser works on a copy of the fp32 file in a temporary folder
beside the destination, removed afterwards.
"""

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..atomic_files import atomic_copy, atomic_write, work_folder_beside
from ..errors import DPHuBERTError
from ..models.dphubert import DPHuBERTModel
from .onnx_export import cpu_session, first_line, require_onnx
from .onnx_int8_conv import quantize_convs

logger = logging.getLogger(__name__)

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
    cnn_int8_error: Optional[str] = None  # why there is no int8 CNN to check, or onnxruntime could not run it
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
            "cnn_int8_error": self.cnn_int8_error,
            "outputs": self.outputs,
        }


def int8_summary_line(summary: Dict[str, Any]) -> str:
    """The one line ``dphubert-export`` prints for an ``Int8Report.summary()``."""
    if summary["cnn_int8"]:
        cnn = "linear layers and CNN int8"
    elif summary.get("cnn_int8_error"):  # absent from summaries written before it was reported
        cnn = f"linear layers int8, the CNN float32 (with it int8: {summary['cnn_int8_error']})"
    elif summary["cnn_int8_cosine"] is None:
        cnn = "linear layers int8, the CNN float32"
    else:
        cnn = (
            f"linear layers int8, the CNN float32 (with it int8 the lowest cosine was "
            f"{summary['cnn_int8_cosine']:.6f})"
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
        raise DPHuBERTError(f"{path}: onnxruntime cannot run the int8 file: {first_line(err)}") from err


def _lowest(outputs: Dict[str, Dict[str, float]]) -> Tuple[str, float]:
    worst = min(outputs, key=lambda name: outputs[name]["cosine"])
    return worst, outputs[worst]["cosine"]


def _load_fp32(onnx, fp32: Union[str, bytes]):
    """The fp32 export (a path or the file's bytes) as a ``ModelProto``, or a one-line error naming the file."""
    try:
        return onnx.load_from_string(fp32) if isinstance(fp32, bytes) else onnx.load(os.fspath(fp32))
    except OSError as err:
        raise DPHuBERTError(
            f"{fp32}: cannot read the ONNX file to quantise ({err.strerror or err})"
        ) from None
    except Exception as err:  # protobuf's DecodeError and kin for what is not an ONNX file
        what = "the ONNX export to quantise" if isinstance(fp32, bytes) else fp32
        raise DPHuBERTError(f"{what}: not a readable ONNX file ({first_line(err)})") from None


def _linear_int8(onnx, fp32: Union[str, bytes], path: str):
    """The fp32 export with its ``QUANTIZED_OPS`` int8 (onnxruntime's ``quantize_dynamic``), as a
    ``ModelProto``. The quantiser reads a copy in a work folder beside ``path`` (it writes its shape-inferred
    copy next to its input) and writes its output there."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # with onnxruntime, the optional extra

    excluded = empty_weight_nodes(_load_fp32(onnx, fp32))
    named = "the fp32 export" if isinstance(fp32, bytes) else fp32
    try:
        with work_folder_beside(path) as work:
            source, quantised = os.path.join(work, "fp32.onnx"), os.path.join(work, "int8.onnx")
            if isinstance(fp32, bytes):
                atomic_write(source, lambda f: f.write(fp32))
            else:
                atomic_copy(os.fspath(fp32), source)  # a hard link where the file system has them
            try:
                quantize_dynamic(
                    source,
                    quantised,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                )
                return onnx.load(quantised)
            except OSError:
                raise
            except Exception as err:
                raise DPHuBERTError(
                    f"{path}: onnxruntime cannot quantise {named}: {first_line(err)}"
                ) from err
    except OSError as err:
        folder = os.path.dirname(os.path.abspath(path))
        raise DPHuBERTError(
            f"{path}: cannot quantise {named} in a work folder in {folder} ({err.strerror or err})"
        ) from err


def checked_int8(
    fp32: Union[str, bytes],
    path: str,
    model: DPHuBERTModel,
    check: Tuple[torch.Tensor, torch.Tensor, str],
    min_cosine: Optional[float] = None,
    cnn: bool = True,
) -> Tuple[bytes, Int8Report]:
    """``quantize_int8`` but for the write: the int8 file's bytes and its report, once it meets the floor.
    ``fp32``: the fp32 file's path or its bytes. ``path`` (where the file is to go) names the file in errors
    and holds the quantiser's work folder while it runs."""
    onnx, onnxruntime = require_onnx()
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    source, padding_mask, described = check
    linear = _linear_int8(onnx, fp32, path)
    candidates = []  # (proto, CNN int8), the faster first
    cnn_error = None
    if cnn:
        with_cnn = copy.deepcopy(linear)
        try:
            if quantize_convs(onnx, with_cnn):
                candidates.append((with_cnn, True))
        except Exception as err:
            cnn_error = f"its convolutions could not be rewritten: {first_line(err)}"
    candidates.append((linear, False))
    cnn_cosine = None
    for proto, cnn_int8 in candidates:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "quantization", QUANTIZATION[cnn_int8]
        try:
            data, outputs = _checked(onnxruntime, proto, model, source, padding_mask, path)
        except DPHuBERTError as err:
            if not cnn_int8:
                raise
            cnn_error = f"onnxruntime cannot run it: {first_line(err.__cause__ or err)}"
            continue
        worst, lowest = _lowest(outputs)
        if lowest >= min_cosine:
            break
        if cnn_int8:
            cnn_cosine = lowest
    else:
        raise DPHuBERTError(
            f"{path}: the int8 file does not follow the model closely enough: cosine {lowest:.6f} to torch fp32 "
            f"in {worst} on {described}, below the floor {min_cosine}; the file was not written"
        )
    if cnn_error:
        logger.warning("%s: the CNN stays float32; with it int8, %s", path, cnn_error)
    return data, Int8Report(
        path=str(path),
        checked_on=described,
        min_cosine=lowest,
        worst_output=worst,
        max_abs_diff=max(o["max_abs_diff"] for o in outputs.values()),
        floor=min_cosine,
        cnn_int8=cnn_int8,
        cnn_int8_cosine=cnn_cosine,
        cnn_int8_error=cnn_error,
        outputs=outputs,
    )


def quantize_int8(
    fp32_path: str,
    path: str,
    model: DPHuBERTModel,
    check: Tuple[torch.Tensor, torch.Tensor, str],
    min_cosine: Optional[float] = None,
    cnn: bool = True,
) -> Int8Report:
    """Quantise the ONNX export ``fp32_path`` of ``model`` (pruned, CPU, float32, eval) to ``path`` once every
    hidden state of the int8 file on ``check`` ``(source, padding_mask, description)`` has a cosine of at least
    ``min_cosine`` (default ``MIN_COSINE``) to the torch model's; ``path`` is left as it was otherwise.
    ``cnn``: also the CNN's convolutions (``onnx_int8_conv``), falling back to a float32 CNN when that alone
    meets the floor or onnxruntime cannot run the int8 one. Bad input (a missing or unreadable fp32 file, a
    quantiser that fails) raises a one-line ``DPHuBERTError`` naming the file."""
    data, report = checked_int8(fp32_path, path, model, check, min_cosine=min_cosine, cnn=cnn)
    atomic_write(path, lambda f: f.write(data))
    return report
