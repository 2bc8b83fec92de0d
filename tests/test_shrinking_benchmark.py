"""The stage-1 run's recorded active sets (``benchmarks/structures/hubert_base_sp75_run.json``, written by
``make_structure.py --states-every N``) are what the model counts, and ``shrinking_update.py`` runs on them."""

import json
import os
import sys
import warnings

import helpers
import pytest

RUN_STATES = os.path.join(helpers.REPO, "benchmarks", "structures", "hubert_base_sp75_run.json")
#: a run recorded with the gates' logits too: what each update's samples leave out
LOGITS_RUN = os.path.join(helpers.REPO, "benchmarks", "structures", "hubert_base_macs61_logits_run.json")
PRUNE_UNITS = ["conv", "head", "interm"]  # configs/dphubert.yaml's


def recorded_run(path: str = RUN_STATES) -> dict:
    if not os.path.exists(path):
        pytest.skip(
            f"{os.path.relpath(path, helpers.REPO)} not written yet (make_structure.py --states-every)"
        )
    with open(path) as f:
        return json.load(f)


def benchmark_module():
    """``benchmarks/shrinking_update.py`` imported, leaving ``sys.path`` and the warning filters (which the
    benchmarks' harness sets) as they were."""
    folder = os.path.join(helpers.REPO, "benchmarks")
    with warnings.catch_warnings():
        sys.path.insert(0, folder)
        try:
            import shrinking_update
        finally:
            sys.path.remove(folder)
    return shrinking_update


def test_recorded_states_are_the_models_counts_and_only_shrink():
    from dphubert_fairseq.macs import architecture_size
    from dphubert_fairseq.models.dphubert import DPHuBERTConfig, DPHuBERTModel

    states = recorded_run()["run_states"]
    decode = benchmark_module().decode_active  # harness.decode_active, as the benchmark reads the file
    model = DPHuBERTModel(DPHuBERTConfig(prune_units=PRUNE_UNITS))  # HuBERT Base's shape, default gates
    teacher_macs = architecture_size(DPHuBERTConfig(), "macs")  # the ungated Base
    assert model.active_macs() == teacher_macs  # every unit active: the teacher's compute (today's update)
    gates = model.gates()
    updates = [s["num_updates"] for s in states]
    assert updates == sorted(set(updates)) and len(states) >= 2, "states in update order, one per update"
    previous = None
    for state in states:
        assert sorted(state["active"]) == sorted(gates), f"update {state['num_updates']}: other gates"
        active = {name: decode(state["active"][name], gate.n) for name, gate in gates.items()}
        if previous is not None:  # inactive for good: a unit inactive once stays inactive
            for name in gates:
                reopened = int((active[name] & ~previous[name]).sum())
                assert not reopened, f"update {state['num_updates']}: {reopened} units of {name} active again"
        previous = active
        for name, gate in gates.items():
            gate.set_active(active[name])
        assert state["active_macs_ratio"] == model.active_macs() / teacher_macs, state["num_updates"]
        assert state["active_fractions"] == model.active_fractions(), state["num_updates"]
    assert states[-1]["active_macs_ratio"] < states[0]["active_macs_ratio"]


def test_recorded_logits_give_what_an_update_computes():
    """The logits recorded with the states decode to the student's gates (to the 0.1 step they were stored
    at) and give the MACs an update computes on average: all of them at the start (where no gate has closed)
    and about the target once its ramp has ended, with no unit inactive."""
    import torch

    from dphubert_fairseq.macs import architecture_size
    from dphubert_fairseq.models.dphubert import DPHuBERTConfig, DPHuBERTModel

    su = benchmark_module()
    recorded = recorded_run(LOGITS_RUN)
    run = su.load_run(LOGITS_RUN)
    teacher_macs = architecture_size(DPHuBERTConfig(), "macs")
    model = DPHuBERTModel(DPHuBERTConfig(prune_units=PRUNE_UNITS, teacher_macs=teacher_macs))
    gates = model.gates()
    ratios = {}
    for state in run["states"]:
        assert sorted(state["log_alpha"]) == sorted(gates)
        su.apply_state(model, state)
        logits = torch.cat([gate.log_alpha.detach() for gate in gates.values()])
        assert logits.abs().max() <= 12.7 + 1e-6  # the stored range
        ratios[state["num_updates"]] = su.computed_macs_ratio(model)
        assert state["active_macs_ratio"] == 1.0  # nothing inactive: the samples alone leave units out
    target = float(
        su.run_overrides(recorded["produced_by"]["fairseq_overrides"])["criterion.target_sparsity"]
    )
    first, ramp_end = run["states"][0]["num_updates"], su.run_landmarks(run)["ramp end"]
    assert ratios[first] > 0.9
    assert ratios[ramp_end] == pytest.approx(1.0 - target, abs=0.05)
    state = dict(run["states"][0], log_alpha={**run["states"][0]["log_alpha"], next(iter(gates)): "AAAA"})
    with pytest.raises(su.StatesError, match="no usable recorded logits"):
        su.apply_state(model, state)


def test_estimate_arithmetic():
    """The whole-run and recipe estimates of shrinking_update.py on a made-up run, worked out by hand."""
    su = benchmark_module()

    assert su.fit_line([(1.0, 3.0), (0.5, 2.0), (0.0, 1.0)]) == pytest.approx((1.0, 2.0))
    assert su.fit_line([(1.0, 3.0), (1.0, 5.0)]) == (4.0, 0.0)
    # noise in the timings: neither part of the cost below 0
    assert su.fit_cost([(1.0, 2.0), (0.5, 4.0)]) == (3.0, 0.0)  # less compute measured slower: the mean
    assert su.fit_cost([(1.0, 4.0), (0.5, 1.0)]) == pytest.approx((0.0, 4.5 / 1.25))  # through the origin
    # all active for updates 0-9, half the MACs from update 10 (the state after 10 updates) on
    run = {"states": [{"num_updates": 10, "active_macs_ratio": 0.5}], "max_update": 20, "warmup": 10}
    estimates = su.estimate(run, (0.0, 1.0), today=2.0)  # seconds = the MACs ratio
    assert estimates["run"]["estimated_seconds"] == pytest.approx(10 * 1.0 + 10 * 0.5)
    assert estimates["run"]["ratio"] == pytest.approx(15 / 20)
    assert estimates["run"]["ratio_to_measured_today"] == pytest.approx(15 / 40)
    # the ramp (10 updates, all active) onto the recipe's 5k, then the last state for the other 45k
    assert estimates["recipe"]["ratio"] == pytest.approx((5000 + 45000 * 0.5) / 50000)
    run["states"] = [{"num_updates": u, "active_macs_ratio": 1.0 - u / 100} for u in (2, 4, 6, 8, 10, 20)]
    assert su.run_landmarks(run) == {"run start": 2, "mid-ramp": 4, "ramp end": 10, "run end": 20}
    assert su.pick_updates(run, None) == [2, 4, 10, 20] and su.pick_updates(run, [7, 19]) == [6, 20]


@pytest.mark.slow
def test_shrinking_update_benchmark(tmp_path):
    """shrinking_update.py at its smallest settings, on the run's last state: the three kinds of row, the state
    computing less than today, the estimates at most today's cost (the fitted line has no negative part, so
    this holds whatever the noise of one timed update; the timings themselves are not asserted)."""
    last = max(s["num_updates"] for s in recorded_run(LOGITS_RUN)["run_states"])
    out = tmp_path / "shrinking.json"
    args = ["--states", LOGITS_RUN, "--batch", "1", "--seconds", "1", "--warmup", "0", "--repeat", "1"]
    args += ["--at", str(last), "--inactive-compute", "gather"]  # no timing of break-evens: not asserted
    args += ["--paired", "1"]  # the state as chosen and all masked, in its process
    proc = helpers.run(
        [sys.executable, os.path.join("benchmarks", "shrinking_update.py"), *args, "--json", str(out)],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x today" in proc.stdout and "conservative" in proc.stdout
    result = json.load(open(out))
    assert [r["kind"] for r in result["rows"]] == ["stock", "today", "state"]
    for row in result["rows"]:
        assert row["update_seconds"]["median"] > 0 and row["peak_memory_bytes"] > 10 * 2**20
        assert row["update_seconds"]["rounds"] == [row["update_seconds"]["median"]]  # one round: its median
    today, state = result["rows"][1:]
    assert today["active_macs_ratio"] == 1.0 and today["teacher_forward_seconds"]["median"] > 0
    assert state["num_updates"] == last and "run end" in state["roles"]
    assert state["active_macs_ratio"] == state["recorded_active_macs_ratio"] == 1.0  # nothing inactive
    assert today["computed_macs_ratio"] == 1.0 and state["computed_macs_ratio"] < 0.5  # the samples' zeros
    assert state["logits_recorded"] and state["gathering"]["gates_gathering"] == state["gathering"]["gates"]
    pair = state["paired"]
    assert len(pair["chosen_seconds"]) == len(pair["masked_seconds"]) == 1 and "x masked" in proc.stdout
    assert pair["ratio"] == pytest.approx(pair["chosen_seconds"][0] / pair["masked_seconds"][0])
    assert "paired" not in today
    for estimate in result["estimates"].values():
        assert 0.0 < estimate["ratio"] <= 1.0, estimate


def test_rounds_fold_into_the_median_of_each_rounds_median():
    """``--rounds N`` (shrinking_update.py, training_step.py): each timing keeps every round's median and reports
    their median; the rest of a worker's result is the first round's."""
    fold_round = benchmark_module().fold_round  # harness.fold_round, as the benchmark uses it
    rounds = [
        {"update_seconds": {"median": m, "min": m / 2}, "peak": i} for i, m in enumerate([3.0, 5.0, 4.0])
    ]
    kept = None
    for measured in rounds:
        kept = fold_round(kept, measured, ["update_seconds"])
    assert kept["update_seconds"]["rounds"] == [3.0, 5.0, 4.0]
    assert (
        kept["update_seconds"]["median"] == 4.0 and kept["update_seconds"]["min"] == 1.5 and kept["peak"] == 0
    )
    order = benchmark_module().round_order
    assert [order(3, r) for r in range(3)] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
