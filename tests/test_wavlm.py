"""WavLM teachers: loaded as released, reproduced exactly (against WavLM's own code), pruned exactly (the gated
relative position bias included), counted, and written / read back as stock fairseq checkpoints."""

import pytest
import torch
from fairseq import checkpoint_utils
from helpers import assert_one_line, build_wavlm, counted_student_params, padded_batch, randomise_gates
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dphubert_fairseq as dp
from dphubert_fairseq.macs import count_macs
from dphubert_fairseq.models.relative_position import relative_position_buckets
from dphubert_fairseq.teacher import config_from_fairseq

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")


def wavlm_states(model, source, mask):
    """``[h_0, ..., h_L]`` from WavLM's own code; h_0 on unpadded frames only (WavLM zeroes its padded frames
    in place), and the frame padding mask."""
    with torch.no_grad():
        features, frame_mask = model.extract_features(source, mask, ret_conv=True)
        features = features.clone()
        (_, layers), _ = model.extract_features(
            source, mask, output_layer=len(model.encoder.layers), ret_layer_results=True
        )
    return [features] + [x.transpose(0, 1) for x, _ in layers[1:]], frame_mask


@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
def test_wavlm_teacher_reproduces_wavlm(wavlm_teachers, unequal_batch, large):
    path = wavlm_teachers["wavlm_large" if large else "wavlm_base"]
    reference = build_wavlm(large, seed=11 if large else 10)  # the same weights as the saved teacher
    teacher = dp.load_teacher(path)
    assert isinstance(teacher, dp.DPHuBERTModel) and not teacher.training
    assert teacher.cfg.layer_norm_first is large and teacher.cfg.normalize is large
    source, mask = padded_batch(unequal_batch, normalize=large)
    theirs, frame_mask = wavlm_states(reference, source, mask)
    ours = dp.teacher_hidden_states(teacher, source, mask)
    assert len(ours) == len(theirs) == 4 and frame_mask.any()
    keep = ~frame_mask
    assert (ours[0][keep] - theirs[0][keep]).abs().max() <= 1e-5
    for layer, (a, b) in enumerate(zip(ours[1:], theirs[1:]), start=1):
        assert a.abs().mean() > 0.1
        assert (a - b).abs().max() <= 1e-5, f"layer {layer}"  # every frame, padded ones included
    # the counted parameters are WavLM's, less its mask embedding (used by pretraining only)
    direct = sum(p.numel() for n, p in reference.named_parameters() if n != "mask_emb")
    assert dp.count_params(teacher) == counted_student_params(teacher) == direct


def test_relative_position_buckets_span_every_kind_of_distance():
    buckets = relative_position_buckets(200, num_buckets=32, max_distance=64)
    assert buckets.shape == (200, 200) and int(buckets.max()) == 31
    # exact buckets for small distances, keys after the query in the upper half, the last ones shared
    assert buckets[10, 10] == 0 and buckets[10, 13] == 16 + 3 and buckets[13, 10] == 3
    assert buckets[0, 199] == buckets[0, 150] == 31 and buckets[199, 0] == 15
    assert len(set(buckets[0].tolist())) == 16  # every bucket of the upper half is used


def _pruned_wavlm_student(path, seed=0):
    """A gated student with random gates whose layer 0 has no attention block at all: the bias table must
    still reach layers 1 and 2."""
    student = randomise_gates(dp.student_from_teacher(path, prune_units=ALL_UNITS), seed=seed)
    layers = student.encoder.layers
    with torch.no_grad():
        layers[0].self_attn.layer_gate.log_alpha.fill_(-10.0)
        layers[2].self_attn.layer_gate.log_alpha.fill_(5.0)
        layers[1].self_attn.head_gate.log_alpha.copy_(torch.tensor([-10.0, 3.0, -10.0, 0.5]))
        layers[2].self_attn.head_gate.log_alpha.copy_(torch.tensor([2.0, -10.0, 1.0, 3.0]))
    return student.eval()


@pytest.mark.parametrize("shape", ["wavlm_base", "wavlm_large"])
@pytest.mark.parametrize("round_heads", [1, 2])
def test_prune_wavlm_is_exact(wavlm_teachers, unequal_batch, shape, round_heads):
    student = _pruned_wavlm_student(wavlm_teachers[shape])
    pruned = dp.prune(student, round_heads=round_heads)
    source, mask = padded_batch(unequal_batch, normalize=student.cfg.normalize)
    with torch.no_grad():
        gated, ours = student.hidden_states(source, mask), pruned.hidden_states(source, mask)
    for layer, (a, b) in enumerate(zip(gated, ours)):
        assert a.abs().mean() > 0.1
        tolerance = 1e-5 if shape == "wavlm_base" else None  # Large: the LayerNorm extractor is inexact
        if tolerance is not None:
            assert (a - b).abs().max() <= tolerance, f"layer {layer}"
    report = pruned.pruning_report
    assert report.exact is (shape == "wavlm_base")

    cfg, layers = pruned.cfg, pruned.encoder.layers
    assert cfg.use_attention == [0, 1, 1] and layers[0].self_attn is None
    assert pruned.encoder.relative_attention_bias.weight.shape == (32, 4)  # every teacher head's column
    with torch.no_grad():  # and it is used: without it, layers 1 and 2 compute something else
        pruned.encoder.relative_attention_bias.weight.zero_()
        unbiased = pruned.hidden_states(source, mask)
    assert torch.equal(unbiased[1], ours[1])  # layer 0 has no attention
    assert (unbiased[2] - ours[2]).abs().max() > 1e-3
    if round_heads == 1:
        assert layers[1].self_attn.head_index.tolist() == [1, 3]
        assert layers[2].self_attn.head_index.tolist() == [0, 2, 3]
        grep_a = student.encoder.layers[2].self_attn.grep_a
        assert torch.equal(layers[2].self_attn.grep_a, grep_a[:, [0, 2, 3]])
    else:  # the extra head is the removed one whose gate came closest to opening: head 1 (logit -10) of 4
        assert layers[2].self_attn.head_index.tolist() == [0, 1, 2, 3]
    assert dp.count_params(pruned) == counted_student_params(pruned)
    if round_heads == 1:
        assert dp.count_params(pruned) == student.eval_mask_params()


def test_wavlm_deviation_on_the_large_shape_is_the_extractor_only(wavlm_teachers, unequal_batch):
    """With the CNN ungated, a Large-shaped WavLM prunes exactly as the Base one does."""
    student = _pruned_wavlm_student(wavlm_teachers["wavlm_large"])
    for block in student.feature_extractor.blocks:
        if block.gate is not None:
            with torch.no_grad():
                block.gate.log_alpha.fill_(10.0)
    pruned = dp.prune(student)
    assert pruned.pruning_report.exact and pruned.pruning_report.max_abs_deviation <= 1e-5


def test_pruned_wavlm_loads_with_stock_fairseq(wavlm_teachers, unequal_batch, tmp_path):
    pruned = dp.prune(_pruned_wavlm_student(wavlm_teachers["wavlm_base"]))
    path = dp.save_model(pruned, str(tmp_path / "dpwavlm.pt"))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    loaded = models[0].eval()
    assert cfg.model._name == "dphubert" and cfg.model.relative_position_buckets == 32
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        for a, b in zip(pruned.hidden_states(source, mask), loaded.hidden_states(source, mask)):
            assert torch.equal(a, b)
    assert loaded.encoder.layers[1].self_attn.head_index.tolist() == [1, 3]


def _flops(model, source):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dp.teacher_hidden_states(model, source)
    return counter.get_total_flops()


def test_wavlm_macs_match_the_flop_counter(wavlm_teachers):
    teacher = dp.load_teacher(wavlm_teachers["wavlm_base"])
    pruned = dp.prune(_pruned_wavlm_student(wavlm_teachers["wavlm_base"]))
    source = torch.randn(1, 16123)
    for model in (teacher, pruned):
        assert _flops(model, source) == 2 * count_macs(model.cfg, source.size(1)).total
    assert config_from_fairseq(teacher).relative_position_heads == 4


def _save_wavlm(path, cfg_changes=None, drop=None, add=None):
    model = build_wavlm()
    state = model.state_dict()
    if drop:
        del state[drop]
    state.update(add or {})
    torch.save({"cfg": dict(model.cfg.__dict__, **(cfg_changes or {})), "model": state}, path)
    return str(path)


@pytest.mark.parametrize(
    "cfg_changes, drop, expected",
    [
        ({"activation_fn": "glu"}, None, "activation_fn 'glu' is not supported; supported"),
        (None, "encoder.layers.1.fc1.weight", "missing weights ['encoder.layers.1.ffn.fc1.weight']"),
        ({"encoder_layers": 2}, None, "unexpected weights ['encoder.layers.2."),
        (
            {"encoder_ffn_embed_dim": 48},
            None,
            "encoder.layers.0.ffn.fc1.weight has shape (64, 32), the config",
        ),
    ],
)
def test_bad_wavlm_checkpoints_are_refused_clearly(tmp_path, cfg_changes, drop, expected):
    path = _save_wavlm(tmp_path / "wavlm.pt", cfg_changes, drop)
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(path)
    assert_one_line(str(err.value), starts_with=f"{path}: WavLM checkpoint: ", contains=[expected])


def test_pretraining_only_weights_of_a_wavlm_checkpoint_are_left_out(tmp_path):
    path = _save_wavlm(tmp_path / "wavlm.pt", add={"final_proj.weight": torch.ones(4, 32)})
    assert "final_proj.weight" not in dp.load_teacher(path).state_dict()


def test_a_pruned_wavlm_is_not_a_teacher(wavlm_teachers, tmp_path):
    """The plugin's own export is refused as a teacher, as for HuBERT (it is a student)."""
    path = dp.save_model(
        dp.prune(_pruned_wavlm_student(wavlm_teachers["wavlm_base"])), str(tmp_path / "s.pt")
    )
    with pytest.raises(dp.CheckpointError, match="holds a dphubert student"):
        dp.load_teacher(path)
