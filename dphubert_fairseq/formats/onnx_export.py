"""A pruned ``dphubert`` model as an ONNX file, checked against the torch model with onnxruntime on export.

The file's graph (opset ``OPSET``) computes ``model.hidden_states(source, padding_mask)``:

- inputs ``source`` ``(batch, samples)`` float32 (normalised when the model's ``normalize`` is set, as its
  task does; the file's metadata says so) and ``padding_mask`` ``(batch, samples)`` bool, True = padding;
- outputs ``hidden_state_0`` ... ``hidden_state_L`` ``(batch, frames, D)``: the feature projection's output
  and the output of each transformer layer, as ``hidden_states`` returns them;
- batch and length are dynamic.

``export_onnx`` traces ``model.hidden_states`` (``TraceableHiddenStates``) with torch's TorchScript-based
exporter (``torch.onnx.export(dynamo=False)``) on a padded batch. The model's frame padding and cropping slice
unconditionally (a branch on a value would be frozen at the traced length; HuBERT's rule once sliced off
``samples % frames`` samples only when there were some), and wav2vec2's rule, traced on padding, records its
mask computation.
Then it runs the file with onnxruntime (CPU) on a padded batch of clips of unequal lengths (by default
``probe_batch``: lengths other than those traced, the longer one cut so that HuBERT's rule takes its other
branch) and compares every output with the torch model's; the file is written (atomically, see
``atomic_files``) only when the largest deviation is within ``atol``, else a one-line ``DPHuBERTError`` names
the file, the deviation and the output. ``checked_onnx`` does all that but the write.

``onnx`` and ``onnxruntime`` are imported when an export runs (the ``onnx`` extra of setup.py), so that the
plugin imports without them.
"""

import copy
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic_files import atomic_write
from ..conv_spec import parse_conv_layers
from ..errors import ConfigError, DPHuBERTError
from ..models.dphubert import DPHuBERTModel, pad_waveforms

#: the ONNX opset the files are written with (17: LayerNormalization is one operator)
OPSET = 17
INPUT_NAMES = ("source", "padding_mask")
#: tolerance of the export's check: max abs difference of any hidden state, onnxruntime against torch
ATOL = 1e-4
#: seconds of the built-in check probe's clips and of the (different) clips the export traces
PROBE_SECONDS = (1.6, 1.05)
TRACE_SECONDS = (1.0, 0.75)


def output_names(model: DPHuBERTModel) -> List[str]:
    return [f"hidden_state_{i}" for i in range(model.cfg.encoder_layers + 1)]


def require_onnx():
    """``(onnx, onnxruntime)``, or a one-line ``ConfigError`` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(
            f"ONNX export needs the onnx and onnxruntime packages ({err}); install them with "
            "pip install 'dphubert-fairseq[onnx]'"
        ) from None
    return onnx, onnxruntime


# ----- the traced forward -----


class TraceableHiddenStates(nn.Module):
    """``(source, padding_mask) -> (h_0, ..., h_L)``: ``model.hidden_states`` as a tuple, the form the exporter
    takes. Traced on a padded batch, which makes wav2vec2's frame padding rule record its mask computation
    (with nothing padded it gives an all-False mask where the model passes none: the same hidden states)."""

    def __init__(self, model: DPHuBERTModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.hidden_states(source, padding_mask))


# ----- check batches -----


def num_frames(model: DPHuBERTModel, samples: int) -> int:
    """Frames the CNN makes of ``samples`` samples."""
    for _, kernel, stride in parse_conv_layers(model.cfg.conv_feature_layers):
        samples = (samples - kernel) // stride + 1
    return samples


def model_input(model: DPHuBERTModel, wave: torch.Tensor) -> torch.Tensor:
    """A waveform as the model's task feeds it: layer-normalised when the model expects normalised input."""
    wave = wave.float()
    return F.layer_norm(wave, wave.shape) if model.cfg.normalize else wave


def speech_like(samples: int, seed: int, rate: int = 16000) -> torch.Tensor:
    """Seeded speech-like audio: a gliding harmonic voice under a syllable-rate envelope, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    f0 = 110 + 50 * np.sin(2 * math.pi * rng.uniform(0.3, 1.0) * t)
    phase = 2 * math.pi * np.cumsum(f0) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 9))
    wave *= 0.2 + np.sin(2 * math.pi * rng.uniform(2.0, 5.0) * t) ** 2
    wave += 0.05 * rng.standard_normal(samples)
    return torch.from_numpy((0.3 * wave / np.abs(wave).max()).astype(np.float32))


def _samples(model: DPHuBERTModel, seconds: float, whole_frames: bool = False) -> int:
    """``seconds`` in samples; with ``whole_frames`` the nearest length from there on that is a whole number
    of samples per frame (HuBERT's rule then leaves no sample out: the other branch of its model code)."""
    samples = int(seconds * model.cfg.sample_rate)
    if whole_frames:
        for candidate in range(samples, samples + model.cfg.sample_rate):
            if candidate % num_frames(model, candidate) == 0:
                return candidate
    return samples


def probe_batch(
    model: DPHuBERTModel, seconds: Sequence[float] = PROBE_SECONDS, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(source, padding_mask, description)``: the built-in check batch, seeded speech-like clips of
    ``seconds``, padded together. The longest is a whole number of samples per frame where one exists."""
    lengths = [_samples(model, s, whole_frames=(i == 0)) for i, s in enumerate(seconds)]
    rate = model.cfg.sample_rate
    clips = [model_input(model, speech_like(n, seed + i, rate)) for i, n in enumerate(lengths)]
    source, mask = pad_waveforms(clips)
    described = ", ".join(f"{n / rate:.2f} s" for n in lengths)
    return source, mask, f"a built-in speech-like probe ({described}, padded)"


def audio_batch(model: DPHuBERTModel, paths: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(source, padding_mask, description)`` from audio files (mono or averaged over channels, at the
    model's sample rate, normalised when the model expects it), padded together. One file is paired with
    its own first 60 % so that the batch has padding."""
    rate = model.cfg.sample_rate
    clips, names = [], []
    for path in paths:
        try:
            wave, file_rate = sf.read(path, dtype="float32", always_2d=True)
        except Exception as err:  # soundfile raises its own error types for unreadable files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"audio file {path}: cannot read it ({reason})") from None
        if file_rate != rate:
            raise ConfigError(
                f"audio file {path}: sampled at {file_rate} Hz but the model expects {rate} Hz; resample it"
            )
        if num_frames(model, len(wave) * 3 // 5 if len(paths) == 1 else len(wave)) < 1:
            raise ConfigError(f"audio file {path}: {len(wave)} samples are too short for the model's CNN")
        if not np.isfinite(wave).all():
            raise ConfigError(f"audio file {path}: holds non-finite samples (NaN or inf)")
        clips.append(torch.from_numpy(wave.mean(axis=1)))
        names.append(os.path.basename(path))
    if len(clips) == 1:
        clips.append(clips[0][: len(clips[0]) * 3 // 5].clone())
        described = f"{names[0]} ({len(clips[0]) / rate:.2f} s) and its first {len(clips[1]) / rate:.2f} s"
    else:
        lengths = ", ".join(f"{len(c) / rate:.2f} s" for c in clips)
        described = f"{len(clips)} audio files ({lengths})"
    source, mask = pad_waveforms([model_input(model, c) for c in clips])
    return source, mask, f"{described}, padded"


# ----- export and check -----


@dataclass
class OnnxExportReport:
    """What ``export_onnx`` wrote and how closely onnxruntime reproduced the torch model."""

    path: str
    checked_on: str
    max_abs_diff: float
    worst_output: str
    opset: int
    atol: float

    def summary(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "checked_on": self.checked_on,
            "max_abs_diff": self.max_abs_diff,
            "opset": self.opset,
        }

    def line(self) -> str:
        return summary_line(self.summary())


def summary_line(summary: Dict[str, Any]) -> str:
    """The one line ``dphubert-export`` prints for an ``OnnxExportReport.summary()``."""
    return (
        f"onnx: {summary['path']} checked with onnxruntime on {summary['checked_on']}: "
        f"max abs diff {summary['max_abs_diff']:.2e}"
    )


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (the class name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _trace(model: DPHuBERTModel, opset: int) -> bytes:
    """The ONNX file's bytes (the model is on the CPU in float32 and in eval mode)."""
    names = output_names(model)
    lengths = [_samples(model, s) for s in TRACE_SECONDS]
    rate = model.cfg.sample_rate
    source, mask = pad_waveforms(
        [model_input(model, speech_like(n, 100 + i, rate)) for i, n in enumerate(lengths)]
    )
    dynamic = {"source": {0: "batch", 1: "samples"}, "padding_mask": {0: "batch", 1: "samples"}}
    dynamic.update({name: {0: "batch", 1: "frames"} for name in names})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.9 announces that the TorchScript-based exporter is no longer the default, and that a logging
        # helper it calls will go
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # F.group_norm's training-time check of its batch size: value-dependent, nothing the graph computes
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
        torch.onnx.export(
            TraceableHiddenStates(model).eval(),
            (source, mask),
            buffer,
            input_names=list(INPUT_NAMES),
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _with_metadata(onnx, data: bytes, model: DPHuBERTModel) -> bytes:
    """The file with what a user of it needs to know about its input, in its metadata."""
    proto = onnx.load_from_string(data)
    cfg = model.cfg
    for key, value in {
        "producer": "dphubert_fairseq",
        "sample_rate": str(cfg.sample_rate),
        "normalize": str(bool(cfg.normalize)).lower(),
        "frame_padding": str(cfg.frame_padding),
        "hidden_states": f"hidden_state_0 (feature projection) ... hidden_state_{cfg.encoder_layers}",
        "teacher": str(cfg.teacher_identity or ""),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def compare(
    session, model: DPHuBERTModel, source: torch.Tensor, padding_mask: torch.Tensor
) -> Tuple[float, str]:
    """``(max abs difference, name of the output where it is)`` between an onnxruntime session of an export
    and ``model.hidden_states`` on one batch; inf where a shape differs or a value is not finite."""
    outputs = session.run(None, {"source": source.numpy(), "padding_mask": padding_mask.numpy()})
    with torch.no_grad():
        expected = model.hidden_states(source, padding_mask)
    names = [o.name for o in session.get_outputs()]
    worst, where = -1.0, names[0]
    for name, got, want in zip(names, outputs, expected):
        want = want.numpy()
        if got.shape != want.shape:
            return math.inf, name
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        deviation = float(diff.max()) if np.isfinite(diff).all() else math.inf
        if deviation > worst:
            worst, where = deviation, name
    if len(outputs) != len(expected):
        return math.inf, f"{len(outputs)} outputs for {len(expected)} hidden states"
    return worst, where


def cpu_session(onnxruntime, model_bytes_or_path, threads: int = 0, spinning: bool = True):
    """An onnxruntime CPU session; ``threads`` 0 lets onnxruntime choose. ``spinning`` False: the session's
    idle threads sleep instead of spinning (where several sessions take turns on few cores, each one's
    spinning threads would otherwise take the cores from the next)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def checked_onnx(
    model: DPHuBERTModel,
    path: str,
    check_batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    atol: float = ATOL,
    checked_on: Optional[str] = None,
    opset: int = OPSET,
) -> Tuple[bytes, OnnxExportReport]:
    """``export_onnx`` but for the write: the file's bytes and its report, once the check passes. ``path``
    (where the file is to go) names it in the report and in errors."""
    onnx, onnxruntime = require_onnx()
    if not isinstance(model, DPHuBERTModel):
        raise TypeError(f"export_onnx expects a dphubert model, got {type(model).__name__}")
    if model.gates():
        raise ConfigError(
            f"{path}: the model has hard-concrete gates (a training checkpoint); prune it first "
            "(dphubert_fairseq.prune, or dphubert-export, which does)"
        )
    reference = next(model.parameters())
    was_training = model.training
    if reference.device.type != "cpu" or reference.dtype != torch.float32:
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)  # what the file computes in
    model.eval()
    try:
        if check_batch is None:
            source, padding_mask, described = probe_batch(model)
        else:
            source, padding_mask = check_batch
            source, padding_mask = source.detach().float().cpu(), padding_mask.detach().bool().cpu()
            described = f"the given batch ({source.size(0)} x {source.size(1)} samples)"
        described = checked_on or described
        try:
            data = _trace(model, opset)
        except Exception as err:
            raise DPHuBERTError(f"{path}: torch.onnx.export failed: {first_line(err)}") from err
        data = _with_metadata(onnx, data, model)
        try:
            session = cpu_session(onnxruntime, data)
            deviation, where = compare(session, model, source, padding_mask)
        except Exception as err:
            raise DPHuBERTError(f"{path}: onnxruntime cannot run the export: {first_line(err)}") from err
        if not deviation <= atol:
            raise DPHuBERTError(
                f"{path}: the ONNX export does not reproduce the model: max abs diff {deviation:.3g} in "
                f"{where} on {described}, above {atol:g}; the file was not written"
            )
        return data, OnnxExportReport(
            path=str(path),
            checked_on=described,
            max_abs_diff=deviation,
            worst_output=where,
            opset=opset,
            atol=atol,
        )
    finally:
        model.train(was_training)


def export_onnx(model: DPHuBERTModel, path: str, **check: Any) -> OnnxExportReport:
    """Write ``model`` (pruned: no gates) to ``path`` as ONNX (see the module's docstring) once onnxruntime
    reproduces it within ``atol`` on ``check_batch`` ``(source, padding_mask)`` (default: ``probe_batch``);
    ``checked_on`` describes the batch for the report (``check``: ``checked_onnx``'s keywords, ``check_batch``,
    ``atol``, ``checked_on``, ``opset``). Raises a one-line ``DPHuBERTError`` and leaves ``path`` as it was
    when the check fails."""
    data, report = checked_onnx(model, path, **check)
    atomic_write(path, lambda f: f.write(data))
    return report
