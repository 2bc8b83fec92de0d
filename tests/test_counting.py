"""Parameter counting: one convention, the same numbers from the arithmetic and from the modules."""

import pytest
import torch
from helpers import build, counted_modules, counted_student_params, direct_count, padded_batch

import dphubert_fairseq as dp
from dphubert_fairseq.param_count import total_params

# HuBERT Base / wav2vec2 Base (same shape): CNN 4,200,448; feature LayerNorm 1,024; projection 393,984;
# positional conv 4,719,488; 12 layers x 7,087,872; encoder LayerNorm 1,536.
BASE_COUNT = 94_370_944
# data2vec audio Base as the tests build it: the positional convolution is 3 layers of kernel 128 // 3 = 42,
# 3 x (768 x 48 x 42 + 768) = 4,647,168 instead of 4,719,488
BASE_COUNTS = {
    "hubert": BASE_COUNT,
    "wav2vec2": BASE_COUNT,
    "data2vec_audio": BASE_COUNT - 4_719_488 + 4_647_168,
}


@pytest.mark.parametrize("kind", list(BASE_COUNTS))
def test_base_shapes_count_agrees_with_direct_sum(tmp_path, kind):
    _, _, teacher, _ = build(kind, str(tmp_path), size="base")
    direct = direct_count(counted_modules(teacher))
    assert dp.count_params(teacher) == direct == BASE_COUNTS[kind]
    # pretraining-only parts exist in the teacher and are not counted
    total = sum(p.numel() for p in teacher.parameters())
    assert total > direct

    student = dp.student_from_teacher(teacher)
    assert dp.count_params(student) == BASE_COUNTS[kind]
    assert counted_student_params(student) == BASE_COUNTS[kind]


def test_expected_params_equals_count_without_active_gates(tiny_teachers):
    plain = dp.student_from_teacher(tiny_teachers["hubert_large"], prune_units=())
    assert plain.expected_params().item() == dp.count_params(plain)


def test_expected_params_is_differentiable_and_follows_the_gates(tiny_teachers):
    model = dp.student_from_teacher(
        tiny_teachers["hubert_base"], prune_units=("conv", "head", "interm", "attlayer")
    )
    full = dp.count_params(model)
    expected = model.expected_params()
    assert expected.dtype == torch.float32 and expected.item() < full
    expected.backward()
    grads = [g.log_alpha.grad for g in model.gates().values()]
    assert all(g is not None and (g > 0).all() for g in grads)  # opening a gate can only add parameters
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.fill_(30.0)  # every gate surely open
    # the full model plus the exact-fold extras counted whenever the last conv layer is gated: its channel
    # scale (C = 24) and the removed-channels column (D = 32, which an export without removed channels lacks)
    assert model.expected_params().item() == pytest.approx(full + 24 + 32, rel=1e-6)
    assert model.eval_mask_params() == full + 24


def test_size_formulas_match_module_sizes():
    """The per-structure formulas against the modules they describe, at odd sizes."""
    from dphubert_fairseq.models.prunable_attention import PrunableSelfAttention
    from dphubert_fairseq.models.prunable_ffn import PrunableFeedForward
    from dphubert_fairseq.param_count import attention_params, ffn_params

    for heads in (0, 1, 5):
        attn = PrunableSelfAttention(40, heads, 8, 0.0)
        assert sum(p.numel() for p in attn.parameters()) == attention_params(40, 8, heads)
    for units in (0, 7):
        ffn = PrunableFeedForward(40, units, "gelu", 0.0)
        assert sum(p.numel() for p in ffn.parameters()) == ffn_params(40, units)


def test_count_of_static_config_matches_model(tiny_teachers):
    model = dp.student_from_teacher(tiny_teachers["wav2vec2_large"], prune_units=())
    from dphubert_fairseq.param_count import static_sizes

    assert total_params(model.cfg, static_sizes(model.cfg)) == counted_student_params(model)


@pytest.mark.parametrize("units", [("interm",), ("head", "ffnlayer"), ("conv", "head", "interm", "attlayer")])
def test_expected_params_agrees_with_the_count_of_a_sampled_structure(tiny_teachers, units):
    """With every gate pushed fully open or shut, the expected count is the count of the kept structure, for
    any mix of gated and ungated per-layer sizes (the vectorised arithmetic's broadcasting paths)."""
    import dataclasses

    from dphubert_fairseq.param_count import total_params

    model = dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=units)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.copy_(torch.where(torch.rand(gate.n, generator=g) < 0.6, 40.0, -40.0))
            gate.log_alpha[0] = 40.0  # keep one unit of each, so the closed-form count is plain
    sizes = model.unit_sizes("eval")
    cfg = dataclasses.replace(model.eval_count_config())  # with the extras an export of it will carry
    assert model.expected_params().item() == pytest.approx(int(total_params(cfg, sizes)), rel=1e-6)


# The reference implementation divides by 94,371,456 for HuBERT Base: its own model format has a per-channel
# scale after the CNN (512 entries) that a fairseq HuBERT does not have. We divide by what the teacher has.
REFERENCE_BASE_DENOMINATOR = 94_371_456


def test_denominator_is_what_the_fairseq_teacher_has(tmp_path):
    _, _, teacher, _ = build("hubert", str(tmp_path), size="base")
    last_conv_channels = teacher.feature_extractor.conv_layers[-1][0].out_channels
    assert dp.count_params(teacher) == direct_count(counted_modules(teacher)) == BASE_COUNT
    assert REFERENCE_BASE_DENOMINATOR - BASE_COUNT == last_conv_channels == 512
    # the difference moves a 0.75 target by 1e-6 of the teacher: 96 parameters of a 23.6M student
    assert round(0.25 * REFERENCE_BASE_DENOMINATOR) - round(0.25 * BASE_COUNT) == 128


def test_a_removed_pre_ln_block_takes_its_layer_norm_along(tiny_teachers, unequal_batch):
    """Pre-LN (Large) layers: a block closed by its whole-layer gate is removed with its LayerNorm, which has
    nothing left to normalise for; the count, the expected count and the exported modules agree on it. (The
    reference keeps and counts both LayerNorms: 2 D parameters more per removed block.)"""

    from dphubert_fairseq.param_count import attention_params, ffn_params, layer_norm_params

    model = dp.student_from_teacher(
        tiny_teachers["hubert_large"], prune_units=("head", "interm", "attlayer", "ffnlayer")
    )
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.fill_(40.0)
        model.encoder.layers[0].self_attn.layer_gate.log_alpha.fill_(-40.0)
        model.encoder.layers[1].ffn.layer_gate.log_alpha.fill_(-40.0)
    full = dp.count_params(model)
    dim = model.cfg.encoder_embed_dim
    pruned = dp.prune(model)
    assert pruned.pruning_report.exact
    layers = pruned.encoder.layers
    assert layers[0].self_attn is None and layers[0].self_attn_layer_norm is None
    assert layers[1].ffn is None and layers[1].final_layer_norm is None
    assert layers[0].final_layer_norm is not None and layers[1].self_attn_layer_norm is not None
    assert dp.count_params(pruned) == counted_student_params(pruned)
    assert model.expected_params().item() == pytest.approx(dp.count_params(pruned), rel=1e-6)
    cfg = model.cfg
    removed = (
        attention_params(dim, cfg.attention_head_dim, cfg.encoder_attention_heads[0])
        + ffn_params(dim, cfg.encoder_ffn_embed_dims[1])
        + 2 * layer_norm_params(dim)
    )
    assert full - dp.count_params(pruned) == removed
    source, mask = padded_batch(unequal_batch, normalize=True)
    model.eval()
    for a, b in zip(model.hidden_states(source, mask), pruned.hidden_states(source, mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
