"""Training cost: a stage-1 update against a stock fairseq HuBERT pretraining update of the same model on the same
batch, both through fairseq's own ``Trainer.train_step``; and how the stage-1 update grows with audio length.

    python benchmarks/training_step.py                       # CPU: 'small' shape, fp32, 4 x 4 s
    python benchmarks/training_step.py --seconds 2 4 8 16    # scaling with the length of each item
    python benchmarks/training_step.py --shape base --batch 2 --rounds 3   # Base on CPU, 3 interleaved rounds
    python benchmarks/training_step.py --device cuda --shape base --precision amp --batch 16 --seconds 10

Stage 1 is ``configs/dphubert.yaml`` (teacher forward + student forward/backward + gates + Lagrangian, three
optimizer groups); stock is fairseq's ``hubert_base_librispeech.yaml`` (its masking, layerdrop 0.05 and CNN
gradient scale 0.1 as shipped). The teacher is the same model the stock run trains (random weights). Each
measurement runs in its own process: the update time (median of ``--repeat`` after ``--warmup``), the peak
memory (see ``harness.PeakMemory``) and the number of aten operations one update dispatches (a proxy for
kernel launches on a GPU). ``floor`` is (stock update + no-grad teacher forward) / stock update: what the
ratio would be if distillation cost nothing beyond running the teacher. ``landing ms`` is the search that ends
each update of the landing phase (the last tenth of stage 1, ``criterions/target_projection.py``).
``fairseq adam ms`` is the same stage-1 update with fairseq's ``adam`` in every optimizer group instead of the
configs' ``torch_adamw`` (``optim/torch_adamw.py``), ``x adam`` the ratio of the two updates, and ``step ms``
the optimizer step alone (all groups, on the last update's gradients) with each.
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, List

import torch
from harness import (
    SHAPES,
    PeakMemory,
    add_round_arguments,
    batch_overrides,
    device_overrides,
    fold_round,
    gathering_summary,
    machine,
    optimizer_overrides,
    random_teacher_in,
    round_order,
    run_worker,
    table,
    teacher_forward,
    time_calls,
    time_updates,
    trainer_on_batch,
    update_config,
    worker_args,
    write_audio,
    write_json,
)

from dphubert_fairseq.criterions.target_projection import offset_to_target


def count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.calls


def worker(args) -> Dict:
    """One measurement in this process: 'stock', 'dphubert' or 'dphubert_adam' (stage 1 with fairseq's adam)
    updates on the fixed batch."""
    memory = PeakMemory(args.device)
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    common = device_overrides(args.device, args.precision) + batch_overrides(args.batch, args.item_seconds)
    adam = args.worker == "dphubert_adam"
    kind, extra = ("dphubert", optimizer_overrides("dphubert", "adam")) if adam else (args.worker, [])
    cfg = update_config(kind, args.data, args.teacher, shape, common, extra)
    trainer, task, sample = trainer_on_batch(cfg, args.batch, args.item_seconds)
    step, result = time_updates(trainer, sample, memory, args.device, args.warmup, args.repeat)
    result["ops_per_update"] = count_ops(step)
    if args.worker != "stock":  # the optimizer's step alone, on the last update's gradients
        optimizer = getattr(trainer.optimizer, "fp32_optimizer", trainer.optimizer)  # inside AMP / fp16
        result["optimizer_step_seconds"] = time_calls(optimizer.step, args.device, 1, args.repeat)
    if args.worker == "dphubert":  # what does not depend on the optimizer: once
        forward = teacher_forward(trainer, task, sample, args.precision)
        result["teacher_forward_seconds"] = time_calls(forward, args.device, 1, args.repeat)
        # the landing phase's search (last tenth of stage 1): what it adds to each of those updates
        model = trainer.get_model()
        landing = lambda: offset_to_target(model, 0.25 * model.num_params())  # noqa: E731
        result["landing_seconds"] = time_calls(landing, args.device, 1, args.repeat)
        result["gathering"] = gathering_summary(model)  # as chosen after the first update
    return result


def adam_cells(row: Dict) -> List[str]:
    """The table's ``fairseq adam ms``, ``x adam`` and ``step ms`` of one row ('-' where not measured)."""
    ours, adam = row["dphubert"], row["dphubert_fairseq_adam"]
    if adam is None:
        return ["-", "-", "-"]
    step = lambda r: 1000 * r["optimizer_step_seconds"]["median"]  # noqa: E731
    update_ms = 1000 * adam["update_seconds"]["median"]
    return [f"{update_ms:.0f}", f"{ours['fairseq_adam_ratio']:.3f}", f"{step(ours):.0f} / {step(adam):.0f}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: small on CPU, base on CUDA"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "amp", "fp16", "bf16"],
        default=None,
        help="default: fp32 on CPU, amp (the recipe's) on CUDA",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="items per batch (default: 4 on CPU, 16 on CUDA)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        nargs="+",
        default=None,
        help="seconds per item (default: 4 on CPU, 10 on CUDA)",
    )
    add_round_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument(
        "--fairseq-adam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time stage 1 with fairseq's adam in every group (one more worker per length)",
    )
    parser.add_argument("--json", default="benchmarks/results/training_step.json")
    parser.add_argument("--worker", choices=["stock", "dphubert", "dphubert_adam"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--item-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.shape = args.shape or ("base" if gpu else "small")
    args.precision = args.precision or ("amp" if gpu else "fp32")
    args.batch = args.batch or (16 if gpu else 4)
    args.seconds = args.seconds or [10.0 if gpu else 4.0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        import json

        print(json.dumps(worker(args)))
        return 0

    work = tempfile.mkdtemp(prefix="dphubert-bench-")
    teacher = random_teacher_in(work, SHAPES[args.shape])
    shared = worker_args(args, teacher) + ["--shape", args.shape]
    rows: List[Dict] = []
    for seconds in args.seconds:
        data = write_audio(os.path.join(work, f"data_{seconds:g}s"), args.batch, seconds)
        kinds = ("stock", "dphubert") + (("dphubert_adam",) if args.fairseq_adam else ())
        measured: Dict[str, Dict] = {}
        for round_ in range(args.rounds):  # every kind again: slow spells of the machine hit them alike
            for kind in (kinds[i] for i in round_order(len(kinds), round_)):
                extra = ["--worker", kind, "--data", data, "--item-seconds", str(seconds)]
                timings = ["update_seconds"] + (["optimizer_step_seconds"] if kind != "stock" else [])
                measured[kind] = fold_round(measured.get(kind), run_worker(__file__, shared + extra), timings)
        stock, ours, adam = measured["stock"], measured["dphubert"], measured.get("dphubert_adam")
        if adam is not None:
            ours["fairseq_adam_ratio"] = ours["update_seconds"]["median"] / adam["update_seconds"]["median"]
        rows.append(
            {
                "seconds_per_item": seconds,
                "stock": stock,
                "dphubert": ours,
                "dphubert_fairseq_adam": adam,
                "time_ratio": ours["update_seconds"]["median"] / stock["update_seconds"]["median"],
                "memory_ratio": ours["peak_memory_bytes"] / stock["peak_memory_bytes"],
                "floor": 1 + ours["teacher_forward_seconds"]["median"] / stock["update_seconds"]["median"],
                "landing_share": ours["landing_seconds"]["median"] / ours["update_seconds"]["median"],
                "ops_ratio": ours["ops_per_update"] / stock["ops_per_update"],
            }
        )
        print(f"measured {args.batch} x {seconds:g} s", flush=True)

    header = [
        "s/item",
        "stock ms",
        "stage-1 ms",
        "fairseq adam ms",
        "x adam",
        "step ms",
        "teacher fwd ms",
        "landing ms",
        "time ratio",
        "floor",
        "stock MiB",
        "stage-1 MiB",
        "mem ratio",
        "stock ops",
        "stage-1 ops",
    ]
    ms = lambda r, k: f"{1000 * r[k]['update_seconds']['median']:.0f}"  # noqa: E731
    mib = lambda r, k: f"{r[k]['peak_memory_bytes'] / 2**20:.0f}"  # noqa: E731
    body = [
        [
            f"{r['seconds_per_item']:g}",
            ms(r, "stock"),
            ms(r, "dphubert"),
            *adam_cells(r),
            f"{1000 * r['dphubert']['teacher_forward_seconds']['median']:.0f}",
            f"{1000 * r['dphubert']['landing_seconds']['median']:.1f}",
            f"{r['time_ratio']:.2f}",
            f"{r['floor']:.2f}",
            mib(r, "stock"),
            mib(r, "dphubert"),
            f"{r['memory_ratio']:.2f}",
            r["stock"]["ops_per_update"],
            r["dphubert"]["ops_per_update"],
        ]
        for r in rows
    ]
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(
        f"\n{args.shape} shape, {args.precision}, {args.device}, batch {args.batch}, threads {torch.get_num_threads()}"
        + rounds
    )
    print(table(body, header))
    gathering = ", ".join(
        f"{r['dphubert']['gathering']['gates_gathering']}/{r['dphubert']['gathering']['gates']}"
        f" at {r['seconds_per_item']:g} s"
        for r in rows
    )
    print(
        f"stage-1 gates leaving their zero units out (as measure chose after the first update): {gathering}"
    )
    if len(rows) > 1:
        print("\nstage-1 update time against the shortest items: per update, and per second of audio")
        first = rows[0]["dphubert"]["update_seconds"]["median"]
        growth = []
        for r in rows:
            times = r["dphubert"]["update_seconds"]["median"] / first
            length = r["seconds_per_item"] / rows[0]["seconds_per_item"]
            growth.append([f"{r['seconds_per_item']:g}", f"{times:.2f}", f"{times / length:.2f}"])
        print(table(growth, ["s/item", "time x", "time per audio second x"]))
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items() if v is not None},
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
