"""The quickstart (``examples/quickstart``), at a smaller size: every phase, every output, in one folder; and
the speech it gathers (``fairseq_runs.speech``)."""

import json
import os
import sys

import helpers
import numpy as np
import pytest

import dphubert_fairseq as dp
from fairseq_runs import speech


@pytest.mark.slow
def test_quickstart_tiny_end_to_end(tmp_path, speech):  # noqa: F811  (the conftest fixture skips without data)
    """``python -m examples.quickstart`` from another folder, checkout on PYTHONPATH (as quickstart.sh runs it):
    seven phases, fairseq's progress shown, every output in OUT, and a report that agrees with the model."""
    out = tmp_path / "qs"
    done = helpers.run(
        [sys.executable, "-m", "examples.quickstart", "--out", str(out), "--size", "tiny"],
        cwd=str(tmp_path),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for phase in range(1, 8):
        assert f"[{phase}/7" in done.stdout
    assert "[train_inner]" in done.stdout  # fairseq's progress is shown
    for name in (
        "report.md",
        "report.json",
        "architecture.png",
        "training.png",
        "dphubert.pt",
        "stage1_pruned.pt",
        "teacher/checkpoint_last.pt",
        "data/train.tsv",
        "data/train.km",
        "logs/stage1.log",
    ):
        assert (out / name).exists(), name
    for png in ("architecture.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    student = dp.load_model(str(out / "dphubert.pt"))
    assert report["student"]["params"] == dp.count_params(student) < report["teacher"]["params"]
    assert report["student"]["macs"] == student.size("macs") < report["teacher"]["macs"]
    assert (
        f"| {report['teacher']['macs']:,} | {report['student']['macs']:,} " in (out / "report.md").read_text()
    )
    assert len(report["student"]["heads"]) == len(report["teacher"]["heads"]) == 12
    assert report["timing"]["teacher_seconds"] > 0 and report["timing"]["student_seconds"] > 0
    assert len(report["stage1_curve"]) > 0 and "distill_loss" in report["stage1_curve"][0]
    assert "eval_sparsity" in report["stage1_curve"][-1]
    # the export lands on the target, and the report says so with the parameter counts
    assert abs(report["student"]["sparsity"] - report["target_sparsity"]) <= 0.02
    target_params = round((1 - report["target_sparsity"]) * report["teacher"]["params"])
    assert (
        f"Target sparsity {report['target_sparsity']:.4f} (about {target_params:,} parameters)"
        in (out / "report.md").read_text()
    )
    assert (
        f"the exported model has {report['student']['params']:,} parameters"
        in (out / "report.md").read_text()
    )
    assert "teacher" in (out / "report.md").read_text() and "sparsity" in done.stdout
    # per layer, the kept units next to a uniform cut of the teacher to the student's size
    uniform = report["uniform"]
    assert abs(uniform["params"] - report["student"]["params"]) <= 0.01 * report["student"]["params"]
    assert len(uniform["heads"]) == 12 and uniform["conv_channels"] == report["teacher"]["conv_channels"]
    assert "| layer | heads kept | uniform heads |" in (out / "report.md").read_text()
    assert "layer  heads  uniform  ffn units  uniform" in done.stdout
    assert sorted(os.listdir(tmp_path)) == ["qs"]  # nothing outside the output folder


@pytest.mark.slow
def test_quickstart_tiny_with_a_wavlm_teacher(tmp_path, speech):  # noqa: F811
    """``--teacher wavlm``: DPWavLM from a WavLM checkpoint in its release layout (random weights, said so)."""
    pytest.importorskip("s3prl", reason="WavLM's code (s3prl, the 'superb' extra) is needed")
    out = tmp_path / "qs"
    done = helpers.run(
        [
            sys.executable,
            "-m",
            "examples.quickstart",
            "--out",
            str(out),
            "--size",
            "tiny",
            "--teacher",
            "wavlm",
        ],
        cwd=str(tmp_path),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RANDOM weights" in done.stdout and "RANDOM weights" in (out / "report.md").read_text()
    assert not (out / "data" / "train.km").exists()  # no labels: nothing is pretrained
    teacher = dp.load_teacher(str(out / "teacher" / "wavlm_random.pt"))
    student = dp.load_model(str(out / "dphubert.pt"))
    assert student.cfg.relative_position_buckets == teacher.cfg.relative_position_buckets == 320
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["kind"] == "wavlm" and report["teacher"]["params"] == dp.count_params(teacher)
    assert report["student"]["params"] == dp.count_params(student) < report["teacher"]["params"]
    assert "DEBUG" not in done.stdout + done.stderr


def test_fallback_to_generated_audio(monkeypatch):
    """Without LibriVox clips and espeak-ng the quickstart says so and generates 1 to 4 s utterances."""
    lines = []
    monkeypatch.setattr(speech, "LIBRIVOX", "/nonexistent")
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    utterances, description = speech.gather_speech(12.0, log=lines.append)
    assert "generated in code" in description
    assert any("pocketsphinx-testdata is not installed" in line for line in lines)
    assert any("espeak-ng is not installed" in line for line in lines)
    assert sum(len(u) for u in utterances) >= 12.0 * speech.SAMPLE_RATE
    assert all(np.isfinite(u).all() and 1.0 <= len(u) / speech.SAMPLE_RATE <= 4.0 for u in utterances)


def test_espeak_sentences_in_several_voices():
    """espeak-ng speaks each sentence in each voice asked for."""
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    clips = speech.synthesise_sentences(voices=["en-us", "en-gb"], sentences=speech.SENTENCES[:2])
    assert len(clips) == 4 and all(len(c) > speech.SAMPLE_RATE for c in clips)


def _report(uniform):
    """A quickstart report as ``Quickstart.report`` writes it, for a 3-layer teacher."""
    return {
        "data": {"description": "speech", "train_utterances": 4, "valid_utterances": 1, "seconds": 9.0},
        "teacher": {
            "kind": "hubert",
            "params": 1000,
            "macs": 500,
            "heads": [4, 4, 4],
            "ffn_dims": [64, 64, 64],
            "conv_channels": [32, 32],
        },
        "student": {
            "params": 500,
            "macs": 250,
            "macs_seconds": 10.0,
            "sparsity": 0.5,
            "heads": [3, 1, 0],
            "ffn_dims": [40, 12, 7],
            "conv_channels": [30, 17],
        },
        "uniform": uniform,
        "target_sparsity": 0.5,
        "final_distill_loss": 0.5,
        "timing": {"audio_seconds": 10.0, "teacher_seconds": 0.02, "student_seconds": 0.01},
        "wall_seconds": 60.0,
    }


def test_report_shows_kept_units_per_layer_next_to_a_uniform_cut():
    from examples.quickstart import report

    uniform = {"method": "uniform_cut", "params": 498, "heads": [2, 2, 2], "ffn_dims": [20, 20, 19]}
    uniform["conv_channels"] = [32, 32]
    page = report.markdown(_report(uniform))
    assert "| layer | heads kept | uniform heads | FFN units kept | uniform FFN units |" in page
    assert "| 1 | 3 / 4 | 2 | 40 / 64 | 20 |" in page and "| 3 | 0 / 4 | 2 | 7 / 64 | 19 |" in page
    assert "| 2 | 17 / 32 | 32 |" in page and "498 parameters" in page
    lines = report.terminal(_report(uniform)).splitlines()
    assert lines[lines.index("layer  heads  uniform  ffn units  uniform") + 1].split() == [
        "1",
        "3/4",
        "2",
        "40/64",
        "20",
    ]
    assert lines[lines.index("conv layer  channels  uniform") + 2].split() == ["2", "17/32", "32"]
    without = report.markdown(_report(None))
    assert "No uniform cut" in without and "| 1 | 3 / 4 | - | 40 / 64 | - |" in without


def test_uniform_reference_is_the_comparisons_uniform_cut(tiny_teachers):
    from dphubert_fairseq.teacher import config_from_fairseq
    from examples.quickstart.__main__ import uniform_reference

    cfg = config_from_fairseq(dp.load_teacher(tiny_teachers["hubert_base"]))
    total = dp.count_params(dp.load_teacher(tiny_teachers["hubert_base"]))
    cut = uniform_reference(cfg, round(0.6 * total))
    assert abs(cut["params"] - 0.6 * total) <= 0.01 * total
    assert len(set(cut["heads"])) == 1 and max(cut["ffn_dims"]) - min(cut["ffn_dims"]) <= 1
    assert cut["conv_channels"] == [24] * 7
    assert uniform_reference(cfg, 10) is None
