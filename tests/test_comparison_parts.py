"""The comparison's parts (``examples/comparison``) that decide what is compared: the students' schedules, the
baseline students (unit selection by magnitude, the parameter count reached), the probe, the label prior, the
statistics of the report and the sentences."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq.conv_spec import parse_conv_layers
from dphubert_fairseq.criterions.distill_loss import DistillationProjections
from examples.comparison import corpus, measures, plan, report, structure, students
from fairseq_runs.kmeans_labels import label_prior


@pytest.mark.parametrize(
    "name, recipe, long_ramp",
    [
        ("default", (267, 133, 26), (300, 100, 200)),
        ("full", (267, 133, 26), (300, 100, 200)),
        ("long", (1067, 533, 106), (1200, 400, 800)),
        ("tiny", (10, 5, 1), (11, 4, 7)),
    ],
)
def test_schedules_follow_their_proportions_with_equal_totals(name, recipe, long_ramp):
    """DPHuBERT: the target ramped over a tenth of stage 1, stage 2 half as long as stage 1 (the recipe's 50k /
    5k / 25k); its long-ramp row: the ramp over 2/3 of stage 1, stage 2 a third of it. Every kind: the same
    total."""
    size = plan.SIZES[name]
    ours, long = size.schedule("dphubert"), size.schedule("dphubert_long_ramp")
    assert (ours.stage1, ours.stage2, ours.ramp) == recipe
    assert (long.stage1, long.stage2, long.ramp) == long_ramp
    assert ours.ramp == max(1, ours.stage1 // 10) and abs(2 * ours.stage2 - ours.stage1) <= 1
    assert long.ramp == max(1, long.stage1 * 2 // 3) and abs(3 * long.stage2 - long.stage1) <= 2
    assert size.schedule("dphubert_10pct") == ours == size.schedule("dphubert_importance_init")
    equal = [kind for kind in plan.KINDS if kind not in plan.AS_STAGE2_OF]
    assert {size.schedule(kind).total for kind in equal} == {size.student_updates}
    # the ablation trained as DPHuBERT's stage 2: that many updates, in one run
    stage2 = size.schedule("largest_in_structure_stage2")
    assert (stage2.stage1, stage2.stage2, stage2.ramp) == (0, ours.stage2, 0)
    baseline = size.schedule("uniform")
    assert (baseline.stage1, baseline.stage2, baseline.ramp) == (0, size.student_updates, 0)
    assert set(plan.PROPORTIONS) <= set(plan.KINDS) and set(plan.KINDS) <= set(report.LABELS)


def test_the_default_size_is_the_claims_and_full_adds_the_rest_on_the_same_teacher():
    """'default': DPHuBERT in both schedules, the two students it claims to beat, and both on a tenth of the
    audio; 'full': every kind, with every other number the same, so that a 'full' run into the same folder
    reuses the default run's cached teacher (``teacher_key``)."""
    default, full = plan.SIZES["default"], plan.SIZES["full"]
    explaining = {*plan.FROM_DPHUBERT_STRUCTURE, *plan.STAGE1_OVERRIDES}  # fresh weights, ablations, option
    assert set(default.kinds) == set(plan.KINDS) - explaining
    assert {"dphubert", "dphubert_long_ramp", "distilhubert", "uniform"} <= set(default.kinds)
    assert set(plan.LITTLE_DATA_KINDS) <= set(default.kinds)
    assert full.kinds == plan.KINDS
    assert dataclasses.replace(full, kinds=default.kinds) == default
    assert full.teacher_key("corpus") == default.teacher_key("corpus")
    assert not set(plan.FROM_DPHUBERT_STRUCTURE) & set(default.kinds)  # nothing waits for a run not made


def test_the_tiny_size_runs_every_code_path_and_the_option_composes():
    """The kinds the tiny end-to-end test leaves out differ from a kind it runs only in their stage-1 overrides
    or their data, or (the structure with fresh weights) in the model built, tested on its own above; the
    option's override composes into configs/dphubert.yaml as the model key it names."""
    from fairseq_runs import CONFIGS, compose

    tiny = plan.SIZES["tiny"]
    assert set(plan.KINDS) - set(tiny.kinds) - {"random_structure"} and "largest_in_structure" in tiny.kinds
    for kind in set(plan.KINDS) - set(tiny.kinds) - {"random_structure"}:
        assert kind in plan.PROPORTIONS and plan.PROPORTIONS[kind] == plan.RECIPE
        assert kind in plan.STAGE1_OVERRIDES or kind in plan.LITTLE_DATA_KINDS
    assert "dphubert" in tiny.kinds and "distilhubert_10pct" in tiny.kinds  # the plain and little-data paths
    assert set(plan.STAGE1_OVERRIDES) <= set(plan.PROPORTIONS)
    (override,) = plan.STAGE1_OVERRIDES["dphubert_importance_init"]
    cfg = compose(CONFIGS, "dphubert", ["task.data=/data", "task.teacher_path=/t.pt", override])
    assert cfg.model.gate_init_importance == plan.GATE_INIT_IMPORTANCE > 0


def test_split_rounds_stage_1_to_the_nearest_update():
    for total in range(3, 400):
        for proportions in (plan.RECIPE, plan.LONG_RAMP):
            s = plan.split(total, proportions)
            exact = total / (1 + float(proportions.stage2))
            assert abs(s.stage1 - exact) <= 0.5 and s.total == total and s.stage2 > 0
            assert s.ramp == max(1, int(s.stage1 * float(proportions.ramp) + 1e-9))
    with pytest.raises(ValueError, match="cannot be split"):
        plan.split(1, plan.RECIPE)


@pytest.fixture(scope="module")
def teacher(tiny_teachers):
    return students.teacher_as_student(dp.load_teacher(tiny_teachers["hubert_base"]))


def test_teacher_as_student_computes_what_the_teacher_computes(tiny_teachers, teacher):
    native = dp.load_teacher(tiny_teachers["hubert_base"])
    source = torch.randn(2, 8000)
    for a, b in zip(dp.teacher_hidden_states(native, source), teacher.hidden_states(source)):
        assert torch.equal(a, b)
    assert teacher.cfg.teacher_identity.startswith("HubertModel sha256:")


def test_selected_units_are_the_largest_and_compute_as_in_the_teacher(teacher):
    every = students.select_units(teacher, [0, 1], [4, 4], [64, 64])
    source = torch.randn(1, 8000)
    for a, b in zip(teacher.hidden_states(source)[:3], every.hidden_states(source)):
        assert torch.equal(a, b)
    picked = students.select_units(teacher, [1], [2], [5])
    attn = teacher.encoder.layers[1].self_attn
    d = teacher.cfg.attention_head_dim
    norms = [
        sum(p.weight[h * d : (h + 1) * d].pow(2).sum() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        + attn.out_proj.weight[:, h * d : (h + 1) * d].pow(2).sum()
        for h in range(4)
    ]
    top = sorted(sorted(range(4), key=lambda h: -norms[h])[:2])
    kept = picked.encoder.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        source = getattr(attn, name)
        assert torch.equal(
            getattr(kept, name).weight, torch.cat([source.weight[h * d : (h + 1) * d] for h in top])
        )
        assert torch.equal(
            getattr(kept, name).bias, torch.cat([source.bias[h * d : (h + 1) * d] for h in top])
        )
    out_cols = torch.cat([attn.out_proj.weight[:, h * d : (h + 1) * d] for h in top], dim=1)
    assert torch.equal(kept.out_proj.weight, out_cols) and torch.equal(kept.out_proj.bias, attn.out_proj.bias)
    ffn = teacher.encoder.layers[1].ffn
    fc1, fc2 = ffn.fc1.weight, ffn.fc2.weight
    units = sorted(sorted(range(64), key=lambda j: -(fc1[j].pow(2).sum() + fc2[:, j].pow(2).sum()))[:5])
    assert units != list(range(5))  # the selection is not the identity's first units
    new = picked.encoder.layers[0].ffn
    assert torch.equal(new.fc1.weight, fc1[units]) and torch.equal(new.fc1.bias, ffn.fc1.bias[units])
    assert torch.equal(new.fc2.weight, fc2[:, units]) and torch.equal(new.fc2.bias, ffn.fc2.bias)
    assert picked.cfg.encoder_layers == 1 and picked.num_params() < teacher.num_params()


@pytest.mark.parametrize("fraction", [0.55, 0.8])
def test_uniform_student_has_equal_layers_at_the_count(teacher, fraction):
    target = round(fraction * teacher.num_params())
    student = students.uniform_student(teacher, target)
    assert abs(student.num_params() - target) <= 0.01 * target
    assert student.cfg.encoder_layers == teacher.cfg.encoder_layers
    assert len(set(student.cfg.encoder_attention_heads)) == 1
    assert max(student.cfg.encoder_ffn_embed_dims) - min(student.cfg.encoder_ffn_embed_dims) <= 1


def test_uniform_cut_is_what_the_uniform_student_keeps(teacher):
    target = round(0.6 * teacher.num_params())
    cut = students.uniform_cut(teacher.cfg, target)
    student = students.uniform_student(teacher, target)
    assert (
        cut.heads == student.cfg.encoder_attention_heads
        and cut.ffn_dims == student.cfg.encoder_ffn_embed_dims
    )
    assert cut.params == student.num_params()


def test_uniform_student_refuses_a_count_it_cannot_reach(teacher):
    with pytest.raises(ValueError, match="every layer kept with one head and one FFN unit is already"):
        students.uniform_student(teacher, round(0.2 * teacher.num_params()))


def test_distilhubert_student_is_the_first_layers_at_the_count(teacher):
    target = round(0.7 * teacher.num_params())
    student = students.distilhubert_student(teacher, target, layers=2)
    assert abs(student.num_params() - target) <= 0.01 * target
    assert student.cfg.encoder_layers == 2 and student.cfg.encoder_attention_heads == [4, 4]
    assert torch.equal(
        student.feature_extractor.blocks[0].conv.weight, teacher.feature_extractor.blocks[0].conv.weight
    )
    for fraction in (0.2, 1.0):
        with pytest.raises(
            ValueError, match="a 2-layer student of this teacher has [0-9,]+ to [0-9,]+ parameters"
        ):
            students.distilhubert_student(teacher, round(fraction * teacher.num_params()), layers=2)


def test_random_structure_keeps_the_architecture_not_the_weights(teacher):
    structure = students.uniform_student(teacher, round(0.5 * teacher.num_params()))
    fresh = students.random_structure(structure, seed=3)
    assert fresh.cfg.encoder_ffn_embed_dims == structure.cfg.encoder_ffn_embed_dims
    assert fresh.num_params() == structure.num_params()
    assert not torch.equal(fresh.encoder.layers[0].ffn.fc1.weight, structure.encoder.layers[0].ffn.fc1.weight)
    again = students.random_structure(structure, seed=3)
    assert torch.equal(fresh.encoder.layers[0].ffn.fc1.weight, again.encoder.layers[0].ffn.fc1.weight)


def test_probe_finds_the_informative_layer():
    rng = np.random.default_rng(0)
    labels = [str(i % 4) for i in range(200)]
    centres = rng.normal(size=(4, 16)) * 3
    informative = np.stack([centres[int(y)] for y in labels]) + rng.normal(size=(200, 16))
    features = np.stack([rng.normal(size=(200, 16)), informative, rng.normal(size=(200, 16))], axis=1)
    train = np.arange(200) < 120
    result = measures.linear_probe(features, labels, train)
    assert result["accuracy"] > 0.95
    assert np.argmax(result["layer_weights"]) == 1 and math.isclose(
        sum(result["layer_weights"]), 1, rel_tol=1e-6
    )
    assert (result["train_items"], result["test_items"], result["classes"]) == (120, 80, 4)
    shuffled = measures.linear_probe(features, list(rng.permutation(labels)), train)
    assert shuffled["accuracy"] < 0.5  # nothing to learn: near chance (0.25)


def test_label_prior_against_a_worked_example(tmp_path):
    (tmp_path / "train.km").write_text("0 0\n0 1\n")
    (tmp_path / "valid.km").write_text("0 1\n")
    prior = label_prior(str(tmp_path))
    # add-one counts [4, 2]: p = [2/3, 1/3]; valid labels 0 and 1
    assert prior["bits"] == pytest.approx((-math.log2(2 / 3) - math.log2(1 / 3)) / 2)
    assert prior["accuracy"] == 0.5


def test_report_statistics_and_noise_statements():
    def row(kind, seed, acc):
        return {
            "kind": kind,
            "seed": seed,
            "params": 100,
            "probes": {"keyword": {"accuracy": acc}, "speaker": {"accuracy": acc}},
            "layers": {"4": {"l1": 0.1, "cos": acc}},
        }

    rows = (
        [row("dphubert", s, a) for s, a in ((1, 0.8), (2, 0.9))]
        + [row("distilhubert", s, a) for s, a in ((1, 0.5), (2, 0.52))]
        + [row("uniform", s, a) for s, a in ((1, 0.8), (2, 0.86))]
    )
    summary = report.aggregate(rows, [4])
    stat = summary["dphubert"]["keyword_accuracy"]
    assert stat["mean"] == pytest.approx(0.85) and stat["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    lines = report.statements(summary, [4])
    assert "keyword_accuracy +0.340 (outside the noise)" in lines[0]
    assert "keyword_accuracy +0.020 (inside the noise)" in lines[1]
    # one seed each side with no spread: a difference of less than one test item is not a difference
    single = report.aggregate(
        [row("dphubert", 1, 0.81), row("uniform", 1, 0.80), row("distilhubert", 1, 0.5)], [4]
    )
    single["dphubert"]["keyword_accuracy"]["n"] = single["uniform"]["keyword_accuracy"]["n"] = 2
    judged = report.statements(single, [4], {"keyword_accuracy": 1 / 50})
    assert "keyword_accuracy +0.010 (inside the noise)" in judged[1]
    rows_with_items = [{"probes": {p: {"test_items": 120} for p in ("keyword", "speaker")}}]
    assert report.resolutions(rows_with_items) == {"keyword_accuracy": 1 / 120, "speaker_accuracy": 1 / 120}


def test_sentences_are_distinct_reproducible_and_honour_exclusions():
    first = corpus.sentences(50, seed=0)
    assert len(set(first)) == 50 and corpus.sentences(50, seed=0) == first
    other = corpus.sentences(50, seed=1, exclude=first)
    assert not set(other) & set(first)
    with pytest.raises(ValueError, match="at most"):
        corpus.sentences(10**7, seed=0)


def test_layer_similarity_against_direct_arithmetic(teacher):
    clips = [np.random.default_rng(i).standard_normal(4000 + 800 * i).astype(np.float32) for i in range(2)]
    same = measures.layer_similarity(teacher, teacher, None, clips, [1, 3])
    for value in same.values():
        assert value["l1"] == pytest.approx(0.0, abs=1e-7) and value["cos"] == pytest.approx(1.0, abs=1e-6)
    # a projection that doubles every state: cosine still 1, L1 the mean |h| over all frames of all clips
    proj = DistillationProjections([[1, 3]], teacher.encoder_embed_dim, prediction_heads=False)
    with torch.no_grad():
        proj.proj[0].weight.mul_(2.0)
    doubled = measures.layer_similarity(teacher, teacher, proj, clips, [1, 3])
    for layer in (1, 3):
        with torch.no_grad():
            states = [teacher.hidden_states(torch.from_numpy(c)[None])[layer][0] for c in clips]
        frames = torch.cat(states)
        assert doubled[layer]["l1"] == pytest.approx(frames.abs().mean().item(), rel=1e-5)
        assert doubled[layer]["cos"] == pytest.approx(1.0, abs=1e-5)


def test_teacher_quality_undoes_fairseqs_normalisation():
    record = {
        "valid_loss": "3.0",
        "valid_loss_features_pen": "0.1",
        "valid_count_m_0": "20",
        "valid_count_u_0": "80",
        "valid_loss_m_0": "0.9",  # 4.5 bits per masked frame, divided by all 100 frames
        "valid_loss_u_0": "2.0",  # 2.5 bits per unmasked frame
        "valid_correct_m_0": "0.25",
        "valid_correct_u_0": "0.5",
        "valid_num_updates": "1500",
    }
    quality = measures.teacher_quality(record, {"bits": 5.5, "accuracy": 0.03})
    assert quality["loss_bits"] == pytest.approx(2.9)
    assert quality["masked_bits"] == pytest.approx(4.5) and quality["unmasked_bits"] == pytest.approx(2.5)
    assert (quality["masked_accuracy"], quality["prior_bits"], quality["updates"]) == (0.25, 5.5, 1500)


def test_probe_splits_hold_out_voices_and_words():
    labels = [
        {"keyword": k, "voice": v, "rendition": 0}
        for v in corpus.TRAIN_VOICES + corpus.HELD_OUT_VOICES
        for k in corpus.KEYWORDS
    ]
    kws, speaker = measures.probe_splits(labels, corpus.HELD_OUT_VOICES, corpus.KEYWORDS[6:])
    assert {w["voice"] for w, t in zip(labels, kws) if not t} == set(corpus.HELD_OUT_VOICES)
    assert not {w["voice"] for w, t in zip(labels, kws) if t} & set(corpus.HELD_OUT_VOICES)
    assert {w["keyword"] for w, t in zip(labels, speaker) if not t} == set(corpus.KEYWORDS[6:])
    assert {w["voice"] for w, t in zip(labels, speaker) if not t} == {w["voice"] for w in labels}


def test_largest_in_structure_is_the_structure_with_the_teachers_largest_units(tiny_teachers, teacher):
    """The ablations' students: the sizes asked (a whole block removed where 0 is asked), the units of
    largest magnitude with the teacher's weights (the same as ``select_units`` picks), exact."""
    native = dp.load_teacher(tiny_teachers["hubert_base"])
    conv = [c for c, _, _ in parse_conv_layers(teacher.cfg.conv_feature_layers)]
    sizes = {"heads": [2, 0, 4], "ffn_units": [5, 9, 64], "conv_channels": [conv[0] - 3] + conv[1:]}
    built = students.largest_in_structure(native, sizes)
    assert structure.sizes(built) == sizes and built.pruning_report.exact
    assert built.cfg.encoder_attention_heads == [2, 0, 4]  # the block without heads adds its bias
    # the transformer layers are select_units' largest units (conv channels aside, the weights are equal)
    picked = students.select_units(teacher, [0, 1, 2], [2, 1, 4], [5, 9, 64])
    ours, theirs = built.encoder.layers[0], picked.encoder.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert torch.equal(getattr(ours.self_attn, name).weight, getattr(theirs.self_attn, name).weight)
    for layer in (0, 1, 2):
        a, b = built.encoder.layers[layer].ffn, picked.encoder.layers[layer].ffn
        assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.weight, b.fc2.weight)
    # the conv channels removed from the first layer are its lightest
    block = teacher.feature_extractor.blocks
    scores = block[0].conv.weight.pow(2).flatten(1).sum(1) + block[1].conv.weight.transpose(0, 1).pow(
        2
    ).flatten(1).sum(1)
    kept = built.feature_extractor.blocks[0].conv.weight
    expected = block[0].conv.weight[torch.sort(torch.topk(scores, conv[0] - 3).indices).values]
    assert torch.equal(kept, expected)
    with pytest.raises(ValueError, match="units asked"):
        students.largest_in_structure(native, {**sizes, "heads": [5, 0, 4]})
