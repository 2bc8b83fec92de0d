"""Stage 1 with two workers on one machine: one consistent checkpoint, and a resume from it.

    python benchmarks/distributed_check.py --device cuda [--out DIR]    # on the GPU machine (gpu_check.sh)
    python benchmarks/distributed_check.py --device cpu                 # to try the script out

Two ranks are started as a cluster launcher starts them: one ``fairseq-hydra-train --config-name dphubert``
process each, ``distributed_training.distributed_rank`` set, a TCP rendezvous, fairseq's own distributed start
(``distributed_utils.call_main`` / ``distributed_main``). They train 4 updates of a quarter-width HuBERT Base
teacher (random weights) on 2 s clips and write ``checkpoint_last.pt``; then both start again with
``optimization.max_update=6`` and must resume from it (update 4) and end at update 6.

On CUDA both ranks share the one GPU (``distributed_training.device_id=0``) with the configs'
``ddp_backend: c10d``; NCCL refuses two ranks on one device, so the process group is gloo (on a cluster, one
GPU per rank, NCCL). On CPU fairseq's c10d wrapper assumes CUDA devices, so the CPU run uses ``legacy_ddp``
(as ``tests/test_training.py`` does): it tries the script out, it does not check c10d.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from typing import Dict, List

from harness import REPO, SHAPES, save_random_teacher, table, write_audio, write_json

from fairseq_runs import hydra_train_command, records, start

UPDATES, RESUMED_UPDATES = 4, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_overrides(device: str, data: str, teacher: str, save_dir: str, max_update: int) -> List[str]:
    """What both ranks run with (their rank and hydra folder come on top)."""
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
        f"checkpoint.save_interval_updates={UPDATES}",
        "common.tensorboard_logdir=null",
        'criterion.distill_layers="0;4,8,12"',
    ]
    if device == "cuda":
        out += ["distributed_training.device_id=0", "distributed_training.ddp_backend=c10d"]
    else:
        out += ["common.cpu=true", "common.fp16=false", "distributed_training.ddp_backend=legacy_ddp"]
    return out


def run_ranks(overrides: List[str], save_dir: str, tag: str) -> List[str]:
    """Start both ranks, wait for both; their outputs (also written to SAVE_DIR/TAG.rankN.log)."""
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
    outputs = [worker.communicate(timeout=900)[0] for worker in workers]
    for rank, (worker, text) in enumerate(zip(workers, outputs)):
        with open(os.path.join(save_dir, f"{tag}.rank{rank}.log"), "w") as f:
            f.write(text)
        if worker.returncode != 0:
            raise SystemExit(f"{tag}: rank {rank} failed (exit {worker.returncode}):\n{text[-3000:]}")
    return outputs


def checkpoint_updates(path: str) -> int:
    from dphubert_fairseq.export import model_from_training_checkpoint

    _, state = model_from_training_checkpoint(path)  # loads whole and strict: one consistent model
    return int(state["optimizer_history"][-1]["num_updates"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", default=None, help="folder for data, teacher, checkpoints and logs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = os.path.abspath(args.out or tempfile.mkdtemp(prefix="dphubert-ddp-"))
    data = write_audio(os.path.join(work, "data"), 8, 2.0)
    teacher = save_random_teacher(os.path.join(work, "teacher.pt"), data, SHAPES["small"])
    save_dir = os.path.join(work, "stage1")
    os.makedirs(save_dir, exist_ok=True)
    last = os.path.join(save_dir, "checkpoint_last.pt")

    first = run_ranks(rank_overrides(args.device, data, teacher, save_dir, UPDATES), save_dir, "train")
    checks: Dict[str, bool] = {
        "rank 1 joined the process group": "distributed init (rank 1)" in first[1],
        f"{UPDATES} updates logged (by rank 0, as fairseq logs)": len(records(first[0], "train_inner"))
        == UPDATES,
        f"checkpoint_last.pt loads whole at update {UPDATES}": checkpoint_updates(last) == UPDATES,
        "no temporary checkpoint left": not [f for f in os.listdir(save_dir) if f.endswith(".tmp")],
    }
    second = run_ranks(
        rank_overrides(args.device, data, teacher, save_dir, RESUMED_UPDATES), save_dir, "resume"
    )
    resumed = records(second[0], "train_inner")
    checks.update(
        {
            f"the resume started from update {UPDATES}": bool(resumed)
            and int(resumed[0]["num_updates"]) == UPDATES + 1,
            f"checkpoint_last.pt loads whole at update {RESUMED_UPDATES}": checkpoint_updates(last)
            == RESUMED_UPDATES,
        }
    )
    backend = "c10d over gloo, both ranks on GPU 0" if args.device == "cuda" else "legacy_ddp over gloo, CPU"
    print(f"\nstage 1, 2 ranks ({backend}), {UPDATES} updates then a resume to {RESUMED_UPDATES}")
    print(table([[name, "yes" if ok else "NO"] for name, ok in checks.items()], ["check", "passed"]))
    write_json(args.json, {"device": args.device, "backend": backend, "work": work, "checks": checks})
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
