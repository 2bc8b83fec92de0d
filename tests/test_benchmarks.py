"""The benchmark scripts run as the README says, at the smallest settings, and report consistent figures."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRUCTURE = os.path.join(REPO, "benchmarks", "structures", "hubert_base_sp75.json")


def run_script(name, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join("benchmarks", name), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_recorded_structure_is_a_stage1_export_at_the_target():
    import dphubert_fairseq as dp
    from dphubert_fairseq.models.dphubert import as_config

    recorded = json.load(open(STRUCTURE))
    model = dp.DPHuBERTModel(as_config(recorded["model_config"]))
    summary = recorded["summary"]
    assert model.num_params() == summary["params"] and summary["teacher_params"] == 94_370_944
    assert not model.gates() and summary["exact"]
    assert abs(summary["sparsity"] - 0.75) < 0.01  # the run lands on its target
    assert "make_structure.py" in recorded["produced_by"]["command"]


def test_training_step_benchmark(tmp_path):
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
    for kind in ("stock", "dphubert"):
        assert row[kind]["update_seconds"]["median"] > 0
        assert row[kind]["peak_memory_bytes"] > 10 * 2**20  # at least the model and its optimizer state
        assert row[kind]["ops_per_update"] > 1000
    assert (
        row["time_ratio"]
        == row["dphubert"]["update_seconds"]["median"] / row["stock"]["update_seconds"]["median"]
    )
    assert row["floor"] > 1.0
    assert row["dphubert"]["landing_seconds"]["median"] > 0 and "landing ms" in proc.stdout
    assert row["landing_share"] == (
        row["dphubert"]["landing_seconds"]["median"] / row["dphubert"]["update_seconds"]["median"]
    )


def test_inference_benchmark(tmp_path):
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
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    models = result["models"]
    summary = json.load(open(STRUCTURE))["summary"]
    assert models["teacher"]["params"] == summary["teacher_params"]
    assert models["exported"]["params"] == summary["params"]
    assert models["exported"]["macs_ratio"] < 1.0
    assert models["exported"]["params"] < models["rounded h4f128"]["params"] < models["teacher"]["params"]
    assert set(result["seconds_per_forward"]) == {"1 thread"}
