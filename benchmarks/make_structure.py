"""Produce the pruned structure the inference benchmark uses: an actual stage-1 run at target sparsity 0.75 on a
HuBERT Base-shaped teacher (random weights, built from fairseq's own recipe and saved by its trainer), through
``fairseq-hydra-train --config-dir configs --config-name dphubert``, then ``dphubert-export``.

    python benchmarks/make_structure.py [--out benchmarks/structures/hubert_base_sp75.json] [--updates 400]
    python benchmarks/make_structure.py --out benchmarks/structures/hubert_base_sp75_run.json --states-every 25

Writes the exported model's architecture (a ``dphubert`` model config: kept conv channels, heads and FFN units
per layer) with how it was produced. On 2 CPU cores the run takes about 15 minutes (2 x 1 s of real speech per
update). Only the structure matters to the benchmark: the weights of a random teacher carry no meaning.
With ``--states-every N`` it also keeps the gates' active sets (``models/inactive_units.py``) every N updates
of the run, for ``shrinking_update.py``. ``stage1_run`` is also what ``inactive_effect.py`` runs.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

from harness import REPO, SHAPES, encode_active, encode_logits, save_random_teacher, write_audio, write_json

from fairseq_runs import (
    composite_schedule,
    cpu_overrides,
    export_command,
    hydra_train_command,
    records,
    run_length,
    run_logged,
)
from fairseq_runs.speech import gather_speech, write_manifests

#: what the structure's file keeps of every logged stage-1 update (the curves behind the structure)
CURVE_KEYS = (
    "num_updates",
    "loss",
    "distill_loss",
    "expected_sparsity",
    "expected_macs_sparsity",
    "eval_sparsity",
    "eval_macs_sparsity",
    "expected_latency_sparsity",
    "eval_latency_sparsity",
    "active_heads",
    "active_ffn_units",
    "active_conv_channels",
    "active_macs_ratio",
    "train_wall",
)
#: the learning rates of the compressed run (the recipe's 2e-4 / 0.02 / 0.02 over 50k updates)
LRS = {"default": 5e-4, "gates": 0.1, "lagrangian": 0.1}


def prepare(work: str, shape: str) -> Tuple[str, str, str]:
    """(manifest folder, teacher checkpoint, speech description) under ``work``: 300 utterances of real speech
    and a random-weight teacher of ``shape`` (``harness.SHAPES``); reused when ``work`` has them."""
    utterances, description = gather_speech(300, log=print)
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "train.tsv")):
        write_manifests(utterances, data)
    teacher = os.path.join(work, f"teacher_{shape}.pt")
    if not os.path.exists(teacher):
        save_random_teacher(teacher, write_audio(os.path.join(work, "labels"), 2, 2.0), SHAPES[shape])
    return data, teacher, description


def stage1_overrides(
    data: str,
    teacher: str,
    save_dir: str,
    updates: int,
    target: float,
    metric: str = "params",
    states_every: int = 0,
    seed: int = 1337,
    extra: Sequence[str] = (),
    ramp: float = 2 / 3,
) -> List[str]:
    """The compressed stage 1: ``updates`` updates of 2 x 1 s, the target ramped over a ``ramp`` fraction of
    them (two thirds; the recipe's is a tenth), logged every 20; with ``states_every``, a checkpoint every that
    many updates (all kept)."""
    overrides = [
        f"task.data={data}",
        f"task.teacher_path={teacher}",
        f"checkpoint.save_dir={save_dir}",
        *cpu_overrides(min_sample_size=16000, max_tokens=32000, max_sample_size=16000, amp=False),
        "task.long_utterances=crop",  # 1 s windows of every utterance: a fixed cost per update on CPU
        *run_length(updates, 20),
        f"criterion.target_sparsity={target}",
        f"criterion.target_metric={metric}",
        f"criterion.sparsity_warmup_updates={int(updates * ramp)}",
        # the inactive-unit checks scaled to the compressed run (the recipe's every 100 of 50k updates)
        "criterion.inactive_check_interval=2",
        *composite_schedule(LRS, max(1, updates // 60)),
        f"common.seed={seed}",
    ]
    if states_every:  # instead of run_length's one save at the end
        overrides = [o for o in overrides if not o.startswith("checkpoint.save_interval_updates=")]
        overrides += [
            f"checkpoint.save_interval_updates={states_every}",
            "checkpoint.keep_interval_updates=-1",
        ]
    return overrides + list(extra)


def stage1_run(work: str, name: str, overrides: Sequence[str]) -> str:
    """Run stage 1 with ``overrides`` (``stage1_overrides``), logging to ``work/name.log``; its output."""
    command = hydra_train_command("configs", "dphubert", overrides)
    return run_logged(command, os.path.join(work, f"{name}.log"), cwd=REPO, show=print)


#: thresholds on P(gate > 0) the closed units are counted against (``closed_units``)
CLOSED_LADDER = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def closed_units(model) -> Dict[str, object]:
    """How far the closed units' gates have sunk: over the units of every unit gate (not the whole-block ones)
    that the eval mask closes, their count, quantiles of log10 P(gate > 0) (from the logits, inactive units
    included) and how many are below each of ``CLOSED_LADDER``."""
    import torch

    from dphubert_fairseq.models.hard_concrete import prob_open

    logs = []
    for gate in model.gates().values():
        if gate.n > 1:
            closed = gate.deterministic_mask() == 0
            logs.append(prob_open(gate.log_alpha.detach().float())[closed].clamp_min(1e-30).log10())
    values = torch.cat(logs) if logs else torch.zeros(0)
    if not values.numel():
        return {"count": 0}
    quantiles = torch.quantile(values.double(), torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.double))
    return {
        "count": int(values.numel()),
        "log10_p": dict(zip(("min", "p10", "median", "p90"), quantiles.tolist())),
        "below": {f"{t:g}": int((values < torch.log10(torch.tensor(t))).sum()) for t in CLOSED_LADDER},
    }


def gate_states(save_dir: str) -> List[Dict[str, object]]:
    """The active sets of every interval checkpoint in ``save_dir`` and of its last one, in update order: per
    checkpoint its update, the active fractions and MACs, each gate's active set (``harness.encode_active``)
    and logits (``harness.encode_logits``: what its samples draw, for ``shrinking_update.py``) and how far the closed units' gates have sunk (``closed_units``)."""
    import glob

    from fairseq import checkpoint_utils

    from dphubert_fairseq.checkpoint_io import read_student_checkpoint

    states = {}
    for path in glob.glob(os.path.join(save_dir, "checkpoint_*_*.pt")) + [f"{save_dir}/checkpoint_last.pt"]:
        state = read_student_checkpoint(path)
        updates = state["optimizer_history"][-1]["num_updates"]
        if updates in states:
            continue
        model = checkpoint_utils.load_model_ensemble_and_task([path], state=state)[0][0]
        states[updates] = {
            "num_updates": updates,
            "active_fractions": model.active_fractions(),
            "active_macs_ratio": model.active_macs() / model.cfg.teacher_macs,
            "active": {name: encode_active(gate.active) for name, gate in model.gates().items()},
            "log_alpha": {name: encode_logits(gate.log_alpha) for name, gate in model.gates().items()},
            "closed_units": closed_units(model),
        }
    return [states[u] for u in sorted(states)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "structures", "hubert_base_sp75.json")
    )
    parser.add_argument("--updates", type=int, default=400, help="stage-1 updates")
    parser.add_argument("--target", type=float, default=0.75, help="target sparsity")
    parser.add_argument(
        "--metric",
        choices=("params", "macs", "latency"),
        default="params",
        help="what the target counts (criterion.target_metric): parameters, MACs of a 10 s utterance, or the "
        "time --latency-table predicts",
    )
    parser.add_argument(
        "--latency-table",
        default=None,
        help="criterion.latency_table: a dphubert-profile table of the teacher's shape (with --metric latency)",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base", help="the teacher's shape")
    parser.add_argument(
        "--states-every", type=int, default=0, help="keep the gates' active sets every N updates (0: none)"
    )
    parser.add_argument(
        "--ramp-fraction",
        type=float,
        default=2 / 3,
        help="the target's ramp as a fraction of --updates (default two thirds; the recipe's is 0.1)",
    )
    parser.add_argument(
        "--inactive-threshold",
        type=float,
        default=None,
        help="criterion.inactive_threshold (default: the config's)",
    )
    parser.add_argument(
        "--conv-gate-init-drop-rate",
        type=float,
        default=None,
        help="model.conv_gate_init_drop_rate (default: the config's, the reference's 0.01)",
    )
    parser.add_argument(
        "--work", default=None, help="folder for data, teacher and checkpoints (default: temp)"
    )
    args = parser.parse_args()

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="dphubert-structure-"))
    print(f"working in {work}", flush=True)
    data, teacher, description = prepare(work, args.shape)
    save_dir = os.path.join(work, "stage1")
    extra = [f"criterion.inactive_threshold={args.inactive_threshold}"] if args.inactive_threshold else []
    if args.conv_gate_init_drop_rate is not None:
        extra.append(f"model.conv_gate_init_drop_rate={args.conv_gate_init_drop_rate}")
    if args.latency_table:
        extra.append(f"criterion.latency_table={os.path.abspath(args.latency_table)}")
    overrides = stage1_overrides(
        data,
        teacher,
        save_dir,
        args.updates,
        args.target,
        args.metric,
        args.states_every,
        extra=extra,
        ramp=args.ramp_fraction,
    )
    output = stage1_run(work, "stage1", overrides)
    summary_path = os.path.join(work, "pruned.json")
    run_logged(
        export_command(f"{save_dir}/checkpoint_last.pt", f"{work}/pruned.pt", summary_path),
        os.path.join(work, "export.log"),
        cwd=REPO,
        show=print,
    )
    from dphubert_fairseq import load_model

    pruned = load_model(os.path.join(work, "pruned.pt"))
    with open(summary_path) as f:
        summary = json.load(f)
    valid = records(output, "valid")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    from omegaconf import OmegaConf

    result = {
        "produced_by": {
            "what": f"stage 1 (configs/dphubert.yaml) at target {args.metric} sparsity {args.target} on a HuBERT "
            f"{args.shape.capitalize()}-shaped "
            f"teacher with random weights, {args.updates} updates of 2 x 1 s of {description}, CPU, fp32; "
            "then dphubert-export",
            "command": "python benchmarks/make_structure.py " + " ".join(sys.argv[1:]),
            "fairseq_overrides": overrides[3:],
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "eval_sparsity_at_end": float(valid[-1]["valid_eval_sparsity"]) if valid else None,
            "eval_macs_sparsity_at_end": float(valid[-1]["valid_eval_macs_sparsity"]) if valid else None,
            "eval_latency_sparsity_at_end": float(valid[-1]["valid_eval_latency_sparsity"])
            if valid and "valid_eval_latency_sparsity" in valid[-1]
            else None,
            "valid_distill_loss_at_end": float(valid[-1]["valid_distill_loss"]) if valid else None,
            "stage1_curve": [
                {k: float(r[k]) for k in CURVE_KEYS if k in r} for r in records(output, "train_inner")
            ],
        },
        "summary": summary,
        "model_config": OmegaConf.to_container(OmegaConf.structured(pruned.cfg), enum_to_str=True),
    }
    if args.states_every:
        result["run_states"] = gate_states(save_dir)
    write_json(args.out, result)
    print(
        f"sparsity {summary['sparsity']:.4f} ({summary['params']:,} of {summary['teacher_params']:,} params); "
        f"MACs sparsity {summary['macs_sparsity']:.4f} ({summary['macs']:,} of {summary['teacher_macs']:,})"
        + (f"; latency sparsity {summary['latency_sparsity']:.4f}" if "latency_sparsity" in summary else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
