"""Stage 1 with two workers on one machine, as a cluster runs it: what only several ranks show.

    python benchmarks/distributed_check.py --device cuda [--out DIR]    # on the GPU machine (gpu_check.sh)
    python benchmarks/distributed_check.py --device cpu                 # a dry run of what runs on CPU

Two ranks are started as a cluster launcher starts them: one ``fairseq-hydra-train --config-name dphubert``
process each, ``distributed_training.distributed_rank`` set, a TCP rendezvous, fairseq's own distributed start
(``distributed_utils.call_main`` / ``distributed_main``). Each check is a row of the table, passed or not:

- run A: a quarter-width HuBERT Base teacher (random weights), 8 clips of 2 s, 4 updates, then both ranks
  start again with ``optimization.max_update=6`` and must resume from ``checkpoint_last.pt`` (update 4) and
  end at update 6, each checkpoint loading whole. Units become inactive mid-run
  (``criterion.inactive_check_interval=1``, ``inactive_checks=1``, ``inactive_threshold=0.85``): the FFN-unit
  gates start at P(open) ~0.83, so all of them become inactive at the first check while heads and conv
  channels stay; at update 4 the landing onto the target (the last tenth of the run) lowers every gate, and
  the heads and all but one channel per conv layer follow, so the resume trains with every head and FFN unit
  inactive. The criterion must log ``update N: K more units inactive``, ``active_ffn_units`` must drop below
  1, and DDP without ``find_unused_parameters`` must go on. On CUDA, under AMP from
  ``common.fp16_init_scale=2**40``: the first backward overflows in fp16 and fairseq retries the batch
  (``common.amp_batch_retries=64``), the scaler halving the scale each time, until it fits. No update may be
  lost, the logged ``loss_scale`` must be below 2**40, the checkpoint must hold the scale in effect at the
  save (``amp_scaler`` in ``last_optimizer_state``), and the resume must start from that scale, not from
  2**40.
- run B: a quarter-width wav2vec 2.0 Base teacher (random weights, fairseq's own recipe), clips of 2, 2, 1.5
  and 1 s, ``task.enable_padding=true``, batches of 2, 3 updates. Sorted by length, the clips make one batch
  of the two 2 s clips (not padded: a wav2vec2-style student then has no padding mask) and one of 1.5 and 1 s
  (padded), one per rank: at every update one rank's batch is padded and the other's is not. Every logged
  value must have one kind on both ranks, or fairseq's reduction of the logs fails or hangs (each run is
  killed after ``--timeout``); the logged ``ntokens`` and ``valid_ntokens`` must be the non-padded frames of
  both ranks' batches.

On CUDA both ranks share the one GPU (``distributed_training.device_id=0``) with the configs'
``ddp_backend: c10d``; NCCL refuses two ranks on one device, so the process group is gloo (on a cluster, one
GPU per rank, NCCL). On CPU fairseq's c10d wrapper assumes CUDA devices, so the CPU run uses ``legacy_ddp``
(as ``tests/test_training.py`` does), and AMP is off (its CUDA GradScaler is disabled there): a dry run of
everything but c10d and the loss scaling, whose rows say "skipped (CPU)".
"""

import argparse
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from harness import (
    REPO,
    SAMPLE_RATE,
    SHAPES,
    save_random_teacher,
    table,
    write_audio,
    write_clips,
    write_json,
)

from dphubert_fairseq.conv_spec import parse_conv_layers
from fairseq_runs import hydra_train_command, records, start

UPDATES, RESUMED_UPDATES, PADDED_UPDATES = 4, 6, 3
INIT_SCALE = 2**40  # run A's first loss scale on CUDA: its first backward overflows in fp16
#: run B's clips (s): sorted by length, in batches of 2, one batch of equal lengths and one padded
PADDED_CLIPS = (2.0, 2.0, 1.5, 1.0)
OVERFLOW = "AMP: overflow detected, setting scale to"
INACTIVE = re.compile(r"update (\d+): (\d+) more units inactive")
SKIPPED = "skipped (CPU)"

#: a check's outcome: passed, failed, or why it did not run
Outcome = Union[bool, str]


@dataclass
class Ranks:
    """What both ranks of one run printed, and why the run failed (None: both exited 0)."""

    outputs: List[str]
    failure: Optional[str]

    @property
    def log(self) -> str:
        """Rank 0's output: fairseq logs its INFO lines and progress records there only."""
        return self.outputs[0]

    def records(self) -> List[Dict[str, str]]:
        return records(self.log, "train_inner")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_overrides(device: str, data: str, teacher: str, save_dir: str, max_update: int) -> List[str]:
    """What both ranks of every run run with (their rank and hydra folder come on top)."""
    out = [
        f"task.data={data}",
        f"task.teacher_path={teacher}",
        f"checkpoint.save_dir={save_dir}",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{free_port()}",
        "distributed_training.distributed_no_spawn=true",
        "dataset.num_workers=0",
        "dataset.required_batch_size_multiple=1",
        "dataset.max_tokens=64000",
        "task.min_sample_size=16000",
        f"optimization.max_update={max_update}",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        'criterion.distill_layers="0;4,8,12"',
    ]
    if device == "cuda":
        out += ["distributed_training.device_id=0", "distributed_training.ddp_backend=c10d"]
    else:
        out += [
            "common.cpu=true",
            "common.fp16=false",
            "common.amp=false",
            "distributed_training.ddp_backend=legacy_ddp",
        ]
    return out


def run_a_overrides(device: str) -> List[str]:
    """Run A: every FFN unit inactive at the first check; on CUDA, AMP from a loss scale that overflows."""
    out = [
        "criterion.inactive_check_interval=1",
        "criterion.inactive_checks=1",
        "criterion.inactive_threshold=0.85",
        f"checkpoint.save_interval_updates={UPDATES}",
    ]
    if device == "cuda":
        out += ["common.amp=true", f"common.fp16_init_scale={INIT_SCALE}", "common.amp_batch_retries=64"]
    return out


def run_b_overrides() -> List[str]:
    """Run B: padded batches of 2 (the recipe drops nothing of these lengths), nothing saved."""
    return ["task.enable_padding=true", "dataset.batch_size=2", "checkpoint.no_save=true"]


def run_ranks(overrides: List[str], save_dir: str, tag: str, timeout: int) -> Ranks:
    """Start both ranks, wait for both (both are killed after ``timeout`` s: a rank waiting in a collective
    for the other never ends); their outputs are also written to SAVE_DIR/TAG.rankN.log."""
    command = hydra_train_command("configs", "dphubert")
    workers = [
        start(
            command
            + overrides
            + [
                f"distributed_training.distributed_rank={rank}",
                f"hydra.run.dir={save_dir}/hydra_{tag}{rank}",
            ],
            env={"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    failure = None
    try:
        outputs = [worker.communicate(timeout=timeout)[0] for worker in workers]
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        outputs = [worker.communicate()[0] for worker in workers]
        failure = f"timed out after {timeout} s"
    for rank, (worker, text) in enumerate(zip(workers, outputs)):
        with open(os.path.join(save_dir, f"{tag}.rank{rank}.log"), "w") as f:
            f.write(text)
        if failure is None and worker.returncode != 0:
            failure = f"rank {rank} failed (exit {worker.returncode})"
            print(f"{tag}: {failure}:\n{text[-3000:]}", file=sys.stderr)
    if failure:
        print(f"{tag}: {failure}; logs in {save_dir}/{tag}.rank*.log", file=sys.stderr)
    return Ranks(outputs, failure)


# ----- what the runs left -----


def checkpoint_updates(path: str) -> Optional[int]:
    """The update ``path`` was saved at, loaded whole and strict (one consistent model); None if it does
    not load."""
    from dphubert_fairseq.export import model_from_training_checkpoint

    try:
        _, state = model_from_training_checkpoint(path)
    except Exception as e:  # the row reports it
        print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return int(state["optimizer_history"][-1]["num_updates"])


def saved_loss_scale(path: str) -> Optional[float]:
    """The AMP loss scale ``path`` holds (``amp_scaler`` in ``last_optimizer_state``), None if none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        return float(state["last_optimizer_state"]["amp_scaler"]["scale"])
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        print(f"{path}: no loss scale: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def logged(run: Ranks, key: str) -> List[float]:
    return [float(r[key]) for r in run.records() if key in r]


def consecutive_updates(run: Ranks, first: int, last: int) -> bool:
    """Rank 0 logged updates ``first`` to ``last``, each once: none lost to an overflow, none repeated."""
    return [int(v) for v in logged(run, "num_updates")] == list(range(first, last + 1))


def overflows_before_first_record(run: Ranks) -> int:
    first = run.log.find("][train_inner][")
    return run.log[: first if first >= 0 else len(run.log)].count(OVERFLOW)


def same_scale(a: Optional[float], b: Optional[float]) -> bool:
    # fairseq's JSON log prints 6 significant digits
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5)


def frames(samples: int, conv: str) -> int:
    """The frames the CNN front end makes of ``samples`` (wav2vec2's conv output length)."""
    for _, kernel, stride in parse_conv_layers(conv):
        samples = (samples - kernel) // stride + 1
    return samples


# ----- the checks -----


def on_cuda(device: str, ok: bool) -> Outcome:
    """``ok`` for a check of AMP's loss scaling, which only CUDA has."""
    return ok if device == "cuda" else SKIPPED


def run_a_checks(
    device: str, train: Ranks, last: str, saved: Optional[float], figures: Dict
) -> Dict[str, Outcome]:
    """Run A up to update UPDATES; ``saved``: the loss scale ``last`` held then. What the checks read goes
    into ``figures``."""
    active_ffn = logged(train, "active_ffn_units")
    scales = logged(train, "loss_scale")
    overflows = train.log.count(OVERFLOW)
    figures.update(
        inactive=[f"update {n}: {k} units" for n, k in INACTIVE.findall(train.log)],
        active_ffn_units=active_ffn,
        overflows=overflows,
        loss_scales=scales,
        saved_loss_scale=saved,
    )
    return {
        "both ranks finished": train.failure is None,
        "rank 1 joined the process group": "distributed init (rank 1)" in train.outputs[1],
        f"updates 1 to {UPDATES} logged, none lost or repeated": consecutive_updates(train, 1, UPDATES),
        "units became inactive mid-run (criterion: 'update N: K more units inactive')": bool(
            INACTIVE.search(train.log)
        ),
        "active_ffn_units logged below 1 after that": bool(active_ffn) and active_ffn[-1] < 1.0,
        "an overflow at loss scale 2**40, the batch retried": on_cuda(device, overflows > 0),
        "logged loss_scale below 2**40 at every update": on_cuda(
            device, len(scales) == UPDATES and max(scales) < INIT_SCALE
        ),
        f"checkpoint_last.pt loads whole at update {UPDATES}": checkpoint_updates(last) == UPDATES,
        "checkpoint_last.pt holds the loss scale in effect (amp_scaler)": on_cuda(
            device, bool(scales) and same_scale(saved, scales[-1])
        ),
        "no temporary checkpoint left": not [
            f for f in os.listdir(os.path.dirname(last)) if f.endswith(".tmp")
        ],
    }


def resume_checks(
    device: str, resumed: Ranks, last: str, saved: Optional[float], figures: Dict
) -> Dict[str, Outcome]:
    """The resume from update UPDATES to RESUMED_UPDATES. Its first logged loss scale must be the saved one
    halved once per overflow logged before it; a scale restarted at 2**40 would be 2**40 halved as often."""
    scales = logged(resumed, "loss_scale")
    overflows = overflows_before_first_record(resumed)
    expected = None if saved is None else saved * 0.5**overflows
    figures.update(resume_loss_scales=scales, resume_overflows_before_first_update=overflows)
    return {
        "both ranks finished": resumed.failure is None,
        f"resumed from update {UPDATES}: updates {UPDATES + 1} to {RESUMED_UPDATES} logged": consecutive_updates(
            resumed, UPDATES + 1, RESUMED_UPDATES
        ),
        "the first loss_scale logged is the saved one, not fp16_init_scale": on_cuda(
            device, bool(scales) and same_scale(scales[0], expected)
        ),
        f"checkpoint_last.pt loads whole at update {RESUMED_UPDATES}": checkpoint_updates(last)
        == RESUMED_UPDATES,
    }


def run_b_checks(padded: Ranks, figures: Dict) -> Dict[str, Outcome]:
    # each update takes the epoch's two batches, one per rank: every clip once; validation the same two
    expected = sum(frames(int(s * SAMPLE_RATE), SHAPES["small"].conv) for s in PADDED_CLIPS)
    ntokens = logged(padded, "ntokens")
    valid = [float(r["valid_ntokens"]) for r in records(padded.log, "valid") if "valid_ntokens" in r]
    figures.update(ntokens=ntokens, valid_ntokens=valid, expected_ntokens=expected)
    return {
        "both ranks finished": padded.failure is None,
        f"updates 1 to {PADDED_UPDATES} logged": consecutive_updates(padded, 1, PADDED_UPDATES),
        f"ntokens = non-padded frames of both ranks' batches ({expected}) at every update": len(ntokens)
        == PADDED_UPDATES
        and all(v == expected for v in ntokens),
        f"valid_ntokens = {expected} at the end-of-run validation": valid == [expected],
    }


# ----- the runs -----


def run_a(args, work: str, timeout: int, figures: Dict) -> Dict[str, Dict[str, Outcome]]:
    """Run A and its resume: their checks by run; what they read in ``figures``."""
    data = write_audio(os.path.join(work, "data"), 8, 2.0)
    teacher = save_random_teacher(os.path.join(work, "teacher.pt"), data, SHAPES["small"])
    save_dir = os.path.join(work, "stage1")
    os.makedirs(save_dir, exist_ok=True)
    last = os.path.join(save_dir, "checkpoint_last.pt")

    def overrides(max_update: int) -> List[str]:
        return shared_overrides(args.device, data, teacher, save_dir, max_update) + run_a_overrides(
            args.device
        )

    train = run_ranks(overrides(UPDATES), save_dir, "train", timeout)
    saved = saved_loss_scale(last) if args.device == "cuda" else None  # before the resume overwrites it
    first = run_a_checks(args.device, train, last, saved, figures)
    if train.failure:
        return {"A": first, "A resume": {"not run: run A failed": False}}
    resumed = run_ranks(overrides(RESUMED_UPDATES), save_dir, "resume", timeout)
    return {"A": first, "A resume": resume_checks(args.device, resumed, last, saved, figures)}


def run_b(args, work: str, timeout: int, figures: Dict) -> Dict[str, Dict[str, Outcome]]:
    """Run B: its checks; what they read in ``figures``."""
    folder = os.path.join(work, "padded")
    data = write_clips(os.path.join(folder, "data"), PADDED_CLIPS)
    teacher = save_random_teacher(os.path.join(folder, "teacher.pt"), data, SHAPES["small"], kind="wav2vec2")
    save_dir = os.path.join(folder, "stage1")
    os.makedirs(save_dir, exist_ok=True)
    overrides = shared_overrides(args.device, data, teacher, save_dir, PADDED_UPDATES) + run_b_overrides()
    return {"B": run_b_checks(run_ranks(overrides, save_dir, "padded", timeout), figures)}


def shown(outcome: Outcome) -> str:
    return outcome if isinstance(outcome, str) else ("yes" if outcome else "NO")


def describe(device: str) -> List[str]:
    """The header lines: backend and runs."""
    if device == "cuda":
        backend, precision = "c10d over gloo, both ranks on GPU 0", "AMP from loss scale 2**40"
    else:
        backend, precision = "legacy_ddp over gloo, CPU", "fp32"
    clips = ", ".join(f"{s:g}" for s in PADDED_CLIPS)
    return [
        f"stage 1, 2 ranks ({backend})",
        f"A: HuBERT teacher, units inactive every update, {precision}, {UPDATES} updates, resumed to "
        f"{RESUMED_UPDATES}",
        f"B: wav2vec2 teacher, padded batches of 2 (clips of {clips} s), {PADDED_UPDATES} updates",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", default=None, help="folder for data, teachers, checkpoints and logs")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--timeout",
        type=int,
        default=None,
        help="seconds per run before both ranks are killed (default: 180 on cuda, 900 on cpu)",
    )
    args = parser.parse_args()
    timeout = args.timeout or (180 if args.device == "cuda" else 900)
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="dphubert-ddp-"))
    figures: Dict[str, object] = {}
    checks = {**run_a(args, work, timeout, figures), **run_b(args, work, timeout, figures)}

    header = describe(args.device)
    print("\n" + "\n".join(header))
    rows = [[run, name, shown(ok)] for run, named in checks.items() for name, ok in named.items()]
    print(table(rows, ["run", "check", "passed"]))
    print("\n".join(f"{key}: {value}" for key, value in figures.items()))
    flat = {f"{run}: {name}": ok for run, named in checks.items() for name, ok in named.items()}
    write_json(
        args.json, {"device": args.device, "runs": header, "work": work, "checks": flat, "figures": figures}
    )
    return 1 if any(ok is False for ok in flat.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
