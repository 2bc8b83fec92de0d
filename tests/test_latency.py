"""The latency target: a cost table fitted to block times (``latency.py``), measured by ``dphubert-profile``
(``latency_profile.py``), trained against with ``criterion.target_metric=latency``."""

import dataclasses
import json
import subprocess
import sys

import helpers
import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq.conv_spec import parse_conv_layers
from dphubert_fairseq.latency import (
    BlockCosts,
    LatencyTable,
    Measurement,
    architecture_shape,
    fit_table,
    load_table,
)
from dphubert_fairseq.latency_profile import variant_configs
from dphubert_fairseq.param_count import static_sizes

#: the costs of a made-up device (seconds): every kind of term is non-zero somewhere
CONV = [BlockCosts(2e-5, 3e-5, 0.0)] + [BlockCosts(1e-5 * i, 2e-6 * i, 4e-6 / i) for i in range(1, 7)]
PROJECTION = BlockCosts(5e-5, 1e-6)
ATTENTION = BlockCosts(3e-4, 7e-5)
FFN = BlockCosts(1e-4, 2e-6)
REST = 3e-4


def teacher_cfg(**overrides):
    return helpers.tiny_student_config(prune_units=[], **overrides)


def synthetic_measurement(cfg) -> Measurement:
    """What the made-up device would measure for ``cfg``: each block's time from the costs above."""
    channels = [c for c, _, _ in parse_conv_layers(cfg.conv_feature_layers)]
    conv = [
        k.fixed + k.per_pair * (channels[i - 1] if i else 1) * c + k.per_unit * c
        for i, (k, c) in enumerate(zip(CONV, channels))
    ]
    projection = PROJECTION.fixed + PROJECTION.per_unit * channels[-1]
    attention = [ATTENTION.fixed * (h > 0) + ATTENTION.per_unit * h for h in cfg.encoder_attention_heads]
    ffn = [FFN.fixed * (f > 0) + FFN.per_unit * f for f in cfg.encoder_ffn_embed_dims]
    total = sum(conv) + projection + sum(attention) + sum(ffn) + REST
    return Measurement(cfg, conv, projection, attention, ffn, total)


def synthetic_table(cfg=None) -> LatencyTable:
    cfg = cfg or teacher_cfg()
    return fit_table(cfg, [synthetic_measurement(c) for c in variant_configs(cfg, 12)], "synthetic", 1, 10.0)


def test_the_fit_recovers_a_synthetic_devices_costs():
    """Every coefficient of a device whose costs are known comes back, and the table predicts any other
    architecture of the shape exactly (the fit is not merely good on the points it saw)."""
    table = synthetic_table()
    assert table.shape == architecture_shape(teacher_cfg())
    # the first conv layer reads one channel: its pair and unit terms are one column; their sum is the cost
    first = table.conv[0]
    assert first.fixed == pytest.approx(CONV[0].fixed, rel=1e-6)
    assert first.per_pair + first.per_unit == pytest.approx(CONV[0].per_unit, rel=1e-6)
    for got, want in zip(table.conv[1:], CONV[1:]):
        for key in ("fixed", "per_pair", "per_unit"):
            assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-5, abs=1e-12), key
    for got, want in ((table.projection, PROJECTION), (table.attention, ATTENTION), (table.ffn, FFN)):
        assert (got.fixed, got.per_unit) == pytest.approx((want.fixed, want.per_unit), rel=1e-6)
    assert table.rest == pytest.approx(REST, rel=1e-6)
    assert table.provenance["max_rel_error"] < 1e-6
    unseen = variant_configs(teacher_cfg(), 20, seed=7)[-1]
    assert float(table.predict(unseen, static_sizes(unseen))) == pytest.approx(
        synthetic_measurement(unseen).total, rel=1e-6
    )
    assert table.teacher_seconds() == pytest.approx(synthetic_measurement(teacher_cfg()).total, rel=1e-6)


def test_a_model_without_projection_keeps_its_feature_norms_time():
    """Without a feature projection (the CNN's last layer as wide as the encoder) the profile still times the
    feature LayerNorm: the table keeps that cost and predicts every architecture exactly."""
    cfg = teacher_cfg(
        post_extract_proj=False, conv_feature_layers="[(24,10,5)] + [(24,3,2)] * 4 + [(32,2,2)] * 2"
    )
    table = synthetic_table(cfg)
    # the norm reads the encoder's width in every architecture: one point, its cost at that width
    got, want = table.projection, PROJECTION
    assert got.fixed + got.per_unit * 32 == pytest.approx(want.fixed + want.per_unit * 32, rel=1e-6)
    for other in [cfg, *variant_configs(cfg, 20, seed=7)[1:]]:
        assert float(table.predict(other, static_sizes(other))) == pytest.approx(
            synthetic_measurement(other).total, rel=1e-6
        )


def test_a_pruned_model_is_checked_against_its_teachers_table():
    """A table applies to a model pruned from its teacher (other channels, heads and FFN units), not to one
    whose CNN has other kernels or strides, nor to another width."""
    table = synthetic_table()
    pruned = dataclasses.replace(
        teacher_cfg(),
        conv_feature_layers="[(20,10,5)] + [(7,3,2)] * 4 + [(24,2,2)] * 2",
        encoder_attention_heads=[0, 2, 4],
        encoder_ffn_embed_dims=[5, 0, 64],
    )
    table.check_shape(pruned, "t.json", pruned=True)
    with pytest.raises(dp.ConfigError):  # as a teacher, its sizes differ
        table.check_shape(pruned, "t.json")
    for changed, key in (
        (dict(conv_feature_layers="[(20,10,5)] + [(7,3,2)] * 4 + [(24,3,2)] * 2"), "conv_feature_layers"),
        (dict(encoder_embed_dim=48), "encoder_embed_dim"),
    ):
        with pytest.raises(dp.ConfigError) as e:
            table.check_shape(dataclasses.replace(pruned, **changed), "t.json", pruned=True)
        helpers.assert_one_line(
            str(e.value), starts_with=f"t.json: measured for another teacher shape (model.{key}"
        )


def test_profile_arguments_are_checked_before_timing():
    from dphubert_fairseq.latency_profile import profile

    for kwargs, message in (
        (dict(variants=3), "--variants 3: at least 4 architectures"),
        (dict(repeat=0), "--repeat 0: at least one timed pass"),
        (dict(seconds=0.01), "--seconds 0.01: shorter than the CNN's receptive field (0.0250 s)"),
        (dict(batch=0), "--batch 0: at least one utterance per pass"),
        (dict(dtype="int8"), "--dtype int8: one of float32, float16, bfloat16"),
    ):
        with pytest.raises(ValueError) as e:
            profile(teacher_cfg(), **kwargs)
        helpers.assert_one_line(str(e.value), starts_with=message)


def test_a_table_timed_on_a_batch_in_reduced_precision(tmp_path, monkeypatch):
    """``--batch`` / ``--dtype``: the blocks are timed on that many utterances in that dtype (as a GPU
    deployment runs them), the table says so and keeps it through a save; a table written before these keys
    reads as one utterance in float32."""
    from dphubert_fairseq.latency_profile import profile

    seen = []
    original = dp.DPHuBERTModel.forward

    def recording(self, source, *args, **kwargs):
        seen.append((tuple(source.shape), source.dtype, next(self.parameters()).dtype))
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(dp.DPHuBERTModel, "forward", recording)
    table = profile(
        teacher_cfg(), seconds=0.1, variants=4, repeat=1, log=lambda line: None, batch=2, dtype="bfloat16"
    )
    assert seen and all(s == ((2, 1600), torch.bfloat16, torch.bfloat16) for s in seen)
    assert (table.batch, table.dtype) == (2, "bfloat16")
    path = str(tmp_path / "t.json")
    table.save(path)
    assert (load_table(path).batch, load_table(path).dtype) == (2, "bfloat16")
    old = {k: v for k, v in table.to_dict().items() if k not in ("batch", "dtype")}
    assert (LatencyTable.from_dict(old).batch, LatencyTable.from_dict(old).dtype) == (1, "float32")
    with pytest.raises(ValueError, match="dtype one of float32, float16, bfloat16"):
        LatencyTable.from_dict({**old, "dtype": "int8"})


def test_a_negative_slope_is_not_fitted():
    """Noisy timings whose best line falls with the size: the table keeps every cost >= 0, so the predicted
    time never falls when a unit is kept, which the landing on the target relies on."""
    from dphubert_fairseq.latency import fit_block

    costs = fit_block([(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.85)], "units")
    assert costs.per_unit == 0.0 and costs.fixed == pytest.approx(0.8875)


def test_expected_seconds_are_differentiable_in_every_gate():
    table = synthetic_table()
    student = dp.DPHuBERTModel(dataclasses.replace(teacher_cfg(), prune_units=["conv", "head", "interm"]))
    seconds = student.expected_size(table)
    seconds.backward()
    for name, gate in student.gates().items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, name
    # with every gate saturated open, the expected time is what the eval masks imply (counted as the
    # expected size is: with the exact-fold extras of a gated last conv layer)
    with torch.no_grad():
        for gate in student.gates().values():
            gate.log_alpha.fill_(30.0)
    saturated = float(student.expected_size(table).detach())
    assert saturated == pytest.approx(float(student.eval_mask_size(table, sync_free=True)), rel=1e-6)


def test_a_latency_target_lands_on_the_tables_prediction(speech_manifests, tiny_teachers, tmp_path):
    """Stage 1's landing at a latency target (the criterion as fairseq builds it, one update in the final
    phase): the eval masks then keep what the table predicts at the target; the log has the latency
    sparsities."""
    teacher = tiny_teachers["hubert_base"]
    task = helpers.distill_task(speech_manifests, teacher)
    cfg = task.teacher_config
    measured = [synthetic_measurement(c) for c in variant_configs(cfg, 12)]
    # as dphubert-profile writes it: the teacher checkpoint's own model measured slower than the student
    # with every unit kept is predicted, which therefore starts at latency sparsity 0.2
    table = fit_table(cfg, measured, "synthetic", 1, 10.0)
    table.teacher_measured = table.predicted_teacher() / 0.8
    path = str(tmp_path / "cost.json")
    table.save(path)
    _, model, criterion = helpers.landing_student(
        speech_manifests, teacher, ["conv", "head", "interm"], target_metric="latency", latency_table=path
    )
    assert criterion.teacher_size["latency"] == pytest.approx(table.teacher_measured)
    helpers.randomise_gates(model)
    model.train()
    sample = {"net_input": {"source": torch.randn(2, 8000), "padding_mask": None}}
    _, _, log = criterion(model, sample)
    assert {"expected_latency_sparsity", "eval_latency_sparsity", "expected_macs_sparsity"} <= set(log)
    criterion.after_optimizer_step(model, 5)
    reached = 1 - model.eval_mask_size(table) / table.teacher_measured
    assert reached == pytest.approx(0.5, abs=0.02)
    # a target the student meets with every unit kept cannot be landed on: refused, naming where it starts
    with pytest.raises(dp.ConfigError) as e:
        helpers.landing_student(
            speech_manifests,
            teacher,
            ["conv", "head", "interm"],
            target_metric="latency",
            latency_table=path,
            target_sparsity=0.15,
        )
    helpers.assert_one_line(
        str(e.value),
        starts_with="criterion.target_sparsity=0.15 is met before any pruning",
        contains=["latency sparsity 0.2000", "ask for more than 0.2000"],
    )


def test_latency_errors_are_one_line(speech_manifests, tiny_teachers, tmp_path):
    teacher = tiny_teachers["hubert_base"]
    with pytest.raises(dp.ConfigError) as e:
        helpers.landing_student(speech_manifests, teacher, ["head"], target_metric="latency")
    helpers.assert_one_line(str(e.value), starts_with="criterion.latency_table is not set")
    missing = str(tmp_path / "nowhere.json")
    with pytest.raises(dp.ConfigError) as e:
        load_table(missing)
    helpers.assert_one_line(str(e.value), starts_with=f"criterion.latency_table={missing}: no such file")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(dp.ConfigError) as e:
        load_table(str(broken))
    helpers.assert_one_line(str(e.value), contains=["not a dphubert-profile table"])
    for change, message in (
        (
            dict(shape={**other_shape(), "conv_feature_layers": "garbage"}),
            "shape.conv_feature_layers is not a",
        ),
        (dict(teacher_measured=0.0), "the teacher's seconds must be a finite number > 0, got 0.0"),
        (dict(rest=-1.0), "every cost must be a finite number >= 0"),
    ):
        broken.write_text(json.dumps({**synthetic_table().to_dict(), **change}))
        with pytest.raises(dp.ConfigError) as e:
            load_table(str(broken))
        helpers.assert_one_line(str(e.value), contains=[f"{broken}: not a dphubert-profile table ({message}"])
    other = synthetic_table()  # of the tiny config's shape, not this teacher's
    other.shape["encoder_embed_dim"] = 64
    path = str(tmp_path / "other.json")
    other.save(path)
    with pytest.raises(dp.ConfigError) as e:
        helpers.landing_student(
            speech_manifests, teacher, ["head"], target_metric="latency", latency_table=path
        )
    helpers.assert_one_line(str(e.value), starts_with=f"criterion.latency_table={path}: measured for another")


def other_shape():
    return architecture_shape(teacher_cfg())


@pytest.mark.slow
def test_profile_command_writes_a_table_the_report_reads(tiny_teachers, tmp_path):
    """``dphubert-profile`` on a tiny teacher (real timings, short): a table of the teacher's shape that loads,
    whose prediction for the teacher is its measured time within the fit's reported error; ``--report``
    gives the per-block prediction of an exported model."""
    teacher = tiny_teachers["hubert_base"]
    out = str(tmp_path / "cost.json")
    cmd = [sys.executable, "-m", "dphubert_fairseq.latency_profile", "--teacher", teacher, "--out", out]
    proc = subprocess.run(
        cmd + ["--seconds", "1", "--variants", "4", "--repeat", "2", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_table(out)
    teacher_cfg = dp.teacher.load_teacher_and_config(teacher)[1]
    table.check_shape(teacher_cfg, out)
    assert (table.device, table.threads, table.seconds) == ("cpu", 1, 1.0)
    assert table.provenance["profiled_architectures"] == 4 and "fit: largest relative error" in proc.stdout
    assert (
        table.teacher_measured > 0
    )  # the teacher checkpoint's own model, timed: the sparsities' denominator
    measured_teacher = table.provenance["dphubert_teacher_seconds"]  # the teacher's shape as a DPHuBERT model
    error = abs(table.predicted_teacher() / measured_teacher - 1)
    assert error <= table.provenance["max_rel_error"] + 1e-9
    pruned = dp.DPHuBERTModel(
        dataclasses.replace(teacher_cfg, encoder_attention_heads=[1] * teacher_cfg.encoder_layers)
    )
    model_path = str(tmp_path / "pruned.pt")
    dp.save_model(pruned, model_path)
    report = subprocess.run(
        [sys.executable, "-m", "dphubert_fairseq.latency_profile", "--table", out, "--report", model_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    lines = report.stdout.strip().splitlines()
    row = next(line.split() for line in lines if line.split()[0].endswith("pruned.pt"))
    predicted = float(table.predict(pruned.cfg, static_sizes(pruned.cfg)))
    assert lines[-1] == f"{model_path}: {predicted / table.teacher_seconds():.3f} of the teacher's time " + (
        f"(latency sparsity {1 - predicted / table.teacher_seconds():.4f})"
    )
    assert float(row[-1]) == pytest.approx(
        float(table.predict(pruned.cfg, static_sizes(pruned.cfg))), abs=1e-4
    )
    bad = subprocess.run(
        [sys.executable, "-m", "dphubert_fairseq.latency_profile", "--report", model_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2
    helpers.assert_one_line(bad.stderr.strip(), starts_with="dphubert-profile: error: --report needs --table")
