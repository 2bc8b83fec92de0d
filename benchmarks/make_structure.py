"""Produce the pruned structure the inference benchmark uses: an actual stage-1 run at target sparsity 0.75 on a
HuBERT Base-shaped teacher (random weights, built from fairseq's own recipe and saved by its trainer), through
``fairseq-hydra-train --config-dir configs --config-name dphubert``, then ``dphubert-export``.

    python benchmarks/make_structure.py [--out benchmarks/structures/hubert_base_sp75.json] [--updates 400]

Writes the exported model's architecture (a ``dphubert`` model config: kept conv channels, heads and FFN units
per layer) with how it was produced. On 2 CPU cores the run takes about 15 minutes (2 x 1 s of real speech per
update). Only the structure matters to the benchmark: the weights of a random teacher carry no meaning.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

from harness import REPO, SHAPES, save_random_teacher, write_audio, write_json

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
    "expected_sparsity",
    "expected_macs_sparsity",
    "eval_sparsity",
    "eval_macs_sparsity",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(REPO, "benchmarks", "structures", "hubert_base_sp75.json")
    )
    parser.add_argument("--updates", type=int, default=400, help="stage-1 updates")
    parser.add_argument("--target", type=float, default=0.75, help="target sparsity")
    parser.add_argument(
        "--metric",
        choices=("params", "macs"),
        default="params",
        help="what the target counts (criterion.target_metric): parameters, or MACs of a 10 s utterance",
    )
    parser.add_argument(
        "--work", default=None, help="folder for data, teacher and checkpoints (default: temp)"
    )
    args = parser.parse_args()

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="dphubert-structure-"))
    print(f"working in {work}", flush=True)
    utterances, description = gather_speech(300, log=print)
    data = os.path.join(work, "data")
    write_manifests(utterances, data)
    teacher = save_random_teacher(
        os.path.join(work, "teacher.pt"), write_audio(os.path.join(work, "labels"), 2, 2.0), SHAPES["base"]
    )
    lrs = {"default": 5e-4, "gates": 0.1, "lagrangian": 0.1}
    overrides = [
        f"task.data={data}",
        f"task.teacher_path={teacher}",
        f"checkpoint.save_dir={work}/stage1",
        *cpu_overrides(min_sample_size=16000, max_tokens=32000, max_sample_size=16000, amp=False),
        "task.long_utterances=crop",  # 1 s windows of every utterance: a fixed cost per update on CPU
        *run_length(args.updates, 20),
        f"criterion.target_sparsity={args.target}",
        f"criterion.target_metric={args.metric}",
        f"criterion.sparsity_warmup_updates={args.updates * 2 // 3}",
        *composite_schedule(lrs, max(1, args.updates // 60)),
    ]
    command = hydra_train_command("configs", "dphubert", overrides)
    output = run_logged(command, os.path.join(work, "stage1.log"), cwd=REPO, show=print)
    summary_path = os.path.join(work, "pruned.json")
    run_logged(
        export_command(f"{work}/stage1/checkpoint_last.pt", f"{work}/pruned.pt", summary_path),
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
            "Base-shaped "
            f"teacher with random weights, {args.updates} updates of 2 x 1 s of {description}, CPU, fp32; "
            "then dphubert-export",
            "command": "python benchmarks/make_structure.py " + " ".join(sys.argv[1:]),
            "fairseq_overrides": overrides[3:],
            "date": datetime.date.today().isoformat(),
            "commit": commit,
            "eval_sparsity_at_end": float(valid[-1]["valid_eval_sparsity"]) if valid else None,
            "eval_macs_sparsity_at_end": float(valid[-1]["valid_eval_macs_sparsity"]) if valid else None,
            "stage1_curve": [
                {k: float(r[k]) for k in CURVE_KEYS if k in r} for r in records(output, "train_inner")
            ],
        },
        "summary": summary,
        "model_config": OmegaConf.to_container(OmegaConf.structured(pruned.cfg), enum_to_str=True),
    }
    write_json(args.out, result)
    print(
        f"sparsity {summary['sparsity']:.4f} ({summary['params']:,} of {summary['teacher_params']:,} params); "
        f"MACs sparsity {summary['macs_sparsity']:.4f} ({summary['macs']:,} of {summary['teacher_macs']:,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
