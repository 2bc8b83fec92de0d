"""The benchmark scripts run as benchmarks/README.md says, at the smallest settings, and report consistent figures."""

import json
import os
import sys

import helpers
import pytest

STRUCTURE = os.path.join(helpers.REPO, "benchmarks", "structures", "hubert_base_sp75.json")
MACS_STRUCTURE = os.path.join(helpers.REPO, "benchmarks", "structures", "hubert_base_macs61.json")
LATENCY_TABLE = os.path.join(helpers.REPO, "benchmarks", "structures", "cpu_1thread_latency_table.json")


def run_script(name: str, *args: str):
    """``python benchmarks/NAME ARGS`` from the repository root, as the benchmarks' README runs them."""
    return helpers.run([sys.executable, os.path.join("benchmarks", name), *args], timeout=900)


@pytest.mark.parametrize(
    "path, key, target", [(STRUCTURE, "sparsity", 0.75), (MACS_STRUCTURE, "macs_sparsity", 0.61)]
)
def test_recorded_structure_is_a_stage1_export_at_the_target(path, key, target):
    import dphubert_fairseq as dp
    from dphubert_fairseq.models.dphubert import as_config

    recorded = json.load(open(path))
    model = dp.DPHuBERTModel(as_config(recorded["model_config"]))
    summary = recorded["summary"]
    assert model.num_params() == summary["params"] and summary["teacher_params"] == 94_370_944
    assert not model.gates() and summary["exact"]
    assert abs(summary[key] - target) < 0.01  # the run lands on its target, in its metric
    assert "make_structure.py" in recorded["produced_by"]["command"]
    if key == "macs_sparsity":  # counted now as it was counted then
        assert model.size("macs") == summary["macs"] and summary["target_metric"] == "macs"


@pytest.mark.slow
def test_training_step_benchmark(tmp_path):
    """training_step.py at its smallest settings: every kind of update measured, in the expected order."""
    out = tmp_path / "training.json"
    proc = run_script(
        "training_step.py",
        "--batch",
        "1",
        "--seconds",
        "1",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time ratio" in proc.stdout and "mem ratio" in proc.stdout
    (row,) = json.load(open(out))["rows"]
    for kind in ("stock", "dphubert", "dphubert_fairseq_adam"):
        assert row[kind]["update_seconds"]["median"] > 0
        assert row[kind]["peak_memory_bytes"] > 10 * 2**20  # at least the model and its optimizer state
        assert row[kind]["ops_per_update"] > 1000
    # the configs' torch_adamw against fairseq's adam: the whole update and the optimizer's step alone
    assert row["dphubert"]["fairseq_adam_ratio"] > 0 and "x adam" in proc.stdout
    assert all(row[k]["optimizer_step_seconds"]["median"] > 0 for k in ("dphubert", "dphubert_fairseq_adam"))
    # a stage-1 update runs the teacher too: its operation count is above the stock update's (the floor);
    # the measured time ratio is reported, not asserted (timings are the benchmark's output, not a test's)
    assert row["floor"] > 1.0 and row["time_ratio"] > 0.0
    # the landing search is one part of a landing-phase update
    assert row["dphubert"]["landing_seconds"]["median"] > 0 and "landing ms" in proc.stdout
    assert 0.0 < row["landing_share"] < 1.0
    # how the stage-1 update computed its zero units: measured on this CPU after the first update
    gathering = row["dphubert"]["gathering"]
    assert gathering["break_evens"] and 0 <= gathering["gates_gathering"] <= gathering["gates"] > 0
    assert "leaving their zero units out" in proc.stdout


@pytest.mark.slow
def test_inference_benchmark(tmp_path):
    """inference.py at its smallest settings: the teacher is HuBERT Base, the exported model the recorded one."""
    out = tmp_path / "inference.json"
    proc = run_script(
        "inference.py",
        "--seconds",
        "1",
        "--threads",
        "1",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--rounding",
        "4:128",
        "--latency-table",
        LATENCY_TABLE,
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    models = result["models"]
    summary = json.load(open(STRUCTURE))["summary"]
    assert models["teacher"]["params"] == summary["teacher_params"] == 94_370_944  # HuBERT Base
    assert models["exported sp75"]["params"] == summary["params"]
    assert models["exported sp75"]["macs_ratio"] < 1.0
    assert (
        models["exported sp75"]["params"] < models["rounded h4f128"]["params"] < models["teacher"]["params"]
    )
    macs = json.load(open(MACS_STRUCTURE))["summary"]  # the MACs-target structure is the second row
    assert models["exported macs61"]["params"] == macs["params"]
    # the ratio recorded at the target's 10 s, up to the attention's T^2 terms, which weigh less at 1 s
    assert abs(models["exported macs61"]["macs_ratio"] - (1 - macs["macs_sparsity"])) < 0.05
    assert set(result["seconds_per_forward"]) == {"1 thread"}
    # the table's prediction next to the measured times, and that it was timed on other inputs (10 s)
    assert "timed on cpu, 1 x 10 s in float32" in proc.stdout and "made for other inputs" in proc.stdout
    assert "predicted seconds per block kind; measured at 1 thread" in proc.stdout


def test_gpu_check_records_every_step_and_packs_the_results(tmp_path):
    """gpu_check.sh's mechanics, on this machine: the selected step runs and is recorded, the others are not
    run, a failing or missing tool stops nothing, and every result lands in the one archive."""
    import subprocess
    import tarfile

    out, pack = tmp_path / "out", tmp_path / "back" / "results.tgz"
    pack.parent.mkdir()
    env = dict(os.environ, OUT=str(out), GPU_CHECK_PACK=str(pack), GPU_CHECK_ONLY="cuda_tests")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # python3: this environment's
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=helpers.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = (out / "steps.txt").read_text().splitlines()
    assert len(steps) == 1 and steps[0].startswith("cuda_tests: exit 0 after"), steps
    with tarfile.open(pack) as archive:
        names = {os.path.basename(n) for n in archive.getnames()}
    assert {"steps.txt", "env.txt", "cuda_tests.txt"} <= names
    assert "fairseq 0.12.3" in (out / "env.txt").read_text()
