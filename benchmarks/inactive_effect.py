"""Does leaving inactive units out change the result? Stage 1 with and without it (same seed), against the
run-to-run noise of stage 1 itself (the same run again, and another seed).

    python benchmarks/inactive_effect.py [--shape small] [--updates 400] [--work DIR]

Runs ``make_structure.py``'s compressed stage 1 (target sparsity 0.75, real speech, random-weight teacher of
``--shape``) four times: ``skip`` (criterion.skip_inactive_units=true, the default), ``keep`` (false, the
reference's behaviour), ``keep again`` (the same command once more: CPU training is not bit-reproducible, so
this is the noise of one seed) and ``keep seed 2``. For each pair it reports the logged distillation loss
(mean relative difference over the logged updates, and at the end), the final validation loss and sparsity,
and the final structure: the overlap (Jaccard index) of the units the eval masks keep, and the per-layer size
differences. Writes ``benchmarks/results/inactive_effect.json``.
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, List

from harness import machine, table, write_json
from make_structure import prepare, stage1_overrides, stage1_run

from fairseq_runs import records

RUNS = {
    "skip": ("criterion.skip_inactive_units=true", 1337),
    "keep": ("criterion.skip_inactive_units=false", 1337),
    "keep again": ("criterion.skip_inactive_units=false", 1337),
    "keep seed 2": ("criterion.skip_inactive_units=false", 2),
}
PAIRS = [("skip", "keep"), ("keep", "keep again"), ("keep", "keep seed 2")]


def kept_units(checkpoint: str) -> Dict[str, List[int]]:
    """Per gate, the units its eval mask keeps (what the export keeps)."""
    from dphubert_fairseq import load_model

    model = load_model(checkpoint)
    return {
        name: (gate.deterministic_mask() > 0).nonzero().flatten().tolist()
        for name, gate in model.gates().items()
    }


def summarise(output: str, save_dir: str) -> Dict[str, object]:
    train = records(output, "train_inner")
    valid = records(output, "valid")[-1]
    return {
        "curve": {int(r["num_updates"]): float(r["distill_loss"]) for r in train},
        "active_macs_ratio": {int(r["num_updates"]): float(r["active_macs_ratio"]) for r in train},
        "train_wall": sum(float(r["train_wall"]) for r in train),
        "valid_loss": float(valid["valid_distill_loss"]),
        "valid_eval_sparsity": float(valid["valid_eval_sparsity"]),
        "kept": kept_units(os.path.join(save_dir, "checkpoint_last.pt")),
    }


def compare(a: Dict[str, object], b: Dict[str, object]) -> Dict[str, float]:
    updates = sorted(set(a["curve"]) & set(b["curve"]))
    relative = [abs(a["curve"][u] - b["curve"][u]) / abs(b["curve"][u]) for u in updates]
    union = inter = size_diff = 0
    for name, units in a["kept"].items():
        x, y = set(units), set(b["kept"][name])
        union += len(x | y)
        inter += len(x & y)
        size_diff += abs(len(x) - len(y))
    return {
        "loss_mean_relative_difference": sum(relative) / len(relative),
        "loss_relative_difference_at_end": relative[-1],
        "valid_loss_relative_difference": abs(a["valid_loss"] - b["valid_loss"]) / abs(b["valid_loss"]),
        "eval_sparsity_difference": abs(a["valid_eval_sparsity"] - b["valid_eval_sparsity"]),
        "kept_units_jaccard": inter / union if union else 1.0,
        "kept_units_size_difference": size_diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", help="the teacher's shape (harness.SHAPES)")
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument(
        "--threshold", type=float, default=None, help="criterion.inactive_threshold (default: the config's)"
    )
    parser.add_argument("--work", default=None, help="folder for data, teacher and runs (default: temp)")
    parser.add_argument("--json", default="benchmarks/results/inactive_effect.json")
    args = parser.parse_args()

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="dphubert-inactive-effect-"))
    print(f"working in {work}", flush=True)
    data, teacher, description = prepare(work, args.shape)
    runs: Dict[str, Dict[str, object]] = {}
    for name, (switch, seed) in RUNS.items():
        save_dir = os.path.join(work, name.replace(" ", "_"))
        extra = [switch] + ([f"criterion.inactive_threshold={args.threshold}"] if args.threshold else [])
        overrides = stage1_overrides(
            data, teacher, save_dir, args.updates, args.target, seed=seed, extra=extra
        )
        runs[name] = summarise(stage1_run(work, name.replace(" ", "_"), overrides), save_dir)
    comparisons = {f"{a} vs {b}": compare(runs[a], runs[b]) for a, b in PAIRS}
    keys = list(next(iter(comparisons.values())))
    print(table([[pair] + [f"{c[k]:.4g}" for k in keys] for pair, c in comparisons.items()], ["pair"] + keys))
    print(
        table(
            [
                [
                    name,
                    f"{r['valid_loss']:.4f}",
                    f"{r['valid_eval_sparsity']:.4f}",
                    f"{min(r['active_macs_ratio'].values()):.3f}",
                    f"{r['train_wall']:.0f}",
                ]
                for name, r in runs.items()
            ],
            ["run", "valid distill loss", "eval sparsity", "active MACs at end", "train wall s"],
        )
    )
    effect = comparisons["skip vs keep"]
    noise = [comparisons["keep vs keep again"], comparisons["keep vs keep seed 2"]]
    within = {k: effect[k] <= max(n[k] for n in noise) for k in keys if k != "kept_units_jaccard"}
    within["kept_units_jaccard"] = effect["kept_units_jaccard"] >= min(n["kept_units_jaccard"] for n in noise)
    verdict = all(within.values())
    print(
        "skipping inactive units is within the run-to-run noise on every measure"
        if verdict
        else "skipping inactive units differs by more than the noise on: "
        + ", ".join(k for k, ok in within.items() if not ok)
    )
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": vars(args) | {"data": description},
            "runs": {name: {k: v for k, v in r.items() if k != "kept"} for name, r in runs.items()},
            "comparisons": comparisons,
            "within_noise": within,
            "verdict_within_noise": verdict,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
