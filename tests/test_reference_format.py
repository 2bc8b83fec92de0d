"""The reference implementation's format (``formats/reference/``, its ``{state_dict,
config}``), both ways, against an independent model of the reference builder: torchaudio's own wav2vec2 /
WavLM modules (torchaudio 2.9), sized per layer, plus the reference's ``dummy_weight`` (a per-channel scale of
the last conv block's output, before the feature LayerNorm) applied by a forward hook. The reference's code is
not used."""

import json
import warnings
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from helpers import assert_one_line, padded_batch, randomise_gates

import dphubert_fairseq as dp
from dphubert_fairseq.errors import CheckpointError, ConfigError, DPHuBERTError
from dphubert_fairseq.export import main as export_main
from dphubert_fairseq.formats.reference import (
    model_from_reference,
    reference_from_model,
    reference_layout,
    save_reference,
)
from dphubert_fairseq.import_reference import main as import_main
from dphubert_fairseq.models.dphubert import as_config, hubert_frame_padding, wav2vec2_frame_padding
from dphubert_fairseq.pruning import probe_input

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")
POS = "encoder.transformer.pos_conv_embed.conv."
#: the reference's old-style weight-norm names -> torchaudio 2.9's parametrization names
TORCHAUDIO_NAMES = {
    POS + "weight_g": POS + "parametrizations.weight.original0",
    POS + "weight_v": POS + "parametrizations.weight.original1",
}
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_zero_sized_linears():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


# ----- the independent model of the reference: torchaudio's modules -----


class NoAttention(nn.Module):
    """A removed attention block: adds nothing."""

    def forward(self, x, attention_mask=None, position_bias=None, key_padding_mask=None):
        return torch.zeros_like(x), position_bias


class NoFeedForward(nn.Module):
    """A removed FFN block: adds nothing."""

    def forward(self, x):
        return torch.zeros_like(x)


class HeadlessAttention(torchaudio.models.wav2vec2.components.SelfAttention):
    """torchaudio's attention with 0 heads (torch's fused attention cannot run one): out_proj of nothing."""

    def forward(self, x, attention_mask=None, position_bias=None, key_padding_mask=None):
        return self.out_proj(x.new_zeros(*x.shape[:2], 0)), None


def _builder_args(config: Dict[str, Any], heads: int) -> Dict[str, Any]:
    keys = [
        "extractor_mode",
        "extractor_conv_layer_config",
        "extractor_conv_bias",
        "encoder_embed_dim",
        "encoder_projection_dropout",
        "encoder_pos_conv_kernel",
        "encoder_pos_conv_groups",
        "encoder_num_layers",
        "encoder_attention_dropout",
        "encoder_ff_interm_dropout",
        "encoder_dropout",
        "encoder_layer_norm_first",
        "encoder_layer_drop",
        "aux_num_out",
    ]
    return dict({k: config[k] for k in keys}, encoder_num_heads=heads, encoder_ff_interm_features=1)


def _add_dummy_weight(model: nn.Module, channels: int) -> None:
    extractor = model.feature_extractor
    extractor.dummy_weight = nn.Parameter(torch.ones(channels))
    extractor.register_forward_hook(lambda module, args, out: (out[0] * module.dummy_weight, out[1]))


def _size_ffn(model: nn.Module, config: Dict[str, Any]) -> None:
    dim = config["encoder_embed_dim"]
    for i, layer in enumerate(model.encoder.transformer.layers):
        if config["encoder_use_feed_forward"][i]:
            units = config["encoder_ff_interm_features"][i]
            layer.feed_forward.intermediate_dense = nn.Linear(dim, units)
            layer.feed_forward.output_dense = nn.Linear(units, dim)
        else:
            layer.feed_forward = NoFeedForward()


def torchaudio_hubert(config: Dict[str, Any]) -> nn.Module:
    """What the reference builder makes for a HuBERT-style ``config``, made of torchaudio's modules (per-layer
    head counts and FFN sizes by resizing their Linear layers), with the reference's state-dict names but for
    the positional conv's weight norm (``TORCHAUDIO_NAMES``)."""
    dim, head_dim = config["encoder_embed_dim"], config["encoder_head_dim"]
    model = torchaudio.models.wav2vec2_model(**_builder_args(config, heads=1))
    for i, layer in enumerate(model.encoder.transformer.layers):
        heads = config["encoder_num_heads"][i]
        if not config["encoder_use_attention"][i]:
            layer.attention = NoAttention()
            continue
        if heads == 0:
            layer.attention = HeadlessAttention(dim, 1)
        attn = layer.attention
        attn.k_proj, attn.v_proj, attn.q_proj = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        attn.out_proj = nn.Linear(heads * head_dim, dim)
        attn.num_heads, attn.head_dim = heads, head_dim
    _size_ffn(model, config)
    _add_dummy_weight(model, config["extractor_conv_layer_config"][-1][0])
    return model.eval()


def torchaudio_wavlm(config: Dict[str, Any]) -> nn.Module:
    """torchaudio's WavLM with every teacher head (its attention is ``nn.MultiheadAttention``-based): a
    WavLM-style reference file runs in it with the removed heads' rows and columns zero
    (``torchaudio_from_file``)."""
    args = _builder_args(config, heads=config["encoder_total_num_heads"][0])
    args.update(
        encoder_num_buckets=config["encoder_num_buckets"], encoder_max_distance=config["encoder_max_distance"]
    )
    model = torchaudio.models.wavlm_model(**args)
    _size_ffn(model, config)
    _add_dummy_weight(model, config["extractor_conv_layer_config"][-1][0])
    return model.eval()


def _wavlm_rows(heads: List[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def torchaudio_from_file(obj: Dict[str, Any]) -> nn.Module:
    """The file run by torchaudio's modules, every entry of the file used and every parameter set
    (``load_state_dict(strict=True)``). WavLM style: the kept heads go to their teacher slots, the rest is
    zero; a removed attention block is all zeros (its output is 0), and without one in layer 0 the bias table
    is zero (the reference then has no relative position bias)."""
    config, state = obj["config"], dict(obj["state_dict"])
    if "encoder_remaining_heads" not in config:
        model = torchaudio_hubert(config)
        model.load_state_dict({TORCHAUDIO_NAMES.get(k, k): v for k, v in state.items()}, strict=True)
        return model
    model = torchaudio_wavlm(config)
    full = model.state_dict()
    dim = config["encoder_embed_dim"]
    head_dim = dim // config["encoder_total_num_heads"][0]
    reference_name = {v: k for k, v in TORCHAUDIO_NAMES.items()}
    out = {}
    for key, like in full.items():
        if ".attention." not in key:
            out[key] = state.pop(reference_name.get(key, key))
            continue
        layer, rest = key.split(
            ".attention.", 1
        )  # torchaudio: attention.{in_proj_*, out_proj.*}, the rest as ours
        i = int(layer.split(".")[-1])
        if not config["encoder_use_attention"][i]:
            out[key] = torch.zeros_like(like)
            continue
        rows = _wavlm_rows(config["encoder_remaining_heads"][i], head_dim)
        theirs = f"{layer}.attention."
        if rest.startswith("attention.in_proj_"):
            part = rest.rsplit("_", 1)[1]  # weight / bias
            value = torch.zeros_like(like)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                value[j * dim + rows] = state.pop(f"{theirs}{name}.{part}")
            out[key] = value
        elif rest == "attention.out_proj.weight":
            value = torch.zeros_like(like)
            value[:, rows] = state.pop(theirs + "out_proj.weight")
            out[key] = value
        else:  # out_proj.bias, rel_attn_embed, gru_rel_pos_linear, gru_rel_pos_const
            out[key] = state.pop(theirs + rest.replace("attention.out_proj", "out_proj"))
    assert not state, f"entries torchaudio's WavLM did not use: {sorted(state)}"
    model.load_state_dict(out, strict=True)
    return model


def file_from_torchaudio(model: nn.Module, config: Dict[str, Any]) -> Dict[str, Any]:
    """The reference-format file of a torchaudio-built model (WavLM: the kept heads' rows and columns)."""
    full = model.state_dict()
    if "encoder_remaining_heads" not in config:
        back = {v: k for k, v in TORCHAUDIO_NAMES.items()}
        return {"state_dict": {back.get(k, k): v.clone() for k, v in full.items()}, "config": config}
    dim = config["encoder_embed_dim"]
    head_dim = dim // config["encoder_total_num_heads"][0]
    state = {}
    for key in reference_layout(config):
        if ".attention." not in key:
            state[key] = full[TORCHAUDIO_NAMES.get(key, key)].clone()
            continue
        prefix, name = key.split(".attention.", 1)
        i = int(prefix.split(".")[3])
        rows = _wavlm_rows(config["encoder_remaining_heads"][i], head_dim)
        attn = prefix + ".attention."
        if name[:6] in ("q_proj", "k_proj", "v_proj"):
            j = ("q_proj", "k_proj", "v_proj").index(name[:6])
            part = name.split(".")[1]
            state[key] = full[f"{attn}attention.in_proj_{part}"][j * dim + rows].clone()
        elif name == "out_proj.weight":
            state[key] = full[attn + "attention.out_proj.weight"][:, rows].clone()
        elif name == "out_proj.bias":
            state[key] = full[attn + "attention.out_proj.bias"].clone()
        else:
            state[key] = full[attn + name].clone()
    return {"state_dict": state, "config": config}


def torchaudio_states(model: nn.Module, waveforms: torch.Tensor, lengths=None, normalize: bool = False):
    """``([h_0, ..., h_L], frame lengths)`` as the reference's ``extract_features`` defines them (h_0: the
    projection output, padded frames zeroed), normalising each waveform over its valid samples first when
    ``normalize`` (the reference's ``normalize_waveform``)."""
    if normalize:
        valid = lengths if lengths is not None else [waveforms.size(1)] * waveforms.size(0)
        waves = [F.layer_norm(w[:n], (int(n),)) for w, n in zip(waveforms, valid)]
        waveforms = nn.utils.rnn.pad_sequence(waves, batch_first=True)
    with torch.no_grad():
        x, frames = model.feature_extractor(waveforms, lengths)
        h0, mask = model.encoder._preprocess(x, frames)
        layers = model.encoder.transformer.get_intermediate_outputs(h0, attention_mask=mask)
    return [h0] + layers, frames


def max_deviation(ours: List[torch.Tensor], theirs: List[torch.Tensor], frames=None) -> float:
    """Max abs difference over all hidden states; h_0 on valid frames only (the reference zeroes padded
    ones)."""
    assert len(ours) == len(theirs)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.abs().mean() > 0.05
        if i == 0 and frames is not None:
            valid = torch.arange(a.size(1))[None, :] < frames[:, None]
            a, b = a[valid], b[valid]
        worst = max(worst, (a - b).abs().max().item())
    return worst


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random norms, biases and ``dummy_weight`` (soft gate values), so that every one of them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dummy_weight"):
                p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1 or "gru_rel_pos" in name or "rel_attn_embed" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def hubert_config(large: bool = False) -> Dict[str, Any]:
    """A tiny HuBERT-style reference config with every corner: per-layer heads, a 0-head (bias-only) and a
    removed attention block, a 0-unit and a removed FFN block."""
    return {
        "extractor_mode": "layer_norm" if large else "group_norm",
        "extractor_conv_layer_config": [(12, 10, 5), (10, 3, 2), (9, 3, 2), (8, 2, 2)],
        "extractor_conv_bias": large,
        "encoder_embed_dim": 16,
        "encoder_projection_dropout": 0.1,
        "encoder_pos_conv_kernel": 6,
        "encoder_pos_conv_groups": 2,
        "encoder_num_layers": 4,
        "encoder_use_attention": [True, True, False, True],
        "encoder_use_feed_forward": [True, False, True, True],
        "encoder_num_heads": [2, 0, 4, 3],
        "encoder_head_dim": 4,
        "encoder_attention_dropout": 0.1,
        "encoder_ff_interm_features": [5, 7, 0, 6],
        "encoder_ff_interm_dropout": 0.1,
        "encoder_dropout": 0.1,
        "encoder_layer_norm_first": large,
        "encoder_layer_drop": 0.05,
        "aux_num_out": None,
        "normalize_waveform": large,
        "extractor_prune_conv_channels": False,
        "encoder_prune_attention_heads": False,
        "encoder_prune_attention_layer": False,
        "encoder_prune_feed_forward_intermediate": False,
        "encoder_prune_feed_forward_layer": False,
    }


def wavlm_config(large: bool = False, layer0: bool = True) -> Dict[str, Any]:
    config = hubert_config(large)
    del config["encoder_num_heads"], config["encoder_head_dim"]
    config.update(
        encoder_use_attention=[layer0, True, False, True],
        encoder_total_num_heads=[4] * 4,
        encoder_remaining_heads=[[0, 3], [], [], [1, 2, 3]],
        encoder_num_buckets=8,
        encoder_max_distance=20,
    )
    return config


def random_file(config: Dict[str, Any], seed: int = 0) -> Tuple[Dict[str, Any], nn.Module]:
    """A reference-format file with random weights made by torchaudio's modules, and the model that runs
    it."""
    torch.manual_seed(seed)
    wavlm = "encoder_remaining_heads" in config
    model = _perturb(torchaudio_wavlm(config) if wavlm else torchaudio_hubert(config), seed)
    obj = file_from_torchaudio(model, config)
    return obj, torchaudio_from_file(obj)


def noise_batch(lengths=(8000, 5600, 3100), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return padded_batch([torch.randn(n, generator=g) for n in lengths])


def normalised(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What fairseq's task feeds a ``normalize`` model: each waveform layer-normalised over its samples."""
    lengths = (~mask).sum(-1)
    waves = [F.layer_norm(w[:n], (int(n),)) for w, n in zip(source, lengths)]
    return nn.utils.rnn.pad_sequence(waves, batch_first=True)


# ----- reading -----


def test_layout_is_the_independent_builders(tmp_path):
    obj, model = random_file(hubert_config())
    renamed = {TORCHAUDIO_NAMES.get(k, k): tuple(v.shape) for k, v in model.state_dict().items()}
    layout = {TORCHAUDIO_NAMES.get(k, k): v for k, v in reference_layout(obj["config"]).items()}
    assert layout == renamed


@pytest.mark.parametrize("large", [False, True], ids=["post_ln_group_norm", "pre_ln_layer_norm"])
def test_import_reproduces_the_reference_on_a_padded_batch(tmp_path, large):
    obj, reference = random_file(hubert_config(large), seed=int(large))
    path = save_reference(obj, tmp_path / "ref.pth")
    model = model_from_reference(path)
    assert not model.training and model.gates() == {}
    cfg = model.cfg
    assert cfg.frame_padding == "wav2vec2" and cfg.normalize is large and cfg.feature_norm_channel_scale
    assert cfg.encoder_attention_heads == [2, 0, 0, 3] and cfg.use_attention == [1, 1, 0, 1]
    assert cfg.encoder_ffn_embed_dims == [5, 0, 0, 6] and cfg.use_ffn == [1, 0, 1, 1]
    source, mask = noise_batch()
    lengths = (~mask).sum(-1)
    theirs, frames = torchaudio_states(reference, source, lengths, normalize=large)
    ours = model.hidden_states(normalised(source, mask) if large else source, mask)
    # the length-based frame mask is our 'wav2vec2' padding: every frame agrees from layer 1 on
    assert frames.tolist() != [frames[0].item()] * 3
    assert max_deviation(ours, theirs, frames) <= TOL
    # every tensor of the file is held, but the LayerNorms of the two removed pre-LN blocks (unused)
    unused = 2 * 2 * 16 if large else 0
    assert dp.count_params(model) == sum(v.numel() for v in obj["state_dict"].values()) - unused


def test_frame_padding_convention_is_wav2vec2s():
    reference = torchaudio_hubert(hubert_config())
    output_lengths = model_from_reference(random_file(hubert_config())[0]).feature_extractor.output_lengths
    differs = 0
    for n in range(3000, 3400, 7):
        source, mask = padded_batch([torch.zeros(3400), torch.zeros(n)])
        with torch.no_grad():
            x, frames = reference.feature_extractor(source, (~mask).sum(-1))
        theirs = torch.arange(x.size(1))[None, :] >= frames[:, None]
        ours = wav2vec2_frame_padding(mask, x.size(1), output_lengths)
        assert torch.equal(ours, theirs)
        differs += not torch.equal(hubert_frame_padding(mask, x.size(1)), theirs)
    assert differs > 0  # HuBERT's rule is another convention


@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
def test_import_wavlm_style_reproduces_the_reference(tmp_path, large):
    obj, reference = random_file(wavlm_config(large), seed=2)
    model = model_from_reference(save_reference(obj, tmp_path / "wavlm.pth"))
    cfg = model.cfg
    assert cfg.relative_position_buckets == 8 and cfg.relative_position_heads == 4 and cfg.gru_rel_pos
    assert [
        a.head_index.tolist() for a in (model.encoder.layers[0].self_attn, model.encoder.layers[3].self_attn)
    ] == [
        [0, 3],
        [1, 2, 3],
    ]
    source, _ = noise_batch(lengths=(6000, 6000))  # torchaudio's WavLM takes no lengths
    theirs, _ = torchaudio_states(reference, source, normalize=large)
    ours = model.hidden_states(F.layer_norm(source, source.shape[-1:]) if large else source)
    assert max_deviation(ours, theirs) <= TOL


def test_import_wavlm_without_layer0_attention_has_no_position_bias(tmp_path):
    obj, reference = random_file(wavlm_config(layer0=False), seed=3)
    model = model_from_reference(obj)
    assert model.cfg.relative_position_buckets == 0
    assert any("without an attention block in layer 0" in note for note in model.reference_notes)
    source, _ = noise_batch(lengths=(6000, 6000))
    assert max_deviation(model.hidden_states(source), torchaudio_states(reference, source)[0]) <= TOL


def test_import_leaves_out_the_aux_head_and_says_so(tmp_path, caplog):
    config = dict(hubert_config(), aux_num_out=5)
    obj, reference = random_file(config)
    obj["distill_linear_projs"] = {"0.weight": torch.zeros(2, 2)}
    with caplog.at_level("INFO", logger="dphubert_fairseq.formats.reference"):
        model = model_from_reference(save_reference(obj, tmp_path / "aux.pth"))
    assert any("aux layer" in r.getMessage() and "aux.pth" in r.getMessage() for r in caplog.records)
    assert any("distill_linear_projs" in note for note in model.reference_notes)
    source, _ = noise_batch()
    assert max_deviation(model.hidden_states(source), torchaudio_states(reference, source)[0]) <= TOL


# ----- writing -----


def _soft_open(gate, seed: int = 0) -> None:
    """Every gate open in the eval mask, with soft values (0.95 to 0.998): kept, scaled."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.log_alpha.copy_(2.5 + 2.5 * torch.rand(gate.n, generator=g))


def _pruned(teacher: str, units=ALL_UNITS, last_removed: Optional[int] = None) -> dp.DPHuBERTModel:
    """Pruned tiny student with random gates; the last conv layer keeps all its channels (soft-scaled), or
    loses ``last_removed`` of them."""
    model = randomise_gates(dp.student_from_teacher(teacher, prune_units=units))
    last = model.feature_extractor.blocks[-1].gate
    if last is not None:
        _soft_open(last)
        if last_removed:
            with torch.no_grad():
                last.log_alpha[:last_removed] = -10.0
    return dp.prune(model.eval())


def _probe_states(model, obj):
    """Hidden states of ``model`` and of the file run by torchaudio on ``prune``'s probe (a ``normalize``
    model gets the probe normalised as the reference's ``normalize_waveform`` does it)."""
    probe = probe_input(model)
    theirs, _ = torchaudio_states(torchaudio_from_file(obj), probe, normalize=model.cfg.normalize)
    ours = F.layer_norm(probe, probe.shape[-1:]) if model.cfg.normalize else probe
    return model.hidden_states(ours), theirs


def test_export_without_removed_last_channels_is_exact(tiny_teachers):
    pruned = _pruned(tiny_teachers["hubert_base"])
    norm = pruned.layer_norm
    assert norm.removed_channels == 0 and (norm.channel_scale < 0.999).any()  # dummy_weight is not trivial
    obj, report = reference_from_model(pruned)
    assert report.exact and report.inexact_parts == [] and report.max_abs_deviation <= TOL
    assert report.filler_params == 0
    assert any("frame padding" in note for note in report.notes)  # a HuBERT student masks frames HuBERT's way
    assert torch.equal(obj["state_dict"]["feature_extractor.dummy_weight"], norm.channel_scale.detach())
    assert obj["config"]["encoder_num_heads"][0] == 0 and obj["config"]["encoder_use_attention"][2] is False
    reference = torchaudio_from_file(obj)  # strict
    source = torch.randn(3, 16000, generator=torch.Generator().manual_seed(1))
    assert max_deviation(pruned.hidden_states(source), torchaudio_states(reference, source)[0]) <= TOL


def test_export_of_a_pre_ln_model_is_exact_on_a_padded_batch(tiny_teachers):
    pruned = _pruned(tiny_teachers["wav2vec2_large"], units=("head", "interm", "attlayer", "ffnlayer"))
    assert pruned.cfg.frame_padding == "wav2vec2" and pruned.cfg.normalize and pruned.cfg.layer_norm_first
    obj, report = reference_from_model(pruned)
    assert report.exact and report.max_abs_deviation <= TOL
    assert report.filler_params > 0  # the unused LayerNorms of removed pre-LN blocks
    assert obj["config"]["normalize_waveform"] is True
    source, mask = noise_batch(lengths=(16000, 11000, 7300))
    theirs, frames = torchaudio_states(torchaudio_from_file(obj), source, (~mask).sum(-1), normalize=True)
    assert max_deviation(pruned.hidden_states(normalised(source, mask), mask), theirs, frames) <= TOL


def test_export_with_removed_last_channels(tiny_teachers):
    """'compact' is the reference's own layout: not exact, the deviation measured, reported, and what
    torchaudio's model of the file shows; 'exact' keeps zero channels and reproduces the model."""
    pruned = _pruned(tiny_teachers["hubert_base"], last_removed=2)
    assert pruned.layer_norm.removed_channels == 2
    obj, report = reference_from_model(pruned, layout="compact")
    assert not report.exact and "feature LayerNorm" in report.inexact_parts[0]
    ours, theirs = _probe_states(pruned, obj)
    seen = max_deviation(ours, theirs)
    print(
        "compact layout, 2 of 24 last CNN channels removed: deviation on the probe "
        f"{report.max_abs_deviation:.3g}"
    )
    assert TOL < report.max_abs_deviation < 0.5
    assert seen == pytest.approx(report.max_abs_deviation, rel=1e-3, abs=1e-5)
    assert obj["config"]["extractor_conv_layer_config"][-1][0] == 22

    obj, report = reference_from_model(pruned, layout="exact")
    assert report.exact and report.max_abs_deviation <= TOL
    assert report.filler_params > 0
    assert obj["config"]["extractor_conv_layer_config"][-1][0] == 24
    assert (obj["state_dict"]["feature_extractor.dummy_weight"][-2:] == 0).all()
    ours, theirs = _probe_states(pruned, obj)
    assert max_deviation(ours, theirs) <= TOL


def test_layer_norm_extractor_is_measured_in_both_layouts(tiny_teachers):
    pruned = _pruned(tiny_teachers["hubert_large"], last_removed=2)
    for layout in ("exact", "compact"):
        obj, report = reference_from_model(pruned, layout=layout)
        assert not report.exact and report.max_abs_deviation > TOL
        ours, theirs = _probe_states(pruned, obj)
        assert max_deviation(ours, theirs) == pytest.approx(report.max_abs_deviation, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("last_removed", [0, 3])
def test_round_trip_is_exact(tiny_teachers, tmp_path, last_removed):
    pruned = _pruned(tiny_teachers["hubert_base"], last_removed=last_removed)
    obj, _ = reference_from_model(pruned)
    back = model_from_reference(save_reference(obj, tmp_path / "rt.pth"))
    source = torch.randn(2, 12000, generator=torch.Generator().manual_seed(2))
    assert max_deviation(pruned.hidden_states(source), back.hidden_states(source)) <= TOL
    # the zero channels of the 'exact' layout become removed channels again: the same architecture and size
    assert back.cfg.conv_feature_layers == pruned.cfg.conv_feature_layers
    assert back.layer_norm.removed_channels == pruned.layer_norm.removed_channels
    assert dp.count_params(back) == dp.count_params(pruned)
    again, _ = reference_from_model(back)
    assert again["config"] == obj["config"]
    for key, value in obj["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key


@pytest.mark.parametrize("gru", [True, False], ids=["gated_bias", "plain_bias"])
def test_export_wavlm_without_layer0_attention_is_exact(wavlm_teachers, gru):
    student = randomise_gates(dp.student_from_teacher(wavlm_teachers["wavlm_base"], prune_units=ALL_UNITS))
    layers = student.encoder.layers
    with torch.no_grad():
        layers[0].self_attn.layer_gate.log_alpha.fill_(-10.0)  # layer 0 loses its attention block
        layers[2].self_attn.layer_gate.log_alpha.fill_(5.0)
        layers[1].self_attn.head_gate.log_alpha.copy_(torch.tensor([-10.0, 3.0, -10.0, 0.5]))
        _soft_open(student.feature_extractor.blocks[-1].gate)
    pruned = dp.prune(student.eval())
    if not gru:  # the same model with WavLM's bias gates off
        cfg = as_config(pruned.cfg)
        cfg.gru_rel_pos = False
        plain = dp.DPHuBERTModel(cfg).eval()
        plain.load_state_dict({k: v for k, v in pruned.state_dict().items() if ".grep_" not in k})
        pruned = plain
    assert pruned.cfg.use_attention[0] == 0 and pruned.cfg.relative_position_buckets > 0
    obj, report = reference_from_model(pruned)
    assert report.exact and report.max_abs_deviation <= TOL
    config = obj["config"]
    assert config["encoder_use_attention"][0] is True and config["encoder_remaining_heads"][0] == []
    assert config["encoder_remaining_heads"][1] == pruned.encoder.layers[1].self_attn.head_index.tolist()
    source = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    theirs, _ = torchaudio_states(torchaudio_from_file(obj), source)
    assert max_deviation(pruned.hidden_states(source), theirs) <= TOL
    back = model_from_reference(obj)
    assert max_deviation(pruned.hidden_states(source), back.hidden_states(source)) <= TOL


def test_what_cannot_be_written_is_refused(tiny_teachers):
    gated = dp.student_from_teacher(tiny_teachers["hubert_base"])
    with pytest.raises(DPHuBERTError, match="hard-concrete gates"):
        reference_from_model(gated)
    cfg = as_config(gated.cfg)
    cfg.prune_units, cfg.activation_fn = [], "relu"
    with pytest.raises(ConfigError) as err:
        reference_from_model(dp.DPHuBERTModel(cfg))
    assert_one_line(str(err.value), contains=["model.activation_fn"])
    if hasattr(cfg, "conv_pos_depth"):  # data2vec's stack of positional convs
        cfg.activation_fn, cfg.conv_pos_depth = "gelu", 2
        with pytest.raises(ConfigError) as err:
            reference_from_model(dp.DPHuBERTModel(cfg))
        assert_one_line(str(err.value), contains=["model.conv_pos_depth"])


# ----- bad files -----


def _bad(obj: Dict[str, Any], change) -> Dict[str, Any]:
    obj = {"state_dict": dict(obj["state_dict"]), "config": dict(obj["config"])}
    change(obj)
    return obj


Q0 = "encoder.transformer.layers.0.attention.q_proj.weight"
BAD_FILES = {
    "prune_flag": (
        lambda o: o["config"].update(encoder_prune_attention_heads=True),
        "encoder_prune_attention_heads",
    ),
    "missing_tensor": (lambda o: o["state_dict"].pop(Q0), Q0),
    "unexpected_tensor": (
        lambda o: o["state_dict"].update(
            {"feature_extractor.conv_layers.0.hard_concrete.log_alpha": torch.zeros(12)}
        ),
        "hard_concrete.log_alpha",
    ),
    "wrong_shape": (lambda o: o["state_dict"].update({Q0: torch.zeros(3, 16)}), Q0),
    "extractor_mode": (lambda o: o["config"].update(extractor_mode="conformer"), "extractor_mode"),
    "missing_key": (lambda o: o["config"].pop("encoder_head_dim"), "encoder_head_dim"),
    "unknown_key": (lambda o: o["config"].update(encoder_conv_type="x"), "encoder_conv_type"),
    "layer_count": (lambda o: o["config"].update(encoder_num_heads=[2, 0]), "encoder_num_heads"),
    "no_config": (lambda o: o.pop("config"), "'config'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_line_naming_file_and_key(tmp_path, case):
    change, key = BAD_FILES[case]
    path = save_reference(_bad(random_file(hubert_config())[0], change), tmp_path / f"{case}.pth")
    with pytest.raises(CheckpointError) as err:
        model_from_reference(path)
    assert_one_line(str(err.value), starts_with=path, contains=[key])


def test_other_files_are_refused(tmp_path, tiny_teachers):
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(CheckpointError) as err:
        model_from_reference(listing)
    assert_one_line(str(err.value), starts_with=str(listing), contains=["not a reference-format dict"])
    fairseq = dp.save_model(_pruned(tiny_teachers["hubert_base"]), tmp_path / "fairseq.pt")
    with pytest.raises(CheckpointError) as err:
        model_from_reference(fairseq)
    assert_one_line(str(err.value), starts_with=fairseq, contains=["is a fairseq checkpoint"])


# ----- the commands -----


def test_import_command(tmp_path, capsys):
    obj, reference = random_file(dict(hubert_config(), aux_num_out=3))
    ref = save_reference(obj, tmp_path / "ref.pth")
    out, summary = tmp_path / "imported.pt", tmp_path / "summary.json"
    assert import_main([ref, str(out), "--json", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "note: ignored the aux layer" in printed and f"wrote {out}" in printed
    model = dp.load_model(str(out))
    source, mask = noise_batch()
    theirs, frames = torchaudio_states(reference, source, (~mask).sum(-1))
    assert max_deviation(model.hidden_states(source, mask), theirs, frames) <= TOL
    data = json.loads(summary.read_text())
    assert data["format"] == "reference" and data["params"] == dp.count_params(model)

    assert import_main([str(out), str(tmp_path / "again.pt")]) == 2  # a fairseq checkpoint is not one
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert_one_line(err, starts_with="dphubert-import: error: " + str(out), contains=["fairseq checkpoint"])


def test_export_command_writes_the_reference_format(tiny_teachers, tmp_path, capsys):
    gated = randomise_gates(
        dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=ALL_UNITS)
    ).eval()
    source_ckpt = dp.save_model(gated, tmp_path / "gated.pt")
    out, summary = tmp_path / "pruned.pth", tmp_path / "summary.json"
    assert export_main([source_ckpt, str(out), "--format", "reference", "--json", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "reference format (exact): exact" in printed
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"state_dict", "config"}
    pruned = dp.prune(gated)
    source = torch.randn(2, 16000, generator=torch.Generator().manual_seed(4))
    theirs, _ = torchaudio_states(torchaudio_from_file(obj), source)
    assert max_deviation(pruned.hidden_states(source), theirs) <= TOL
    data = json.loads(summary.read_text())
    assert data["format"] == "reference" and data["reference"]["exact"] is True
    assert data["reference"]["max_abs_deviation"] <= TOL

    assert export_main([source_ckpt, str(tmp_path / "x.pt"), "--reference-layout", "compact"]) == 2
    assert "--reference-layout applies to --format reference" in capsys.readouterr().err
