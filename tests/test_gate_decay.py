"""``benchmarks/gate_decay.py``: the fall of closed gates after the ramp, measured against the gates' summed
learning rate and extrapolated to the recipe's length, on a synthetic run whose fall is known."""

import json
import os
import sys

import helpers
import pytest

sys.path.insert(0, os.path.join(helpers.REPO, "benchmarks"))
import gate_decay  # noqa: E402

sys.path.remove(os.path.join(helpers.REPO, "benchmarks"))

OVERRIDES = [
    "optimization.max_update=1000",
    "criterion.sparsity_warmup_updates=100",
    "optimizer.groups.default.lr_scheduler.warmup_updates=300",
    "optimizer.groups.gates.lr_float=0.1",
]


def synthetic_run(slope: float, start: float = -1.5) -> dict:
    """States every 100 updates whose closed units' log10 P falls by ``slope`` per unit of summed gate lr
    after the ramp (update 100) and stays at ``start`` before it."""
    lr_sum = gate_decay.cumulative(gate_decay.schedule(0.1, 300, 1000))
    states = []
    for update in range(100, 1001, 100):
        value = start + slope * (lr_sum[update] - lr_sum[100])
        quantiles = {"min": value - 1, "p10": value - 0.5, "median": value, "p90": value + 0.5}
        below = {f"{t:g}": 0 for t in gate_decay.CLOSED_LADDER}
        states.append(
            {"num_updates": update, "closed_units": {"count": 10, "log10_p": quantiles, "below": below}}
        )
    return {"produced_by": {"fairseq_overrides": OVERRIDES}, "run_states": states}


def test_the_schedule_is_fairseqs_linear_warmup_and_decay():
    rates = gate_decay.schedule(0.02, 15_000, 50_000)
    assert rates[0] == 0 and rates[7_500] == pytest.approx(0.01) and rates[15_000] == pytest.approx(0.02)
    assert rates[32_500] == pytest.approx(0.01)
    # the recipe's gates move at most this far after the ramp: 133.3 during the warm-up, 350 in the decay
    total = gate_decay.cumulative(rates)
    assert total[50_000] - total[5_000] == pytest.approx(483.3, abs=0.1)


def test_a_known_fall_is_recovered_and_extrapolated_to_the_recipe():
    result = gate_decay.analyse(synthetic_run(slope=-0.05))
    median = result["quantiles"]["median"]
    assert median["slope_per_unit_lr_sum"] == pytest.approx(-0.05)
    assert median["at_ramp_end"] == pytest.approx(-1.5)
    recipe_sum = gate_decay.cumulative(gate_decay.schedule(0.02, 15_000, 50_000))
    expected = -1.5 - 0.05 * (recipe_sum[50_000] - recipe_sum[5_000])
    assert median["recipe_at"]["50000"] == pytest.approx(expected)
    crossing = median["recipe_crossing_update"]["0.0001"]  # log10 P = -4: 50 units of summed lr after 5k
    assert recipe_sum[crossing] - recipe_sum[5_000] >= 50 > recipe_sum[crossing - 100] - recipe_sum[5_000]
    assert result["quantiles"]["p10"]["at_ramp_end"] == pytest.approx(-2.0)


def test_a_run_without_closed_unit_records_is_refused(tmp_path):
    run = synthetic_run(-0.05)
    for state in run["run_states"]:
        del state["closed_units"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    proc = helpers.run([sys.executable, os.path.join("benchmarks", "gate_decay.py"), str(path)])
    assert proc.returncode == 2
    assert "no state has closed_units" in proc.stderr and str(path) in proc.stderr
