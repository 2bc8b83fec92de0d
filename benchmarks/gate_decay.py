"""How fast closed gates sink after the target's ramp, and which ``criterion.inactive_threshold`` a run of the
reference recipe's length needs to skip anything: read from a run recorded with
``make_structure.py --states-every N`` (each state has ``closed_units``: quantiles of log10 P(gate > 0) over
the units the eval mask closes).

    python benchmarks/make_structure.py --shape small --updates 4000 --ramp-fraction 0.1 --states-every 200 \\
        --out benchmarks/structures/hubert_small_sp75_long.json
    python benchmarks/gate_decay.py benchmarks/structures/hubert_small_sp75_long.json

A gate logit moves by at most about the learning rate per Adam step, so the fall is measured against the
gates' cumulative learning rate (the sum of the gate group's learning rate over the updates, from the run's
schedule), not the update count: over the states after the ramp, a least-squares line of each quantile of
log10 P in that sum. Extrapolated to the recipe (``configs/dphubert.yaml``: 50k updates, ramp 5k, gate
learning rate 0.02 warmed up over 15k and decayed linearly to 0), from the run's value at the end of its ramp:
where the median and the lowest tenth of the closed units are at the recipe's updates 10k, 20k and 50k, and
the recipe update at which each of ``make_structure.CLOSED_LADDER`` is crossed. Prints a table and writes
``--json``.
"""

import argparse
import json
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from harness import table, write_json
from make_structure import CLOSED_LADDER

#: the recipe's stage 1 (configs/dphubert.yaml)
RECIPE = {"max_update": 50_000, "ramp": 5_000, "warmup": 15_000, "gate_lr": 0.02}
#: recipe updates the extrapolation is reported at
AT = (10_000, 20_000, 50_000)
QUANTILES = ("median", "p10")


def schedule(lr: float, warmup: int, max_update: int) -> List[float]:
    """The gate group's learning rate at each update 0..max_update-1: fairseq's ``polynomial_decay`` with
    power 1 (linear warm-up from 0 to ``lr``, then linear decay to 0 at ``max_update``)."""
    out = []
    for t in range(max_update):
        if t < warmup:
            out.append(lr * t / warmup)
        else:
            out.append(lr * (max_update - t) / max(1, max_update - warmup))
    return out


def cumulative(rates: Sequence[float]) -> List[float]:
    """``sum(rates[:t])`` for t = 0..len(rates)."""
    out, total = [0.0], 0.0
    for r in rates:
        total += r
        out.append(total)
    return out


def line(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """(intercept, slope) of the least-squares line through ``points``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return my - slope * mx, slope


def run_schedule(overrides: Sequence[str]) -> Dict[str, float]:
    """The run's length, ramp, gate learning rate and warm-up from its fairseq overrides."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    return {
        "max_update": int(values["optimization.max_update"]),
        "ramp": int(values["criterion.sparsity_warmup_updates"]),
        "warmup": int(values["optimizer.groups.default.lr_scheduler.warmup_updates"]),
        "gate_lr": float(values["optimizer.groups.gates.lr_float"]),
    }


def analyse(run: Dict) -> Dict[str, object]:
    """The fall of each quantile after the ramp and its extrapolation to the recipe."""
    run_cfg = run_schedule(run["produced_by"]["fairseq_overrides"])
    states = [s for s in run["run_states"] if s.get("closed_units", {}).get("count")]
    if not states:
        raise ValueError("no state has closed_units: record the run with this make_structure.py")
    run_sum = cumulative(schedule(run_cfg["gate_lr"], run_cfg["warmup"], run_cfg["max_update"]))
    after = [s for s in states if s["num_updates"] >= run_cfg["ramp"]]
    if len(after) < 2:
        raise ValueError(
            f"fewer than 2 states after the ramp (update {run_cfg['ramp']}): a longer run is needed"
        )
    recipe_sum = cumulative(schedule(RECIPE["gate_lr"], RECIPE["warmup"], RECIPE["max_update"]))
    result: Dict[str, object] = {"run": run_cfg, "recipe": RECIPE, "quantiles": {}}
    for q in QUANTILES:
        points = [(run_sum[s["num_updates"]], s["closed_units"]["log10_p"][q]) for s in after]
        _, slope = line(points)
        start = after[0]["closed_units"]["log10_p"][q]
        start_sum = run_sum[after[0]["num_updates"]]
        span = run_sum[after[-1]["num_updates"]] - start_sum
        per_1k = slope * span / max(1, after[-1]["num_updates"] - after[0]["num_updates"]) * 1000

        def recipe_at(update: int) -> float:
            return start + slope * (recipe_sum[update] - recipe_sum[RECIPE["ramp"]])

        crossing: Dict[str, Optional[int]] = {}
        for threshold in CLOSED_LADDER:
            target = math.log10(threshold)
            crossing[f"{threshold:g}"] = next(
                (u for u in range(RECIPE["ramp"], RECIPE["max_update"] + 1, 100) if recipe_at(u) < target),
                None,
            )
        result["quantiles"][q] = {
            "at_ramp_end": start,
            "slope_per_unit_lr_sum": slope,
            "per_1k_updates_in_run": per_1k,
            "states": [(s["num_updates"], s["closed_units"]["log10_p"][q]) for s in states],
            "recipe_at": {str(u): recipe_at(u) for u in AT},
            "recipe_crossing_update": crossing,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("states", help="a make_structure.py --states-every output")
    parser.add_argument("--json", default="benchmarks/results/gate_decay.json")
    args = parser.parse_args()
    with open(args.states) as f:
        run = json.load(f)
    try:
        result = analyse(run)
    except (KeyError, ValueError) as e:
        print(f"gate_decay.py: error: {args.states}: {e}", file=sys.stderr)
        return 2
    cfg = result["run"]
    print(
        f"run: {cfg['max_update']} updates, ramp {cfg['ramp']}, gate lr {cfg['gate_lr']:g} (warm-up "
        f"{cfg['warmup']}); states with closed units:"
    )
    states = [s for s in run["run_states"] if s.get("closed_units", {}).get("count")]
    rows = [
        [s["num_updates"], s["closed_units"]["count"]]
        + [f"{s['closed_units']['log10_p'][k]:.2f}" for k in ("min", "p10", "median", "p90")]
        + [s["closed_units"]["below"][f"{t:g}"] for t in CLOSED_LADDER]
        for s in states
    ]
    header = ["update", "closed", "min", "p10", "median", "p90"] + [f"< {t:g}" for t in CLOSED_LADDER]
    print("log10 P(gate > 0) of the units the eval mask closes")
    print(table(rows, header))
    print()
    for q, r in result["quantiles"].items():
        at = ", ".join(f"{int(u) // 1000}k: {v:.1f}" for u, v in r["recipe_at"].items())
        crossed = ", ".join(
            f"{t} at {u // 1000 if u else '-'}{'k' if u else ''}"
            for t, u in r["recipe_crossing_update"].items()
        )
        print(
            f"{q}: log10 P falls {-r['per_1k_updates_in_run']:.2f} per 1k updates in the run after its ramp "
            f"({-r['slope_per_unit_lr_sum']:.3f} per unit of summed gate lr); extrapolated to the recipe "
            f"from {r['at_ramp_end']:.2f} at its ramp's end: {at}; thresholds crossed: {crossed}"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
