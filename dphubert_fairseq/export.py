"""Export a training checkpoint as a pruned fairseq checkpoint, or in the reference implementation's format.

    python -m dphubert_fairseq.export STAGE_CHECKPOINT OUT.pt [--json SUMMARY.json] [--round-heads N] [--round-ffn N]
    dphubert-export STAGE_CHECKPOINT OUT.pt [--json SUMMARY.json] [--round-heads N] [--round-ffn N]
    dphubert-export STAGE_CHECKPOINT OUT.pth --format reference [--reference-layout exact|compact] [...]
    dphubert-export STAGE_CHECKPOINT OUT.pt --onnx OUT.onnx [--int8] [--onnx-audio WAV ...] [...]

Reads a checkpoint written by fairseq's trainer for the ``dphubert_distill`` task (stage 1 or 2), folds the
eval-mode gates into the weights (``prune``), writes the result with ``save_model`` (the distillation
projections go along in ``extra_state`` for stage 2), prints a summary and optionally writes it as JSON.

``--format reference`` writes OUT, instead of the fairseq checkpoint, as the paper's reference
implementation (the authors' torchaudio code) releases its models: ``{"state_dict", "config"}`` for its ``wav2vec2_model`` builder
(``formats/reference/writing.py``). It holds the model only (no distillation projections: a fairseq export
is what stage 2 continues from), and the summary says whether it reproduces the model exactly, with the max
abs hidden-state deviation measured on a probe input.

``--onnx`` also writes the pruned model as ONNX (``formats/onnx_export.py``: every hidden state an output,
dynamic batch and length), once onnxruntime reproduces it within 1e-4 on a padded batch of the
``--onnx-audio`` files (else a built-in speech-like probe); the summary gets the file and the deviation.
``--int8`` (with ``--onnx``) also writes ``OUT.int8.onnx``, the ONNX file dynamically quantised
(``formats/onnx_int8.py``), once every hidden state on the same batch is within the cosine floor of torch fp32.
Both files are made and checked before anything is written: when a check fails, one line says why and OUT, the
ONNX file and the int8 file are all left as they were.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .atomic_files import atomic_write, atomic_write_text
from .checkpoint_io import save_model
from .checkpoint_kind import read_student_checkpoint
from .conv_spec import parse_conv_layers
from .criterions.target_projection import missed_target
from .errors import ConfigError
from .formats.onnx_export import audio_batch, checked_onnx, probe_batch, require_onnx, summary_line
from .formats.onnx_int8 import MIN_COSINE, checked_int8, int8_path, int8_summary_line
from .formats.reference import LAYOUTS, ReferenceExportReport, reference_from_model, save_reference
from .latency import load_table
from .macs import NOMINAL_SECONDS
from .models.dphubert import DPHuBERTModel, as_config
from .pruning import prune

logger = logging.getLogger("dphubert_fairseq.export")


def model_from_training_checkpoint(path: str):
    """(model, state) from a checkpoint of a ``dphubert`` training run; no teacher or data needed."""
    state = read_student_checkpoint(path, expected="a dphubert training checkpoint")
    model = DPHuBERTModel(as_config(state["cfg"]["model"]))
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state


#: the summary key of the sparsity each criterion.target_metric is checked against
REACHED_KEY = {"params": "sparsity", "macs": "macs_sparsity", "latency": "latency_sparsity"}


def latency_summary(model: DPHuBERTModel, table_path: str) -> Dict[str, Any]:
    """The model's predicted seconds under the stage-1 run's latency table (``criterion.latency_table``), when
    that file can still be read; otherwise only the path (and nothing to check the target against)."""
    summary: Dict[str, Any] = {"latency_table": table_path}
    try:
        table = load_table(table_path)
        table.check_shape(model.cfg, f"criterion.latency_table={table_path}", pruned=True)
    except ConfigError as err:
        logger.warning("no predicted seconds in the summary: %s", err)
        return summary
    seconds, teacher = model.size(table), table.teacher_seconds()
    summary.update(
        latency_seconds=seconds, teacher_latency_seconds=teacher, latency_sparsity=1 - seconds / teacher
    )
    return summary


def summarize(model: DPHuBERTModel) -> Dict[str, Any]:
    """Sizes of an (exported) model against its teacher."""
    cfg = model.cfg
    params, model_macs = model.num_params(), model.size("macs")
    teacher = int(cfg.teacher_params) or None
    teacher_macs = int(cfg.teacher_macs) or None
    report = getattr(model, "pruning_report", None)
    return {
        "params": params,
        "teacher_params": teacher,
        "sparsity": None if teacher is None else 1.0 - params / teacher,
        # MACs of one NOMINAL_SECONDS utterance (macs.py); per second of audio: divide by it
        "macs": model_macs,
        "teacher_macs": teacher_macs,
        "macs_sparsity": None if teacher_macs is None else 1.0 - model_macs / teacher_macs,
        "macs_seconds": NOMINAL_SECONDS,
        "conv_channels": [c for c, _, _ in parse_conv_layers(cfg.conv_feature_layers)],
        "heads": [h if u else 0 for h, u in zip(cfg.encoder_attention_heads, cfg.use_attention)],
        "ffn_dims": [f if u else 0 for f, u in zip(cfg.encoder_ffn_embed_dims, cfg.use_ffn)],
        "use_attention": [int(u) for u in cfg.use_attention],
        "use_ffn": [int(u) for u in cfg.use_ffn],
        "exact": None if report is None else report.exact,
        "inexact_parts": [] if report is None else report.inexact_parts,
        "max_abs_deviation": None if report is None else report.max_abs_deviation,
    }


def format_summary(summary: Dict[str, Any], teacher_cfg: Optional[Dict[str, Any]] = None) -> str:
    lines = [f"parameters: {summary['params']:,}"]
    metric = summary.get("target_metric") or "params"
    target = summary.get("target_sparsity")
    if summary["teacher_params"]:
        lines[0] += f" of {summary['teacher_params']:,} (sparsity {summary['sparsity']:.4f})"
        if target is not None and metric == "params":
            lines[0] += (
                f"; target {target:.4f}, {round((1 - target) * summary['teacher_params']):,} parameters"
            )
    if summary.get("macs") is not None:  # absent from summaries written before MACs were reported
        seconds = summary.get("macs_seconds", NOMINAL_SECONDS)
        lines.append(f"MACs of a {seconds:g} s utterance: {summary['macs']:,}")
        if summary.get("teacher_macs"):
            lines[-1] += f" of {summary['teacher_macs']:,} (MACs sparsity {summary['macs_sparsity']:.4f})"
            if target is not None and metric == "macs":
                lines[-1] += f"; target {target:.4f}, {round((1 - target) * summary['teacher_macs']):,} MACs"
    if summary.get("latency_seconds") is not None:
        lines.append(
            f"predicted seconds ({summary['latency_table']}): {summary['latency_seconds']:.4f} of "
            f"{summary['teacher_latency_seconds']:.4f} (latency sparsity {summary['latency_sparsity']:.4f})"
        )
        if target is not None and metric == "latency":
            lines[-1] += f"; target {target:.4f}"
    reached = summary.get(REACHED_KEY.get(metric, "sparsity"))
    if target is not None and reached is not None:
        warning = missed_target(reached, target, metric)
        if warning:
            lines.append("WARNING: " + warning)
    lines.append("conv channels: " + " ".join(str(c) for c in summary["conv_channels"]))
    lines.append("layer  heads  ffn units")
    for i, (h, f) in enumerate(zip(summary["heads"], summary["ffn_dims"])):
        att = "-" if not summary["use_attention"][i] else str(h)
        ffn = "-" if not summary["use_ffn"][i] else str(f)
        lines.append(f"{i + 1:>5}  {att:>5}  {ffn:>9}")
    if summary.get("rounding"):
        r = summary["rounding"]
        lines.append(
            f"heads rounded up to multiples of {r['heads']}, FFN units of {r['ffn']}: "
            f"{r['extra_params']:,} more parameters than without rounding"
        )
    if summary["exact"] is not None:
        if summary["exact"]:
            lines.append(
                f"export is exact (max abs deviation on the probe {summary['max_abs_deviation']:.2e})"
            )
        else:
            lines.append(
                f"export is NOT exact: {'; '.join(summary['inexact_parts'])}; max abs deviation on the probe "
                f"{summary['max_abs_deviation']:.4g}"
            )
    if summary.get("reference"):
        lines.extend(ReferenceExportReport(**summary["reference"]).lines())
    return "\n".join(lines)


def check_destination(path: str, what: str) -> None:
    """Fail, before anything is read or written, when ``path`` cannot be written as a file: it is a folder, a
    folder on its way is a file, or the nearest existing folder does not take new files."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ConfigError(
            f"{what} {path}: is a directory; give a file name, e.g. {os.path.join(path, 'out.pt')}"
        )
    folder = os.path.dirname(full)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {path}: {folder} is a file, not a folder")
    try:  # what a write needs, tried for real (permissions, read-only file systems, quotas, root or not)
        fd, probe = tempfile.mkstemp(prefix=".dphubert-export.", dir=folder)
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write in {folder} ({err.strerror or err})") from None
    os.close(fd)
    os.remove(probe)


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (the same file through links too, where both exist)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_destinations(source: str, destinations: Sequence[Tuple[Optional[str], str, str]]) -> None:
    """``check_destination`` for each ``(path, flag, what)`` given (``path`` None: not asked for), and that
    none of them is ``source`` (the input would be overwritten, a stage-1 run's gates lost) or another of
    them. ``what``: how an error names that file ("the output checkpoint's")."""
    given = [(path, flag, what) for path, flag, what in destinations if path]
    for i, (path, flag, _) in enumerate(given):
        check_destination(path, flag)
        if _same_file(path, source):
            raise ConfigError(
                f"{flag} {path}: is the input {source}, which it would overwrite; give another file"
            )
        for other, _, what in given[:i]:
            if _same_file(path, other):
                raise ConfigError(f"{flag} {path}: is {what} path too; give another file")


def _recorded(state: Dict[str, Any]) -> Dict[str, Any]:
    """What the distillation recorded in a training checkpoint (its criterion) or, when the source is itself
    an export, what that export carried: projections, their layers, the head mode and the target."""
    previous = dict(state.get("extra_state") or {})
    if "export_summary" in previous and not state.get("criterion"):
        return {
            "distill_projections": previous.get("distill_projections") or {},
            "distill_layers": previous.get("distill_layers"),
            "prediction_heads": previous.get("prediction_heads"),
            "prediction_head": previous.get("prediction_head"),
            "target_sparsity": (previous.get("export_summary") or {}).get("target_sparsity"),
            "target_metric": (previous.get("export_summary") or {}).get("target_metric"),
            "latency_table": (previous.get("export_summary") or {}).get("latency_table"),
        }
    criterion_state = state.get("criterion") or {}
    criterion_cfg = state["cfg"].get("criterion") or {}
    stage1 = criterion_cfg.get("lagrangian") and "target_sparsity" in criterion_cfg
    return {
        "distill_projections": {
            k[len("projections.") :]: v for k, v in criterion_state.items() if k.startswith("projections.")
        },
        "distill_layers": criterion_cfg.get("distill_layers"),
        "prediction_heads": criterion_cfg.get("prediction_heads"),
        "prediction_head": criterion_cfg.get("prediction_head"),
        "target_sparsity": float(criterion_cfg["target_sparsity"]) if stage1 else None,
        "target_metric": str(criterion_cfg.get("target_metric") or "params") if stage1 else None,
        "latency_table": criterion_cfg.get("latency_table"),
    }


#: ``--format`` choices: a fairseq checkpoint (``save_model``) or the reference implementation's format
FORMATS = ("fairseq", "reference")


def export(
    checkpoint: str,
    out: str,
    json_path: Optional[str] = None,
    round_heads: int = 1,
    round_ffn: int = 1,
    output_format: str = "fairseq",
    reference_layout: str = "exact",
    onnx_path: Optional[str] = None,
    onnx_audio: Sequence[str] = (),
    int8: bool = False,
) -> Dict[str, Any]:
    if output_format not in FORMATS:
        raise ConfigError(f"--format {output_format}: choose one of {', '.join(FORMATS)}")
    if reference_layout not in LAYOUTS:
        raise ConfigError(f"--reference-layout {reference_layout}: choose one of {', '.join(LAYOUTS)}")
    if reference_layout != "exact" and output_format != "reference":
        raise ConfigError("--reference-layout applies to --format reference only")
    if onnx_audio and not onnx_path:
        raise ConfigError("--onnx-audio needs --onnx (the ONNX file that is checked on the audio)")
    if int8 and not onnx_path:
        raise ConfigError(
            "--int8 needs --onnx (the int8 file is the ONNX file quantised, written next to it)"
        )
    check_destinations(
        checkpoint,
        [
            (out, "output", "the output checkpoint's"),
            (json_path, "--json", "the --json summary's"),
            (onnx_path, "--onnx", "the --onnx file's"),
            (int8_path(onnx_path) if int8 else None, "--int8", "the int8 file's"),
        ],
    )
    if onnx_path:
        require_onnx()
    model, state = model_from_training_checkpoint(checkpoint)
    onnx_check = audio_batch(model, onnx_audio) if onnx_audio else None  # read before anything is written
    rounding = round_heads != 1 or round_ffn != 1
    if rounding and not model.gates():
        raise ConfigError(
            f"{checkpoint}: has no gates (a stage-2 checkpoint?); --round-heads / --round-ffn apply when "
            "exporting stage 1, so that stage 2 trains the rounded structure"
        )
    pruned = prune(model, round_heads=round_heads, round_ffn=round_ffn) if model.gates() else model
    summary = summarize(pruned)
    if rounding:
        summary["rounding"] = {
            "heads": round_heads,
            "ffn": round_ffn,
            "extra_params": summary["params"] - model.eval_mask_params(),
        }
    history = state.get("optimizer_history") or [{}]
    summary["num_updates"] = history[-1].get("num_updates")
    summary["source"] = os.path.abspath(checkpoint)
    summary["teacher"] = model.cfg.teacher_identity or None
    recorded = _recorded(state)
    if recorded["latency_table"]:
        summary.update(latency_summary(pruned, recorded["latency_table"]))
    if recorded["target_sparsity"] is not None:
        metric = recorded["target_metric"] or "params"
        summary["target_sparsity"] = recorded["target_sparsity"]
        summary["target_metric"] = metric
        reached = summary.get(REACHED_KEY[metric])
        warning = None if reached is None else missed_target(reached, summary["target_sparsity"], metric)
        if warning:
            logger.warning("%s: %s", checkpoint, warning)
    extra_state = {
        "distill_projections": recorded["distill_projections"],
        "distill_layers": recorded["distill_layers"],
        "prediction_heads": recorded["prediction_heads"],
        "prediction_head": recorded["prediction_head"],
        "export_summary": summary,
    }
    summary["format"] = output_format
    onnx_data = int8_data = None
    if onnx_path:  # every file made and checked before any is written: a refusal leaves all as they were
        source, mask, checked_on = onnx_check or (None, None, None)
        batch = None if onnx_check is None else (source, mask)
        try:
            onnx_data, onnx_report = checked_onnx(pruned, onnx_path, batch, checked_on=checked_on)
            summary["onnx"] = onnx_report.summary()
            if int8:
                check = onnx_check or probe_batch(pruned)
                int8_data, int8_report = checked_int8(
                    onnx_data, int8_path(onnx_path), pruned.float().cpu().eval(), check
                )
                summary["onnx_int8"] = int8_report.summary()
        except ValueError as err:
            raise type(err)(f"{err}; nothing was written") from err
    if output_format == "reference":
        obj, report = reference_from_model(pruned, layout=reference_layout)
        summary["reference"] = dataclasses.asdict(report)
        save_reference(obj, out)
    else:
        save_model(pruned, out, extra_state=extra_state)
    if onnx_data is not None:
        atomic_write(onnx_path, lambda f: f.write(onnx_data))
    if int8_data is not None:
        atomic_write(int8_path(onnx_path), lambda f: f.write(int8_data))
    if json_path:
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``dphubert-export`` (also what tests/test_docs.py checks the documented commands
    against)."""
    parser = argparse.ArgumentParser(
        prog="dphubert-export",
        description="Export a dphubert training checkpoint as a pruned fairseq checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint written by fairseq-hydra-train (stage 1 or stage 2)")
    parser.add_argument(
        "out", help="where to write the pruned fairseq checkpoint (.pt), or the reference-format file"
    )
    parser.add_argument("--json", dest="json_path", help="also write the summary as JSON here")
    parser.add_argument(
        "--round-heads",
        type=int,
        default=1,
        help="keep a multiple of this many heads per layer (rounded up with zeroed heads; output unchanged)",
    )
    parser.add_argument(
        "--round-ffn",
        type=int,
        default=1,
        help="keep a multiple of this many FFN units per layer (rounded up likewise), e.g. 64 or 128",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="fairseq",
        help="fairseq: a fairseq checkpoint (default); reference: the reference implementation's "
        "{state_dict, config} file for its wav2vec2_model builder, instead of the fairseq checkpoint",
    )
    parser.add_argument(
        "--reference-layout",
        choices=LAYOUTS,
        default="exact",
        help="with --format reference: 'exact' (default) keeps removed CNN output channels as zero "
        "channels so that the file reproduces the model; 'compact' drops them as the reference does (fewer "
        "parameters, not exact: the deviation is measured and printed)",
    )
    parser.add_argument(
        "--onnx",
        dest="onnx_path",
        help="also write the pruned model as ONNX here (needs the 'onnx' extra), checked with onnxruntime",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="with --onnx: also write OUT.int8.onnx, the ONNX file with int8 linear layers (onnxruntime's "
        "dynamic quantisation) and CNN (inputs scaled per group of frames), once every hidden state on the check "
        f"batch has a cosine of at least {MIN_COSINE} to the torch fp32 model's (else with a float32 CNN, if that "
        "meets it); else nothing is written",
    )
    parser.add_argument(
        "--onnx-audio",
        nargs="+",
        action="extend",
        default=[],
        metavar="WAV",
        help="with --onnx: audio files (at the model's sample rate) padded into the batch the ONNX file is "
        "checked on (default: a built-in speech-like probe)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = export(
            args.checkpoint,
            args.out,
            args.json_path,
            args.round_heads,
            args.round_ffn,
            output_format=args.format,
            reference_layout=args.reference_layout,
            onnx_path=args.onnx_path,
            onnx_audio=args.onnx_audio,
            int8=args.int8,
        )
    except ValueError as err:  # every DPHuBERTError is one
        print(f"dphubert-export: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if summary.get("onnx"):
        print(summary_line(summary["onnx"]))
    if summary.get("onnx_int8"):
        print(int8_summary_line(summary["onnx_int8"]))
    print(f"wrote {args.out}" + (f" and {args.json_path}" if args.json_path else ""))
    return 0


if __name__ == "__main__":  # python -m imports the package first: patches and registrations are in place
    sys.exit(main())
