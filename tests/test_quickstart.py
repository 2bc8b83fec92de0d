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
