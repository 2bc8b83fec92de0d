"""Stage-1 update cost as the model shrinks: the gates recorded along a real stage-1 run (``make_structure.py
--states-every N``) applied to a HuBERT Base-shaped student, each timed against ``today``, a stage-1 update
that computes every unit (``criterion.inactive_compute=mask``: the reference's computation), and a stock
fairseq HuBERT update on the same batch; then the whole run's and the reference recipe's cost estimated from
those measurements.

    python benchmarks/shrinking_update.py                        # CPU: Base shape, fp32, 2 x 4 s
    python benchmarks/shrinking_update.py --at 100 200 400       # the recorded states nearest these updates
    python benchmarks/shrinking_update.py --device cuda          # Base shape, AMP as the recipe, 16 x 10 s
    python benchmarks/shrinking_update.py --at 67 --paired 3     # as chosen against all masked, in one process

Stage 1 is ``configs/dphubert.yaml``, stock is fairseq's ``hubert_base_librispeech.yaml`` (as
``training_step.py``); the teacher is a random HuBERT Base. Each measurement runs in its own process on the
same batch: ``stock``, ``today`` and one ``state`` per measured update, whose active sets
(``models/inactive_units.py``) and, where recorded, logits are set on the student's gates before timing: an
update then leaves out the inactive units and those whose sample is 0 (``--inactive-compute``, per block
where that pays). In every stage-1 worker ``criterion.inactive_check_interval`` is set beyond the timed
updates, so no check changes the sets.
By default the measured states are those nearest the run's start (its first recorded state), the middle of
the target's ramp (``criterion.sparsity_warmup_updates``), the end of the ramp and the end of the run
(``optimization.max_update``), read from the run's overrides.

The estimate fits the update time as a line in the computed MACs ratio (the expected MACs under the state's
gates over the teacher's; the active-MACs ratio for states recorded without logits; today at 1.0 and every
measured state,
least squares with neither the fixed part nor the slope below 0) and applies it to every recorded state of the
run (piecewise constant from one recorded state to the next; all units active before the first): (a) the
recorded run itself, against ``max_update`` of today's updates; (b) the reference recipe (50k updates, target
ramp 5k): the run's updates [0, ramp] mapped linearly onto the recipe's [0, 5k], and the run's last state for
every update after it, against 50k of today's updates. Today's update is the line at 1.0 (the JSON also has
the ratios to the measured one). (b) is conservative: in a real run gates keep closing after the ramp.
Neither counts the landing phase's search (``training_step.py`` measures it), validation or checkpoints.
"""

import argparse
import bisect
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from harness import (
    REPO,
    SAMPLE_RATE,
    SHAPES,
    PeakMemory,
    add_round_arguments,
    batch_overrides,
    decode_active,
    decode_logits,
    device_overrides,
    fold_round,
    gathering_summary,
    machine,
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

DEFAULT_STATES = os.path.join(REPO, "benchmarks", "structures", "hubert_base_sp75_logits_run.json")
#: the reference recipe (configs/dphubert.yaml): its length and its target's ramp
RECIPE_UPDATES = 50_000
RECIPE_RAMP = 5_000
#: checks for inactive units every this many updates: never while timing
NO_CHECKS = 1_000_000
#: goals: the update at the end of the ramp against today's stage-1 update, and (CUDA) against stock
GOAL_TODAY = 0.6
GOAL_STOCK = 0.9
#: the default states' labels: the first recorded state, mid-ramp, ramp end, max_update (``run_landmarks``)
LANDMARKS = ("run start", "mid-ramp", "ramp end", "run end")


# ----- the recorded run -----


class StatesError(ValueError):
    """The states file cannot be used; the message is one line."""


def load_run(path: str) -> Dict:
    """The states file ``make_structure.py --states-every`` writes, with its run's length and ramp:
    ``{"states": [...], "max_update": int, "warmup": int, "overrides": {...}}``."""
    if not os.path.exists(path):
        raise StatesError(
            f"no states file {path} (python benchmarks/make_structure.py --out {path} --states-every 25 writes it)"
        )
    with open(path) as f:
        recorded = json.load(f)
    states = recorded.get("run_states")
    if not states:
        raise StatesError(f"{path} has no run_states (make_structure.py --states-every N writes them)")
    states = sorted(states, key=lambda s: s["num_updates"])
    overrides = run_overrides(recorded.get("produced_by", {}).get("fairseq_overrides", []))
    max_update = int(overrides.get("optimization.max_update", states[-1]["num_updates"]))
    warmup = overrides.get("criterion.sparsity_warmup_updates", "null")
    # the criterion's default ramp: a tenth of the run
    warmup = max_update // 10 if warmup in ("null", "None", "") else int(warmup)
    return {"states": states, "max_update": max_update, "warmup": warmup, "overrides": overrides}


def run_overrides(overrides: Sequence[str]) -> Dict[str, str]:
    """``key=value`` overrides as a dict (the last of a repeated key wins, as hydra's)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep:
            out[key.lstrip("+")] = value
    return out


def nearest_state(states: List[Dict], update: float) -> Dict:
    """The recorded state nearest ``update`` (the earlier one on a tie)."""
    return min(states, key=lambda s: (abs(s["num_updates"] - update), s["num_updates"]))


def run_landmarks(run: Dict) -> Dict[str, int]:
    """The recorded update nearest each of ``LANDMARKS``: the first state, warmup / 2, warmup, max_update."""
    states = run["states"]
    where = (states[0]["num_updates"], run["warmup"] / 2, run["warmup"], run["max_update"])
    return {label: nearest_state(states, u)["num_updates"] for label, u in zip(LANDMARKS, where)}


def pick_updates(run: Dict, at: Optional[Sequence[int]]) -> List[int]:
    """The recorded updates to measure, in order: nearest each of ``at``, or the landmarks."""
    wanted = at if at else list(run_landmarks(run).values())
    return sorted({nearest_state(run["states"], u)["num_updates"] for u in wanted})


def state_at(run: Dict, update: int) -> Dict:
    return next(s for s in run["states"] if s["num_updates"] == update)


def shown(path: str) -> str:
    """``path`` relative to the checkout when it lies in it."""
    relative = os.path.relpath(path, REPO)
    return path if relative.startswith("..") else relative


def apply_state(model, state: Dict) -> None:
    """Set every gate's active set to the recorded one (``gate.set_active``) and, where the state has them,
    its logits (what the update's gate samples draw, so which units it leaves out). Raises ``StatesError``
    (one line, naming the gate) where the state's gates are not the model's, by name or by size."""
    gates = model.gates()
    recorded = state["active"]
    where = f"state at update {state['num_updates']}"
    for name in recorded:
        if name not in gates:
            raise StatesError(
                f"{where}: gate {name} is not a gate of the student (another shape or prune_units?)"
            )
    for name, gate in gates.items():
        if name not in recorded:
            raise StatesError(f"{where}: the student's gate {name} has no recorded active set")
        try:
            data = bytes.fromhex(recorded[name])
        except ValueError:
            raise StatesError(f"{where}: gate {name}: the recorded set is not hex") from None
        bits = decode_active(recorded[name], 8 * len(data))
        if len(data) != (gate.n + 7) // 8 or bits[gate.n :].any():
            raise StatesError(
                f"{where}: gate {name} has {gate.n} units in the student, the recorded set another number"
            )
    logits = state.get("log_alpha", {})
    for name, gate in gates.items():
        gate.set_active(decode_active(recorded[name], gate.n).to(gate.active.device))
        if logits:
            try:
                values = decode_logits(logits[name], gate.n)
            except (KeyError, ValueError) as e:
                raise StatesError(f"{where}: gate {name}: no usable recorded logits ({e})") from None
            with torch.no_grad():
                gate.log_alpha.copy_(values.to(gate.log_alpha.device))


def computed_macs_ratio(model) -> float:
    """The MACs ratio an update of ``model`` computes on average: the expected MACs under its gates (the
    units whose sample is 0 are left out, inactive ones never count) over the teacher's."""
    with torch.no_grad():
        return float(model.expected_size("macs")) / model.cfg.teacher_macs


def active_macs_ratio(model) -> float:
    return model.active_macs() / model.cfg.teacher_macs


# ----- the estimate -----


def fit_line(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = intercept + slope * x``; a constant where every x is equal."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def fit_cost(points: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """``fit_line`` with neither part negative: an update costs a fixed part (the teacher, the optimizer, what
    no gate removes) plus a part that grows with the MACs it computes. A negative fitted slope (less compute
    measured slower) or intercept is noise in the timings; the least-squares fit on that boundary replaces it
    (slope 0: the mean; intercept 0: a line through the origin)."""
    intercept, slope = fit_line(points)
    if slope < 0:
        return sum(y for _, y in points) / len(points), 0.0
    if intercept < 0:
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return intercept, slope


def ratio_of(state: Dict) -> float:
    """What an update at ``state`` computes: its ``computed_macs_ratio`` (set by ``check_states`` where the
    state has logits), else its active-MACs ratio."""
    return state.get("computed_macs_ratio", state["active_macs_ratio"])


class RatioAlongRun:
    """The MACs ratio the update ``u`` (0-based: the model has made ``u`` updates) computes with (``ratio_of``):
    that of the last recorded state at or before ``u``, all active (1.0) before the first."""

    def __init__(self, states: List[Dict]) -> None:
        self.updates = [s["num_updates"] for s in states]
        self.ratios = [ratio_of(s) for s in states]

    def __call__(self, u: float) -> float:
        i = bisect.bisect_right(self.updates, u) - 1
        return 1.0 if i < 0 else self.ratios[i]


def estimate(run: Dict, fit: Tuple[float, float], today: float) -> Dict[str, Dict]:
    """Estimated stage-1 totals (seconds of updates) from the fitted line: the recorded run, and the reference
    recipe with the run's ramp mapped onto the recipe's and the run's last state after it. ``ratio`` compares
    with the fitted line at 1.0 (every unit active), ``ratio_to_measured_today`` with ``today`` seconds."""
    intercept, slope = fit
    seconds = lambda r: intercept + slope * r  # noqa: E731
    ratio_at = RatioAlongRun(run["states"])
    fitted_today = seconds(1.0)

    def totals(ratios: List[float], what: str) -> Dict:
        # the line is linear: the total is its value at the mean ratio, taken so (and the mean with fsum) that
        # rounding keeps a run that never computes more than today at most today's cost
        n = len(ratios)
        mean = math.fsum(ratios) / n
        per_update = seconds(mean)
        return {
            "what": what,
            "updates": n,
            "mean_active_macs_ratio": mean,
            "estimated_seconds": n * per_update,
            "all_active_seconds": n * fitted_today,
            "ratio": per_update / fitted_today,
            "ratio_to_measured_today": per_update / today,
        }

    run_ratios = [ratio_at(u) for u in range(run["max_update"])]
    scale = run["warmup"] / RECIPE_RAMP
    last = ratio_of(run["states"][-1])
    recipe_ratios = [ratio_at(v * scale) for v in range(RECIPE_RAMP)]
    recipe_ratios += [last] * (RECIPE_UPDATES - RECIPE_RAMP)
    return {
        "run": totals(run_ratios, f"the recorded run: {run['max_update']} updates, ramp {run['warmup']}"),
        "recipe": totals(
            recipe_ratios,
            f"the reference recipe: {RECIPE_UPDATES} updates, ramp {RECIPE_RAMP}; the run's updates "
            f"[0, {run['warmup']}] mapped onto [0, {RECIPE_RAMP}], then the run's last state (update "
            f"{run['states'][-1]['num_updates']}) for every later update: conservative, since in a real run "
            "gates keep closing after the ramp",
        ),
    }


# ----- one measurement per process -----


def worker(args) -> Dict:
    """One measurement in this process: 'stock', 'today' or 'state' (at ``args.update``) on the fixed batch."""
    memory = PeakMemory(args.device)
    torch.manual_seed(0)
    common = device_overrides(args.device, args.precision) + batch_overrides(args.batch, args.item_seconds)
    mode = "mask" if args.worker == "today" else args.mode  # today: every unit computed, as the reference
    no_checks = [f"criterion.inactive_check_interval={NO_CHECKS}", f"criterion.inactive_compute={mode}"]
    cfg = update_config(
        "stock" if args.worker == "stock" else "dphubert",
        args.data,
        args.teacher,
        SHAPES["base"],
        common,
        no_checks,
    )
    trainer, task, sample = trainer_on_batch(cfg, args.batch, args.item_seconds)
    result: Dict = {}
    if args.worker != "stock":
        model = trainer.get_model()
        if args.worker == "state":
            apply_state(model, state_at(load_run(args.states), args.update))
            model.choose_gathering(args.mode, (args.batch, round(args.item_seconds * SAMPLE_RATE)))
            result["gathering"] = gathering_summary(model)
        result["active_fractions"] = model.active_fractions()
        result["active_macs_ratio"] = active_macs_ratio(model)
        computes_all = args.worker == "today" or args.mode == "mask"
        result["computed_macs_ratio"] = 1.0 if computes_all else computed_macs_ratio(model)
    result.update(time_updates(trainer, sample, memory, args.device, args.warmup, args.repeat)[1])
    if args.worker == "state" and args.paired:
        result["paired"] = paired_with_masked(trainer, sample, model, args)
    if args.worker != "stock":
        forward = teacher_forward(trainer, task, sample, args.precision)
        result["teacher_forward_seconds"] = time_calls(forward, args.device, 1, args.repeat)
        if model.active_fractions() != result["active_fractions"]:
            raise RuntimeError("the active sets changed while timing")  # a check ran: see NO_CHECKS
    return result


def paired_with_masked(trainer, sample, model, args) -> Dict:
    """The state's update as its gates chose (``gather_below``: the zero units left out where that pays)
    against the same state with every unit computed and masked (``gather_below`` 0: today's computation), in
    this one process, alternating ``args.paired`` times (every other round masked first): both share the
    process, its memory and its moment, so their ratio is free of the noise between processes."""
    step = lambda: trainer.train_step([sample])  # noqa: E731
    gates = list(model.gates().values())
    chosen = [g.gather_below for g in gates]
    times: Dict[str, List[float]] = {"chosen": [], "masked": []}
    try:
        for round_ in range(args.paired):
            for kind in ("chosen", "masked") if round_ % 2 == 0 else ("masked", "chosen"):
                for gate, below in zip(gates, chosen):
                    gate.gather_below = below if kind == "chosen" else 0.0
                times[kind].append(time_calls(step, args.device, args.warmup, args.repeat)["median"])
    finally:
        for gate, below in zip(gates, chosen):
            gate.gather_below = below
    ratio = statistics.median(times["chosen"]) / statistics.median(times["masked"])
    return {"chosen_seconds": times["chosen"], "masked_seconds": times["masked"], "ratio": ratio}


# ----- the invocation -----


def check_states(run: Dict, teacher: str) -> List[str]:
    """Refuse (``StatesError``) states whose gates are not those of the student made from ``teacher`` with the
    recipe's ``prune_units``; warn where a recorded active-MACs ratio differs from the one counted now. Sets
    ``computed_macs_ratio`` on the states that have logits."""
    from omegaconf import OmegaConf

    from dphubert_fairseq import student_from_teacher

    units = OmegaConf.load(os.path.join(REPO, "configs", "dphubert.yaml")).model.prune_units
    student = student_from_teacher(teacher, list(units))
    warnings = []
    for state in run["states"]:
        apply_state(student, state)
        if "log_alpha" in state:
            state["computed_macs_ratio"] = computed_macs_ratio(student)
        counted = active_macs_ratio(student)
        if abs(counted - state["active_macs_ratio"]) > 1e-9:
            warnings.append(
                f"warning: state at update {state['num_updates']}: recorded active MACs ratio "
                f"{state['active_macs_ratio']:.6f}, counted now {counted:.6f}; the estimate uses the recorded one"
            )
    return warnings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", default=DEFAULT_STATES, help="the run's states (make_structure.py)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "amp", "fp16", "bf16"],
        default=None,
        help="default: fp32 on CPU, amp (the recipe's) on CUDA",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="items per batch (default: 2 on CPU, 16 on CUDA)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per item (default: 4 on CPU, 10 on CUDA)"
    )
    add_round_arguments(parser)
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time each state, in its own process, as its gates chose against every unit computed masked "
        "(today's computation), alternating this many rounds: 'x masked', free of the noise between processes",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--json", default="benchmarks/results/shrinking_update.json")
    parser.add_argument(
        "--at",
        type=int,
        nargs="+",
        default=None,
        metavar="UPDATES",
        help="measure the recorded states nearest these updates (default: the run's start, the middle and the "
        "end of the target's ramp, and the end of the run)",
    )
    parser.add_argument(
        "--inactive-compute",
        nargs="+",
        choices=["measure", "gather", "mask"],
        default=["measure"],
        help="criterion.inactive_compute for the states, each a row (the first for the goal and the fit)",
    )
    parser.add_argument("--worker", choices=["stock", "today", "state"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="measure", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--update", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--item-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.precision = args.precision or ("amp" if gpu else "fp32")
    args.batch = args.batch or (16 if gpu else 2)
    args.seconds = args.seconds or (10.0 if gpu else 4.0)
    args.states = os.path.abspath(args.states)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    try:
        run = load_run(args.states)
        updates = pick_updates(run, args.at)
    except StatesError as e:
        print(f"shrinking_update.py: error: {e}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="dphubert-bench-")
    try:
        return measure(args, run, updates, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the teacher checkpoint and the audio


def measure(args, run: Dict, updates: List[int], work: str) -> int:
    """Save the teacher and the batch under ``work``, run the workers, print and write the results."""
    gpu = args.device == "cuda"
    landmarks = run_landmarks(run)
    teacher = random_teacher_in(work, SHAPES["base"])
    try:
        notes = check_states(run, teacher)
    except StatesError as e:
        print(f"shrinking_update.py: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    data = write_audio(os.path.join(work, "data"), args.batch, args.seconds)
    shared = worker_args(args, teacher) + ["--states", args.states, "--data", data]
    shared += ["--item-seconds", str(args.seconds), "--paired", str(args.paired)]

    modes = args.inactive_compute
    rows: List[Dict] = []
    plan = [("stock", None, None), ("today", None, None)] + [("state", u, m) for u in updates for m in modes]
    for round_ in range(args.rounds):  # the whole plan again: slow spells of the machine hit every kind alike
        for i in round_order(len(plan), round_):
            kind, update, mode = plan[i]
            extra = ["--worker", kind] + ([] if update is None else ["--update", str(update), "--mode", mode])
            measured = run_worker(__file__, shared + extra)
            if round_:
                fold_round(rows[i], measured, ["update_seconds"])
                if "paired" in measured:  # every round's paired timings, one ratio of their medians
                    pair = rows[i]["paired"]
                    for key in ("chosen_seconds", "masked_seconds"):
                        pair[key] += measured["paired"][key]
                    pair["ratio"] = statistics.median(pair["chosen_seconds"]) / statistics.median(
                        pair["masked_seconds"]
                    )
                continue
            measured = fold_round(None, measured, ["update_seconds"])
            roles = [label for label, u in landmarks.items() if update is not None and u == update]
            row = {"kind": kind, "num_updates": update, "roles": roles, "inactive_compute": mode, **measured}
            if update is not None:
                row["recorded_active_macs_ratio"] = state_at(run, update)["active_macs_ratio"]
                row["logits_recorded"] = "log_alpha" in state_at(run, update)
            rows.append(row)
            print(
                f"measured {kind}" + ("" if update is None else f" at update {update} ({mode})"), flush=True
            )
    primary = [r for r in rows[2:] if r["inactive_compute"] == modes[0]]
    median = lambda r: r["update_seconds"]["median"]  # noqa: E731
    stock, today = rows[0], rows[1]
    for row in rows:
        row["x_today"] = median(row) / median(today)
        row["x_stock"] = median(row) / median(stock)

    # the table
    in_seconds = max(median(r) for r in rows) >= 1.0
    unit = "s" if in_seconds else "ms"
    fmt = (lambda t: f"{t:.2f}") if in_seconds else (lambda t: f"{1000 * t:.0f}")
    header = [
        "kind",
        "at update",
        f"update {unit}",
        "x today",
        "x stock",
        f"teacher fwd {unit}",
        "peak MiB",
        "heads",
        "FFN units",
        "conv ch",
        "MACs ratio",
        "computed",
        "gathered",
    ] + (["x masked"] if args.paired else [])
    body = []
    for r in rows:
        fractions = r.get("active_fractions", {})
        share = lambda k: f"{fractions[k]:.3f}" if k in fractions else "-"  # noqa: E731
        body.append(
            [
                r["kind"]
                + (f" ({', '.join(r['roles'])})" if r["roles"] else "")
                + (f" {r['inactive_compute']}" if len(modes) > 1 and r["inactive_compute"] else ""),
                "-" if r["num_updates"] is None else r["num_updates"],
                fmt(median(r)),
                f"{r['x_today']:.3f}",
                f"{r['x_stock']:.3f}",
                fmt(r["teacher_forward_seconds"]["median"]) if "teacher_forward_seconds" in r else "-",
                f"{r['peak_memory_bytes'] / 2**20:.0f}",
                share("heads"),
                share("ffn_units"),
                share("conv_channels"),
                f"{r['active_macs_ratio']:.3f}" if "active_macs_ratio" in r else "-",
                f"{r['computed_macs_ratio']:.3f}" if "computed_macs_ratio" in r else "-",
                (
                    f"{r['gathering']['gates_gathering']}/{r['gathering']['gates']}"
                    if "gathering" in r
                    else "-"
                ),
            ]
            + ([f"{r['paired']['ratio']:.3f}" if "paired" in r else "-"] if args.paired else [])
        )
    print(
        f"\nbase shape, {args.precision}, {args.device}, batch {args.batch} x {args.seconds:g} s, "
        f"threads {torch.get_num_threads()}, median of {args.repeat} after {args.warmup}"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
        + "; states: "
        f"{shown(args.states)} ({len(run['states'])} states, run of {run['max_update']} updates, "
        f"ramp {run['warmup']})"
    )
    print(table(body, header))
    print(
        "heads / FFN units / conv ch: fractions of the gated units still active; MACs ratio: active MACs / "
        "teacher's; computed: expected MACs an update computes / teacher's; gathered: gated blocks that leave "
        "their zero units out at the expected fraction / gated blocks"
        + (
            f"; x masked: the state's update as chosen / the same state with every unit masked, in one process, "
            f"median of {args.paired} alternating rounds"
            if args.paired
            else ""
        )
    )

    # the goals
    goals = []
    ramp_end = next((r for r in primary if "ramp end" in r["roles"]), None)
    checks = [("today", GOAL_TODAY, today)] + ([("stock", GOAL_STOCK, stock)] if gpu else [])
    print()
    for name, bound, reference in checks:
        goal = {"what": f"update at the end of the ramp <= {bound} x {name}'s", "bound": bound}
        if ramp_end is None:
            goal["met"] = None
            print(f"goal: {goal['what']}: not measured (pass --at {landmarks['ramp end']})")
        else:
            goal["ratio"] = median(ramp_end) / median(reference)
            goal["met"] = goal["ratio"] <= bound
            print(
                f"goal: {goal['what']}: {goal['ratio']:.3f} x ({fmt(median(ramp_end))} {unit} at update "
                f"{ramp_end['num_updates']} vs {fmt(median(reference))} {unit}): "
                + ("met" if goal["met"] else "not met")
            )
        goals.append(goal)

    # the fit and the estimates
    for mode in modes:
        measured = [r for r in rows[2:] if r["inactive_compute"] == mode]
        slowest = max(measured, key=lambda r: r["x_today"])
        print(
            f"inactive_compute={mode}: the slowest state, at update {slowest['num_updates']}, takes "
            f"{slowest['x_today']:.3f} x today's update"
            + (" (never slower than every unit active)" if slowest["x_today"] <= 1.0 else "")
        )
        pairs = [r for r in measured if "paired" in r]
        if pairs:
            worst = max(pairs, key=lambda r: r["paired"]["ratio"])
            print(
                f"  in one process (--paired): the slowest, at update {worst['num_updates']}, takes "
                f"{worst['paired']['ratio']:.3f} x the same state with every unit masked"
            )
    points = [(1.0, median(today))] + [(r["computed_macs_ratio"], median(r)) for r in primary]
    intercept, slope = fit_cost(points)
    unconstrained = fit_line(points)
    residuals = [y - (intercept + slope * x) for x, y in points]
    fit = {
        "intercept_seconds": intercept,
        "slope_seconds": slope,
        "least_squares": {"intercept_seconds": unconstrained[0], "slope_seconds": unconstrained[1]},
        "constrained": (intercept, slope) != unconstrained,
        "points": [{"computed_macs_ratio": x, "seconds": y} for x, y in points],
        "max_abs_residual_seconds": max(abs(v) for v in residuals),
    }
    estimates = estimate(run, (intercept, slope), median(today))
    print(
        f"\nfit over {len(points)} points (today at 1.0 and each state; least squares, neither part below 0): "
        f"update s = {intercept:.4f} + "
        f"{slope:.4f} x computed MACs ratio (largest residual {fit['max_abs_residual_seconds']:.4f} s; at 1.0 "
        f"{intercept + slope:.4f} s, measured today {median(today):.4f} s)"
    )
    if fit["constrained"]:
        print(
            f"  the least-squares line, {unconstrained[0]:.4f} + {unconstrained[1]:.4f} x ratio, has a negative "
            "part: the timings are noise at these settings; held at the boundary (neither part below 0)"
        )
    lowest = min(x for x, _ in points)
    if min(ratio_of(s) for s in run["states"]) < lowest - 1e-9:
        print(f"  (extrapolated below the lowest measured ratio, {lowest:.3f})")
    for key in ("run", "recipe"):
        e = estimates[key]
        print(
            f"{key}: {e['what']}\n  estimated {e['estimated_seconds']:.1f} s of updates against "
            f"{e['all_active_seconds']:.1f} s with every unit active (the fit at 1.0): {e['ratio']:.3f} x; "
            f"{e['ratio_to_measured_today']:.3f} x measured today's (mean computed MACs ratio "
            f"{e['mean_active_macs_ratio']:.3f})"
        )
    print("neither counts the landing phase's search, validation or checkpoints")
    settings = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("worker", "data", "update")
    }
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": settings,
            "run": {
                "states": shown(args.states),
                "recorded_updates": [s["num_updates"] for s in run["states"]],
                "max_update": run["max_update"],
                "sparsity_warmup_updates": run["warmup"],
                "landmarks": landmarks,
            },
            "rows": rows,
            "goals": goals,
            "fit": fit,
            "estimates": estimates,
            "notes": notes,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
