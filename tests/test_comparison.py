"""The comparison (``python -m examples.comparison``) at its tiny size: every model and every measure present
and well formed (not the outcome), the exported students loadable at one parameter count, the report written,
and the teacher reused by a second run."""

import collections
import json
import math
import shutil
import sys

import helpers
import pytest

import dphubert_fairseq as dp
from dphubert_fairseq.param_count import attention_params
from examples.comparison.plan import KINDS, SIZES, TARGET_LAYERS, TEACHER
from examples.comparison.report import LABELS


@pytest.mark.slow
def test_comparison_tiny_end_to_end(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "examples.comparison", "--out", str(out), "--size", "tiny", "--jobs", "2"]
    done = helpers.run(cmd, cwd=str(tmp_path), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in range(1, 7):
        assert f"[{phase}/6" in done.stdout

    result = json.loads((out / "results.json").read_text())
    seeds = SIZES["tiny"].seeds
    rows = result["rows"]
    assert collections.Counter(r["kind"] for r in rows) == {
        "mfcc": 1,
        "teacher": 1,
        **{k: seeds for k in KINDS},
    }
    teacher = next(r for r in rows if r["kind"] == "teacher")
    target = round((1 - SIZES["tiny"].target_sparsity) * teacher["params"])
    one_head = attention_params(TEACHER.dim, TEACHER.dim // TEACHER.heads, 1) - attention_params(
        TEACHER.dim, TEACHER.dim // TEACHER.heads, 0
    )
    for row in rows:
        for probe in ("keyword", "speaker"):
            p = row["probes"][probe]
            assert 0.0 <= p["accuracy"] <= 1.0 and p["test_items"] > 0 and p["train_items"] > 0
            assert math.isclose(sum(p["layer_weights"]), 1.0, rel_tol=1e-5)
        if row["kind"] == "mfcc":
            assert len(row["probes"]["keyword"]["layer_weights"]) == 1
            continue
        assert row["macs"] > 0 and row["cpu_seconds"] > 0
        assert sorted(row["layers"]) == sorted(str(layer) for layer in TARGET_LAYERS)
        for value in row["layers"].values():
            assert value["l1"] >= 0 and -1.0 <= value["cos"] <= 1.0 + 1e-6
        if row["kind"] != "teacher":
            # every student at the target's parameter count and loadable as saved: the built ones within 1%,
            # the DPHuBERT ones within one head of it (the landing step's guarantee is one unit, and a head is
            # the largest unit of this teacher; the tiny run lands with a single landing update)
            if row["kind"] in ("dphubert", "dphubert_10pct", "random_structure"):
                assert abs(row["params"] - target) <= one_head
            else:
                assert abs(row["params"] - target) <= 0.01 * target
            assert row["params"] < teacher["params"] and row["macs"] < teacher["macs"]
            model = dp.load_model(str(out / "models" / f"{row['kind']}_seed{row['seed']}.pt"))
            assert model.num_params() == row["params"]
            assert len(row["probes"]["keyword"]["layer_weights"]) == model.cfg.encoder_layers + 1
    for row in (r for r in rows if r["kind"] in ("dphubert", "dphubert_10pct")):
        end = row["stage1_end"]  # how stage 1 ended, recorded with the result
        assert abs(end["export_sparsity"] - SIZES["tiny"].target_sparsity) <= 0.02
        assert 0 <= end["expected_sparsity"] <= 1 and 0 <= end["eval_sparsity"] <= 1
        assert 0 <= end["export_max_abs_deviation"] < 1e-3
    distil = next(r for r in rows if r["kind"] == "distilhubert")
    assert distil["heads"] == [8, 8] and len(distil["ffn_dims"]) == 2

    quality = result["teacher"]
    assert quality["prior_bits"] > 0 and math.isfinite(quality["loss_bits"])
    assert 0 <= quality["masked_accuracy"] <= 1 and 0 <= quality["prior_accuracy"] <= 1
    summary = result["summary"]
    assert set(summary) == {"mfcc", "teacher", *KINDS}
    assert summary["dphubert"]["keyword_accuracy"]["n"] == seeds
    assert len(result["statements"]) == 4
    keyword_items = next(r for r in rows if r["kind"] == "mfcc")["probes"]["keyword"]["test_items"]
    assert result["resolution"]["keyword_accuracy"] == pytest.approx(1 / keyword_items)
    assert result["command"].startswith("python -m examples.comparison") and result["commit"]

    table = (out / "results.md").read_text()
    for label in LABELS.values():
        assert f"| {label} |" in table
    assert result["commit"] in table and "![comparison](comparison.png)" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the report rendered again from results.json alone, recording the code that rendered it
    (out / "results.md").unlink()
    rendered = helpers.run(cmd[:3] + ["--out", str(out), "--report-only"], cwd=str(tmp_path))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "this report rendered from its results.json by commit" in (out / "results.md").read_text()

    again = helpers.run(cmd + ["--kinds", "dphubert"], cwd=str(tmp_path), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "teacher: cached" in again.stdout and "pretraining" not in again.stdout
    # the students train again from the start: nothing of the first run's checkpoints is resumed
    log = (out / "logs" / "dphubert_seed1_stage1.log").read_text()
    assert "No existing checkpoint found" in log and "Loaded checkpoint" not in log
