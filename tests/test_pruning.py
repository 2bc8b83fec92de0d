"""prune(model) reproduces the eval-mode gated model, including the cases the reference gets wrong."""

import copy
import dataclasses

import pytest
import torch
from helpers import counted_student_params, padded_batch, randomise_gates

import dphubert_fairseq as dp
from dphubert_fairseq.models.dphubert import as_config
from dphubert_fairseq.pruning import max_hidden_state_deviation

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")


def implied_count(model) -> int:
    """The parameter count the eval masks imply, as the model itself answers it (what the export promises)."""
    return model.eval_mask_params()


@pytest.mark.parametrize("shape", ["hubert_base", "wav2vec2_base", "data2vec_base"])
@pytest.mark.parametrize("units", [("conv", "head", "interm"), ALL_UNITS])
def test_prune_is_exact_for_base_shaped_extractor(tiny_teachers, unequal_batch, shape, units):
    model = randomise_gates(dp.student_from_teacher(tiny_teachers[shape], prune_units=units)).eval()
    pruned = dp.prune(model)
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        gated_states = model.hidden_states(source, mask)
        pruned_states = pruned.hidden_states(source, mask)
    for layer, (a, b) in enumerate(zip(gated_states, pruned_states)):
        assert a.abs().mean() > 0.1
        assert (a - b).abs().max().item() <= 1e-4, f"layer {layer}"

    report = pruned.pruning_report
    assert report.exact and report.inexact_parts == [] and report.max_abs_deviation <= 1e-4
    assert pruned.gates() == {}
    assert not any(n.endswith("log_alpha") for n, _ in pruned.named_parameters())

    # the corner cases really happened: bias-only blocks, removed blocks, removed CNN output channels
    cfg = pruned.cfg
    assert cfg.encoder_attention_heads[0] == 0 and cfg.use_attention[0] == 1
    assert cfg.encoder_ffn_embed_dims[1] == 0 and cfg.use_ffn[1] == 1
    assert pruned.encoder.layers[0].self_attn.out_proj.bias.abs().sum() > 0
    if "attlayer" in units:
        assert cfg.use_attention[2] == 0 and pruned.encoder.layers[2].self_attn is None
        assert cfg.use_ffn[0] == 0 and pruned.encoder.layers[0].ffn is None
    assert cfg.feature_norm_removed_channels > 0 and cfg.feature_norm_channel_scale

    # sizes: what the masks imply, what the modules hold, what count_params says
    direct = counted_student_params(pruned)
    assert dp.count_params(pruned) == direct == implied_count(model)
    assert dp.count_params(pruned) < dp.count_params(model)
    assert model.training is False  # prune leaves the caller's mode alone


def test_a_conv_layer_whose_gates_all_lean_closed_keeps_one_channel(tiny_teachers):
    """A conv layer whose expected count is below half a channel: its eval mask keeps the likeliest channel
    (a conv with no output cannot be exported), and the sizes counted without a host sync, the export and the
    parameter count agree on it."""
    model = randomise_gates(dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=ALL_UNITS))
    gate = model.feature_extractor.blocks[3].gate
    with torch.no_grad():
        gate.log_alpha.fill_(-10.0)
        gate.log_alpha[5] = -2.0
    assert gate.l0_norm().item() < 0.5
    model.eval()
    assert (gate.deterministic_mask() > 0).nonzero().flatten().tolist() == [5]
    assert float(model.eval_mask_params(sync_free=True)) == model.eval_mask_params()
    pruned = dp.prune(model)
    assert pruned.pruning_report.exact
    assert dp.count_params(pruned) == counted_student_params(pruned) == model.eval_mask_params()
    assert pruned.feature_extractor.blocks[3].conv.out_channels == 1


def test_feature_layernorm_of_a_pruned_cnn_keeps_its_statistics_in_float32():
    """An exported model in fp16 (common.fp16, or half inference): the LayerNorm standing for the pruned
    channels sums 500 squares, which overflow fp16 once the channels spread beyond ~11; it computes its
    statistics in float32 as F.layer_norm does, so its output agrees with float32 to fp16's precision."""
    from dphubert_fairseq.models.feature_norm import FeatureLayerNorm

    torch.manual_seed(0)
    norm = FeatureLayerNorm(500, removed_channels=12, channel_scale=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.channel_scale.uniform_(0.5, 1.0)
    x = torch.randn(2, 5, 500) * 15 + 5
    want = norm(x)
    got = copy.deepcopy(norm).half()(x.half())
    assert got.dtype == torch.float16
    assert (got.float() - want).abs().max().item() < 0.02


def test_prune_of_an_fp16_model_keeps_a_channel_whose_soft_value_is_below_fp16(tiny_teachers):
    """Which units are kept is decided on the float32 eval mask: a conv layer's one kept channel, whose soft
    value sigmoid(1.2 log_alpha) is below fp16's smallest number, is kept in fp16 as in float32."""
    widths = []
    for dtype in (torch.float32, torch.float16):
        model = dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=("conv",))
        with torch.no_grad():
            model.feature_extractor.blocks[3].gate.log_alpha.fill_(-15.0)
        pruned = dp.prune(model.to(dtype).eval(), verify=False)
        widths.append(pruned.feature_extractor.blocks[3].conv.out_channels)
    assert widths == [1, 1]


def test_prune_keeps_the_caller_in_training_mode(tiny_teachers):
    model = dp.student_from_teacher(tiny_teachers["hubert_base"]).train()
    dp.prune(model, verify=False)
    assert model.training


def test_feature_layernorm_fold_is_needed(tiny_teachers, unequal_batch):
    """Pruning the feature LayerNorm the reference way (statistics over kept channels only, no column for the
    removed ones) is measurably wrong; ours is exact."""
    model = randomise_gates(
        dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=("conv",))
    ).eval()
    pruned = dp.prune(model)
    naive_cfg = dataclasses.replace(as_config(pruned.cfg), feature_norm_removed_channels=0)
    naive = dp.DPHuBERTModel(naive_cfg).eval()
    state = pruned.state_dict()
    channels = pruned.layer_norm.channels
    state["post_extract_proj.weight"] = state["post_extract_proj.weight"][:, :channels]
    naive.load_state_dict(state)
    source, mask = padded_batch(unequal_batch)
    assert max_hidden_state_deviation(model, pruned, source) <= 1e-4
    assert max_hidden_state_deviation(model, naive, source) > 1e-2


def test_prune_base_sized_hubert(teacher_dir, speech):
    import helpers

    _, _, teacher, _ = helpers.build("hubert", teacher_dir + "/base_labels", size="base", seed=3)
    model = randomise_gates(dp.student_from_teacher(teacher.eval())).eval()
    pruned = dp.prune(model)
    source, mask = padded_batch([speech[0][:32000], speech[1][:24000]])
    assert max_hidden_state_deviation(model, pruned, source) <= 1e-4
    assert dp.count_params(pruned) == counted_student_params(pruned) == implied_count(model)


@pytest.mark.parametrize("shape", ["hubert_large", "wav2vec2_large"])
def test_layer_norm_extractor_deviation_is_measured_and_reported(tiny_teachers, unequal_batch, shape):
    """Large-shaped extractors normalise each conv block over channels that pruning removes: not exact.
    prune says so, measures the deviation on its probe, and the figure holds for real speech."""
    model = randomise_gates(dp.student_from_teacher(tiny_teachers[shape])).eval()
    pruned = dp.prune(model)
    report = pruned.pruning_report
    assert not report.exact
    assert any("LayerNorm" in part for part in report.inexact_parts)
    assert report.max_abs_deviation > 1e-4  # really inexact ...
    assert report.max_abs_deviation == pytest.approx(
        max_hidden_state_deviation(model, pruned, dp.pruning.probe_input(model)), rel=1e-6
    )
    source, mask = padded_batch(unequal_batch, normalize=True)
    speech_deviation = max_hidden_state_deviation(model, pruned, source)
    print(f"{shape}: deviation on the probe {report.max_abs_deviation:.4g}, on speech {speech_deviation:.4g}")
    assert speech_deviation <= 3 * report.max_abs_deviation  # ... by about what was reported

    # with conv pruning off the rest is exact again
    model = randomise_gates(
        dp.student_from_teacher(tiny_teachers[shape], prune_units=("head", "interm"))
    ).eval()
    pruned = dp.prune(model)
    assert pruned.pruning_report.exact and pruned.pruning_report.max_abs_deviation <= 1e-4
