"""The comparison (``python -m examples.comparison``) at its tiny size: every model and every measure present
and well formed (not the outcome), the exported students loadable at one parameter count, the schedules
recorded, what DPHuBERT's gates kept read back, the report written, and the teacher reused by a second run."""

import collections
import json
import math
import os
import shutil
import sys

import helpers
import pytest

import dphubert_fairseq as dp
from dphubert_fairseq.param_count import attention_params
from examples.comparison import structure
from examples.comparison.__main__ import Comparison
from examples.comparison.plan import (
    AS_STAGE2_OF,
    FROM_DPHUBERT_STRUCTURE,
    PROPORTIONS,
    SIZES,
    TARGET_LAYERS,
    TEACHER,
)
from examples.comparison.report import ABLATION_STEPS, LABELS, PAIRS


@pytest.mark.slow
def test_comparison_tiny_end_to_end(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "examples.comparison", "--out", str(out), "--size", "tiny", "--jobs", "2"]
    done = helpers.run(cmd, cwd=str(tmp_path), timeout=1500)  # 11 min on 2 busy cores
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in range(1, 7):
        assert f"[{phase}/6" in done.stdout

    result = json.loads((out / "results.json").read_text())
    seeds = SIZES["tiny"].seeds
    kinds = SIZES["tiny"].kinds
    dphubert_kinds = [kind for kind in PROPORTIONS if kind in kinds]
    rows = result["rows"]
    probe_seeds = SIZES["tiny"].phoneme_probe_seeds  # the upper and lower lines: one row per probe seed
    assert collections.Counter(r["kind"] for r in rows) == {
        "mfcc": probe_seeds,
        "teacher": probe_seeds,
        **{k: seeds for k in kinds},
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
        per = row["phonemes"]  # the phoneme probe: PER overall, on new voices, on the training voices
        assert all(0.0 <= per[key] for key in ("per", "per_held_out_voices", "per_train_voices"))
        assert per["test_items"] == SIZES["tiny"].held_out_sentences and per["phonemes"] > 10
        assert math.isclose(sum(per["layer_weights"]), 1.0, rel_tol=1e-5)
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
            if row["kind"] in (*PROPORTIONS, *FROM_DPHUBERT_STRUCTURE):
                assert abs(row["params"] - target) <= one_head
            else:
                assert abs(row["params"] - target) <= 0.01 * target
            assert row["params"] < teacher["params"] and row["macs"] < teacher["macs"]
            model = dp.load_model(str(out / "models" / f"{row['kind']}_seed{row['seed']}.pt"))
            assert model.num_params() == row["params"]
            assert len(row["probes"]["keyword"]["layer_weights"]) == model.cfg.encoder_layers + 1
    for row in (r for r in rows if r["kind"] in dphubert_kinds):
        end = row["stage1_end"]  # how stage 1 ended, recorded with the result
        assert abs(end["export_sparsity"] - SIZES["tiny"].target_sparsity) <= 0.02
        assert 0 <= end["expected_sparsity"] <= 1 and 0 <= end["eval_sparsity"] <= 1
        assert 0 <= end["export_max_abs_deviation"] < 1e-3
    distil = next(r for r in rows if r["kind"] == "distilhubert")
    assert distil["heads"] == [8, 8] and len(distil["ffn_dims"]) == 2
    from dphubert_fairseq.checkpoint_io import load_model_and_extra_state

    _, extra = load_model_and_extra_state(str(out / "models" / "distilhubert_seed1.pt"))
    # trained with DistilHuBERT's own heads
    assert extra["prediction_heads"] and extra["prediction_head"] == "distilhubert"

    quality = result["teacher"]
    assert quality["prior_bits"] > 0 and math.isfinite(quality["loss_bits"])
    assert 0 <= quality["masked_accuracy"] <= 1 and 0 <= quality["prior_accuracy"] <= 1
    summary = result["summary"]
    assert set(summary) == {"mfcc", "teacher", *kinds}
    assert summary["dphubert"]["keyword_accuracy"]["n"] == seeds
    assert len(result["statements"]) == sum(a in kinds and b in kinds for a, b in PAIRS) == len(PAIRS) - 3
    assert any(
        line.startswith(f"- {LABELS['dphubert']} minus {LABELS['dphubert_long_ramp']}: ")
        for line in result["statements"]
    )
    # the schedules as run: every student the same total, DPHuBERT's stages in the size's proportions
    schedules = result["schedules"]
    assert {s["stage1"] + s["stage2"] for k, s in schedules.items() if k not in AS_STAGE2_OF} == {
        SIZES["tiny"].student_updates
    }
    for kind in dphubert_kinds:
        expected = SIZES["tiny"].schedule(kind)
        assert (schedules[kind]["stage1"], schedules[kind]["stage2"], schedules[kind]["ramp"]) == (
            expected.stage1,
            expected.stage2,
            expected.ramp,
        )
        for stage, updates in (("stage1", expected.stage1), ("stage2", expected.stage2)):
            log = (out / "logs" / f"{kind}_seed1_{stage}.log").read_text()  # fairseq logs its config
            assert f"'max_update': {updates}," in log
        assert (
            f"'sparsity_warmup_updates': {expected.ramp},"
            in (out / "logs" / f"{kind}_seed1_stage1.log").read_text()
        )

    # the ablations: each seed's DPHuBERT sizes with the teacher's largest units, one of them trained as
    # DPHuBERT's stage 2
    for seed in range(1, seeds + 1):
        ours = next(r for r in rows if r["kind"] == "dphubert" and r["seed"] == seed)
        for kind in ("largest_in_structure", "largest_in_structure_stage2"):
            row = next(r for r in rows if r["kind"] == kind and r["seed"] == seed)
            assert (row["heads"], row["ffn_dims"]) == (ours["heads"], ours["ffn_dims"])
    stage2 = SIZES["tiny"].schedule("dphubert").stage2
    assert schedules["largest_in_structure_stage2"]["stage2"] == stage2
    assert f"'max_update': {stage2}," in (out / "logs" / "largest_in_structure_stage2_seed1.log").read_text()
    assert "'gate_init_importance': 0.0," in (out / "logs" / "dphubert_seed1_stage1.log").read_text()

    # what the gates kept: per DPHuBERT kind and seed, the export's sizes and kept sets of those sizes
    learned = result["structure"]
    assert set(learned["kinds"]) == set(dphubert_kinds)
    assert learned["uniform"]["heads"] == next(r for r in rows if r["kind"] == "uniform")["heads"]
    assert learned["teacher"]["heads"] == [TEACHER.heads] * TEACHER.layers
    for kind, data in learned["kinds"].items():
        assert data["kept_sets_match_export"] and sorted(data["seeds"]) == [
            str(s) for s in range(1, seeds + 1)
        ]
        for seed, record in data["seeds"].items():
            exported = structure.exported_sizes(str(out / "models" / f"{kind}_seed{seed}_stage1.pt"))
            assert record["sizes"] == exported
            assert [bits.count("1") for bits in record["kept"]["ffn_units"]] == exported["ffn_units"]
        assert data["overlap"]["heads"]["pairs"] == seeds * (seeds - 1) // 2
    keyword_items = next(r for r in rows if r["kind"] == "mfcc")["probes"]["keyword"]["test_items"]
    assert result["resolution"]["keyword_accuracy"] == pytest.approx(1 / keyword_items)
    assert result["command"].startswith("python -m examples.comparison") and result["commit"]

    table = (out / "results.md").read_text()
    for kind in kinds:
        assert f"| {LABELS[kind]} |" in table
    assert result["commit"] in table and "![comparison](comparison.png)" in table
    assert "Phoneme probe (a linear CTC head" in table and "| PER | PER, new voices |" in table
    assert summary["teacher"]["per"]["n"] == probe_seeds
    assert "## What the gates learned" in table and "![structure](structure.png)" in table
    assert "## Where DPHuBERT gains or loses: the ablations" in table
    assert all(f"- {text}: PER " in table for _, _, text in ABLATION_STEPS)
    for png in ("comparison.png", "structure.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the report rendered again from results.json alone, recording the code that rendered it
    (out / "results.md").unlink()
    rendered = helpers.run(cmd[:3] + ["--out", str(out), "--report-only"], cwd=str(tmp_path))
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "this report rendered from its results.json by commit" in (out / "results.md").read_text()

    # a second run into the same folder: the teacher comes from the cache, and a student's run folder left by
    # the first run is emptied before fairseq starts (fairseq would resume its checkpoint)
    again = Comparison(str(out), SIZES["tiny"], 1, "again")
    launched = []

    def launch(cmd, log, name="", parallel=True):
        launched.append((log, os.path.exists(out / "runs" / "distilhubert_seed1")))
        return ""

    again.run_quietly = launch
    _, teacher_path, quality = again.speech_and_teacher()
    assert not launched and {"shape": result["teacher"]["shape"], **quality} == result["teacher"]
    assert teacher_path == again.path("teacher", "checkpoint_last.pt")
    assert (out / "runs" / "distilhubert_seed1" / "checkpoint_last.pt").exists()
    again.distil("distilhubert_seed1", "dphubert_final", [], 3, [], 1)
    assert launched == [("distilhubert_seed1.log", False)]
