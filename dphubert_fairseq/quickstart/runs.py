"""Running fairseq's command-line tools as a user does, with their progress shown and their logs kept."""

import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

Log = Callable[[str], None]
_RECORD = re.compile(r"\]\[(train_inner|valid|train)\]\[INFO\] - (\{.*\})")


def console_script(name: str, module: str) -> List[str]:
    """The console script next to this interpreter, else ``python -m module``."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return [candidate] if os.path.exists(candidate) else [sys.executable, "-m", module]


def run_logged(
    cmd: Sequence[str], log_path: str, cwd: str, show: Log, env: Optional[Dict[str, str]] = None
) -> str:
    """Run ``cmd``; write everything it prints to ``log_path``, show fairseq's progress records as they come.
    Raises RuntimeError with the tail of the log when it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    lines = []
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            match = _RECORD.search(line)
            if match:
                show("    " + _short(match.group(1), json.loads(match.group(2))))
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(lines[-25:])
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log: {log_path}\n{tail}"
        )
    return "".join(lines)


def composite_schedule(lrs: Dict[str, float], warmup: int, total: Optional[int] = None) -> List[str]:
    """Overrides of ``configs/dphubert.yaml``'s three optimizer groups: each group's learning rate and the one
    warm-up key the groups share. Their decay ends at ``optimization.max_update``, or at ``total`` (for a run
    stopped early on purpose, e.g. to test resuming)."""
    out = [f"optimizer.groups.{group}.lr_float={lr}" for group, lr in lrs.items()]
    out.append(f"optimizer.groups.default.lr_scheduler.warmup_updates={warmup}")
    if total is not None:
        out += [f"optimizer.groups.{group}.lr_scheduler.total_num_update={total}" for group in lrs]
    return out


def cpu_run(max_tokens: int, min_sample_size: int, max_sample_size: int) -> List[str]:
    """Overrides for one CPU process in fp32, batches of ``max_tokens`` samples, utterances cropped to
    ``max_sample_size`` samples and those shorter than ``min_sample_size`` skipped."""
    return [
        "common.fp16=false",
        "common.amp=false",
        "common.cpu=true",
        "distributed_training.distributed_world_size=1",
        "distributed_training.nprocs_per_node=1",
        "dataset.num_workers=0",
        "dataset.required_batch_size_multiple=1",
        f"dataset.max_tokens={max_tokens}",
        f"task.min_sample_size={min_sample_size}",
        f"task.max_sample_size={max_sample_size}",
    ]


def run_length(updates: int, log_every: int) -> List[str]:
    """Overrides for a run of ``updates`` updates, logging every ``log_every``, validating and saving once at
    the end."""
    return [
        f"optimization.max_update={updates}",
        f"common.log_interval={max(1, log_every)}",
        f"dataset.validate_interval_updates={updates}",
        f"checkpoint.save_interval_updates={updates}",
    ]


def records(output: str, kind: str) -> List[Dict[str, str]]:
    """fairseq's JSON log records of one kind ('train_inner', 'valid', 'train')."""
    return [json.loads(m.group(2)) for m in _RECORD.finditer(output) if m.group(1) == kind]


_SHOWN = ("num_updates", "loss", "distill_loss", "expected_sparsity", "target_sparsity", "eval_sparsity")


def _short(kind: str, record: Dict[str, str]) -> str:
    prefix = "valid_" if kind == "valid" else ("train_" if kind == "train" else "")
    parts = [f"{key}={record[prefix + key]}" for key in _SHOWN if prefix + key in record]
    return f"[{kind}] " + " ".join(parts)
