"""Writing the reference implementation's files from an ungated (pruned) ``dphubert`` model
(``reference_from_model``, ``save_reference``), with a report of whether the file computes the model's hidden
states exactly.

What the format cannot hold exactly, and what ``reference_from_model`` does about it:

- our feature LayerNorm after a pruned CNN keeps the removed channels as zeros in its statistics and carries
  their share through an extra projection input. ``layout='exact'`` writes them back as real channels of the
  last conv layer with zero weights and ``dummy_weight`` 0 (zeros in the LayerNorm's statistics, as in the
  gated model); one of them, with gamma 1, feeds the extra projection column. Exact, at the price of zero
  parameters. ``layout='compact'`` drops them, as the reference's own pruning does: fewer parameters, not
  exact; the deviation is measured and reported. In a 'layer_norm' extractor the zero channels also enter
  the last conv block's LayerNorm, so there neither layout is exact (both are measured);
- WavLM: a bias table used by layers whose layer 0 has no attention block is written with an empty
  (0-head, zero-output) attention block in layer 0, which holds the table; ``gru_rel_pos=False`` is written
  as gates that are exactly 1 (zero linear, ``gru_rel_pos_const`` -2);
- conventions that change no weight are reported as notes: HuBERT-style frame padding (the reference masks
  frames by conv output length, which can leave one more frame of a padded utterance unmasked; every frame
  attends to it, so every frame of that utterance can differ), input normalisation inside the model.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...checkpoint_io import atomic_torch_save
from ...conv_spec import parse_conv_layers
from ...errors import ConfigError, DPHuBERTError
from ...models.dphubert import DPHuBERTConfig, DPHuBERTModel
from ...pruning import max_hidden_state_deviation, probe_input
from .layout import _FE, _PROJ, _TR, LAYOUTS, NEUTRAL_GATE_CONST, PRUNE_FLAGS, Shape, reference_layout
from .reading import model_from_reference

#: the package's name, as when the format was one module, so that logging set up for it still applies
logger = logging.getLogger("dphubert_fairseq.formats.reference")


@dataclass
class ReferenceExportReport:
    """What ``reference_from_model`` did: whether the file computes the model's hidden states exactly, how
    closely it did on the probe input (the file run as the reference runs it), the zero parameters the file
    holds only to express the model exactly, and convention notes that change no weight."""

    layout: str
    exact: bool
    inexact_parts: List[str]
    max_abs_deviation: Optional[float]
    probe: str
    filler_params: int
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """The report for people, one line each."""
        deviation = "not measured" if self.max_abs_deviation is None else f"{self.max_abs_deviation:.3g}"
        if self.exact:
            head = (
                f"reference format ({self.layout}): exact (max abs deviation of hidden states on the probe "
                f"{deviation})"
            )
        else:
            head = (
                f"reference format ({self.layout}): NOT exact: {'; '.join(self.inexact_parts)}; max abs "
                f"deviation of hidden states on the probe {deviation}"
            )
        out = [head]
        if self.filler_params:
            out.append(
                f"the file holds {self.filler_params:,} parameters only to express the model (zeros, ones)"
            )
        return out + [f"note: {note}" for note in self.notes]


def _check_writable(model: DPHuBERTModel) -> None:
    cfg = model.cfg
    if model.gates():
        raise DPHuBERTError(
            "the model still has hard-concrete gates: write its pruned form (dphubert_fairseq.prune, or "
            "dphubert-export) in the reference format"
        )
    problems = [
        (
            cfg.activation_fn != "gelu",
            f"model.activation_fn is {cfg.activation_fn!r}; the reference's FFN uses gelu",
        ),
        (
            cfg.conv_pos_batch_norm,
            "model.conv_pos_batch_norm: the reference's positional conv has weight norm",
        ),
        (
            cfg.conv_pos_depth != 1,
            "model.conv_pos_depth: the reference's positional embedding is one weight-normalised conv",
        ),
        (cfg.crop_seq_to_multiple != 1, "model.crop_seq_to_multiple: the reference never crops frames"),
        (
            cfg.relative_position_buckets > 0
            and cfg.attention_head_dim * cfg.relative_position_heads != cfg.encoder_embed_dim,
            "model.attention_head_dim: a WavLM-style reference file has heads of encoder_embed_dim // "
            "total heads",
        ),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"cannot write the reference format: {why}")


def reference_config(model: DPHuBERTModel, conv: Sequence[Tuple[int, int, int]]) -> Dict[str, Any]:
    """The reference builder's keyword arguments for ``model`` with CNN ``conv`` (HuBERT / wav2vec2 style;
    ``_wavlm_config`` turns them into WavLM's)."""
    cfg = model.cfg
    use_attention = [bool(u) for u in cfg.use_attention]
    use_ffn = [bool(u) for u in cfg.use_ffn]
    config = {
        "extractor_mode": "group_norm" if cfg.extractor_mode == "default" else "layer_norm",
        "extractor_conv_layer_config": [tuple(c) for c in conv],
        "extractor_conv_bias": bool(cfg.conv_bias),
        "encoder_embed_dim": int(cfg.encoder_embed_dim),
        "encoder_projection_dropout": float(cfg.dropout_input),
        "encoder_pos_conv_kernel": int(cfg.conv_pos),
        "encoder_pos_conv_groups": int(cfg.conv_pos_groups),
        "encoder_num_layers": int(cfg.encoder_layers),
        "encoder_use_attention": use_attention,
        "encoder_use_feed_forward": use_ffn,
        "encoder_num_heads": [int(h) if u else 0 for h, u in zip(cfg.encoder_attention_heads, use_attention)],
        "encoder_head_dim": int(cfg.attention_head_dim),
        "encoder_attention_dropout": float(cfg.attention_dropout),
        "encoder_ff_interm_features": [
            int(f) if u else 0 for f, u in zip(cfg.encoder_ffn_embed_dims, use_ffn)
        ],
        "encoder_ff_interm_dropout": float(cfg.activation_dropout),
        "encoder_dropout": float(cfg.dropout),
        "encoder_layer_norm_first": bool(cfg.layer_norm_first),
        "encoder_layer_drop": float(cfg.encoder_layerdrop),
        "aux_num_out": None,
        "normalize_waveform": bool(cfg.normalize),
    }
    config.update({flag: False for flag in PRUNE_FLAGS})
    return config


class _Writer:
    """Collects the file's tensors; counts those that hold no weight of the model (fillers)."""

    def __init__(self) -> None:
        self.state: Dict[str, torch.Tensor] = {}
        self.filler = 0

    def put(self, name: str, value: torch.Tensor, filler: int = 0) -> None:
        self.state[name] = value.detach().cpu().clone()
        self.filler += filler

    def fill(self, name: str, value: torch.Tensor) -> None:
        self.put(name, value, value.numel())


def _write_front_end(
    model: DPHuBERTModel, out: _Writer, layout: str
) -> Tuple[List[Tuple[int, int, int]], List[str]]:
    """CNN, dummy weight, feature LayerNorm, projection. Returns the CNN config and the inexact parts."""
    cfg, norm = model.cfg, model.layer_norm
    conv = [list(c) for c in parse_conv_layers(cfg.conv_feature_layers)]
    removed = norm.removed_channels
    phantom = removed if layout == "exact" else 0
    inexact: List[str] = []
    blocks = model.feature_extractor.blocks
    last = len(blocks) - 1
    dtype = norm.weight.dtype
    scale = norm.channel_scale if norm.channel_scale is not None else torch.ones_like(norm.weight)
    out.put(_FE + "dummy_weight", torch.cat([scale, scale.new_zeros(phantom)]), filler=phantom)
    for i, block in enumerate(blocks):
        prefix = f"{_FE}conv_layers.{i}."
        extra = phantom if i == last else 0
        if block.norm is not None:
            for part in ("weight", "bias"):
                value = getattr(block.norm, part)
                out.put(
                    prefix + "layer_norm." + part, torch.cat([value, value.new_zeros(extra)]), filler=extra
                )
        weight = block.conv.weight
        out.put(
            prefix + "conv.weight",
            torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]),
            extra * weight[0].numel(),
        )
        if block.conv.bias is not None:
            bias = block.conv.bias
            out.put(prefix + "conv.bias", torch.cat([bias, bias.new_zeros(extra)]), filler=extra)
        conv[i][0] += extra
    if phantom and blocks[last].norm_kind == "layer":
        inexact.append(
            f"feature_extractor.conv_layers.{last}: its LayerNorm normalises over the {phantom} zero "
            "channels that stand for the removed ones, too"
        )
    # the phantom channels are exact zeros in the feature LayerNorm; the first carries -mean/std (gamma 1) to
    # the extra projection column, the others output 0 (gamma 0, beta 0)
    gamma = torch.zeros(phantom, dtype=dtype)
    if phantom:
        gamma[0] = 1.0
    out.put(_PROJ + "layer_norm.weight", torch.cat([norm.weight, gamma.to(norm.weight)]), filler=phantom)
    out.put(_PROJ + "layer_norm.bias", torch.cat([norm.bias, norm.bias.new_zeros(phantom)]), filler=phantom)
    proj = model.post_extract_proj
    dim = cfg.encoder_embed_dim
    if proj is None:  # fairseq leaves it out when C == D; the reference always projects: the identity
        out.fill(_PROJ + "projection.weight", torch.eye(dim, dtype=dtype))
        out.fill(_PROJ + "projection.bias", torch.zeros(dim, dtype=dtype))
    else:
        weight = proj.weight[:, : norm.channels]
        if phantom:
            carrier = proj.weight[:, norm.channels :]
            weight = torch.cat([weight, carrier, carrier.new_zeros(dim, phantom - 1)], dim=1)
            out.filler += dim * (phantom - 1)
        out.put(_PROJ + "projection.weight", weight)
        out.put(_PROJ + "projection.bias", proj.bias)
    if removed and not phantom:
        inexact.append(
            f"feature LayerNorm: the model normalises over {norm.channels} kept and {removed} removed (zero) "
            f"CNN channels and feeds the removed ones' share to the projection; the file normalises over the "
            f"{norm.channels} kept ones only (layout 'compact')"
        )
    return [tuple(c) for c in conv], inexact


def _write_encoder(model: DPHuBERTModel, out: _Writer, config: Dict[str, Any]) -> List[str]:
    """Positional conv, encoder LayerNorm, layers (and WavLM's table and gates). Returns notes."""
    cfg, encoder = model.cfg, model.encoder
    notes: List[str] = []
    for part in ("bias", "weight_g", "weight_v"):
        out.put(_TR + "pos_conv_embed.conv." + part, getattr(encoder.pos_conv[0], part))
    out.put(_TR + "layer_norm.weight", encoder.layer_norm.weight)
    out.put(_TR + "layer_norm.bias", encoder.layer_norm.bias)
    table = encoder.relative_attention_bias
    wavlm = table is not None
    dim, like = cfg.encoder_embed_dim, encoder.layer_norm.weight
    if wavlm:
        notes += _wavlm_config(model, config)
    for i, layer in enumerate(encoder.layers):
        prefix = f"{_TR}layers.{i}."
        attn = layer.self_attn
        if attn is not None:
            a = prefix + "attention."
            if wavlm:
                _write_wavlm_gates(attn, a, out, cfg.relative_position_heads)
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                out.put(a + name + ".weight", getattr(attn, name).weight)
                out.put(a + name + ".bias", getattr(attn, name).bias)
            if wavlm and i == 0:
                out.put(a + "rel_attn_embed.weight", table.weight)
        elif wavlm and i == 0 and config["encoder_use_attention"][0]:
            _write_empty_wavlm_attention(prefix + "attention.", out, cfg, table.weight)
        for ours, theirs, present in (
            (layer.self_attn_layer_norm, "layer_norm", attn is not None),
            (layer.final_layer_norm, "final_layer_norm", layer.ffn is not None),
        ):
            if ours is not None:
                out.put(prefix + theirs + ".weight", ours.weight)
                out.put(prefix + theirs + ".bias", ours.bias)
            else:  # a pre-LN LayerNorm of a removed block: the reference keeps one, unused
                out.fill(prefix + theirs + ".weight", torch.ones(dim, dtype=like.dtype))
                out.fill(prefix + theirs + ".bias", torch.zeros(dim, dtype=like.dtype))
        if layer.ffn is not None:
            f = prefix + "feed_forward."
            out.put(f + "intermediate_dense.weight", layer.ffn.fc1.weight)
            out.put(f + "intermediate_dense.bias", layer.ffn.fc1.bias)
            out.put(f + "output_dense.weight", layer.ffn.fc2.weight)
            out.put(f + "output_dense.bias", layer.ffn.fc2.bias)
    return notes


def _wavlm_config(model: DPHuBERTModel, config: Dict[str, Any]) -> List[str]:
    """Turn ``config`` into the WavLM style (in place, in the builder's key order). Returns notes."""
    cfg = model.cfg
    total = int(cfg.relative_position_heads)
    layers = model.encoder.layers
    remaining = [
        [int(h) for h in layer.self_attn.head_index.tolist()] if layer.self_attn is not None else []
        for layer in layers
    ]
    use_attention = list(config["encoder_use_attention"])
    notes = []
    if not use_attention[0] and any(use_attention):
        use_attention[0] = True  # an empty attention block in layer 0 holds the table (see the module's doc)
        notes.append(
            "layer 0 has no attention block; the file gives it an empty one (0 heads, zero output) to hold "
            "the relative position table, which the reference keeps in layer 0"
        )
    if not any(use_attention):
        notes.append("no layer has an attention block: the relative position table is left out (unused)")
    if not cfg.gru_rel_pos:
        notes.append(
            "gru_rel_pos is off: the file's bias gates are set to be exactly 1 (zero linear, constant -2)"
        )
    items = []
    for key, value in config.items():
        if key == "encoder_num_heads":
            items += [
                ("encoder_total_num_heads", [total] * len(layers)),
                ("encoder_remaining_heads", remaining),
                ("encoder_num_buckets", int(cfg.relative_position_buckets)),
                ("encoder_max_distance", int(cfg.relative_position_max_distance)),
            ]
        elif key == "encoder_head_dim":
            continue
        elif key == "encoder_use_attention":
            items.append((key, use_attention))
        else:
            items.append((key, value))
    config.clear()
    config.update(items)
    return notes


def _write_wavlm_gates(attn, prefix: str, out: _Writer, total: int) -> None:
    """``gru_rel_pos_const`` over all teacher heads (the kept ones' ``grep_a`` at their indices) and the gate
    linear; without gates (``gru_rel_pos`` off), gates that are exactly 1."""
    head_dim = attn.embed_dim // total
    like = attn.out_proj.bias
    if attn.grep_linear is not None:
        const = torch.ones(1, total, 1, 1, dtype=like.dtype)
        const[:, attn.head_index.cpu()] = attn.grep_a.detach().cpu()
        out.put(prefix + "gru_rel_pos_const", const, filler=total - attn.num_heads)
        out.put(prefix + "gru_rel_pos_linear.weight", attn.grep_linear.weight)
        out.put(prefix + "gru_rel_pos_linear.bias", attn.grep_linear.bias)
    else:
        out.fill(
            prefix + "gru_rel_pos_const", torch.full((1, total, 1, 1), NEUTRAL_GATE_CONST, dtype=like.dtype)
        )
        out.fill(prefix + "gru_rel_pos_linear.weight", torch.zeros(8, head_dim, dtype=like.dtype))
        out.fill(prefix + "gru_rel_pos_linear.bias", torch.zeros(8, dtype=like.dtype))


def _write_empty_wavlm_attention(prefix: str, out: _Writer, cfg: DPHuBERTConfig, table: torch.Tensor) -> None:
    """Layer 0's stand-in attention: 0 heads, zero output bias, neutral gates, and the bias table."""
    dim, total = cfg.encoder_embed_dim, cfg.relative_position_heads
    dtype = table.dtype
    out.fill(prefix + "gru_rel_pos_const", torch.full((1, total, 1, 1), NEUTRAL_GATE_CONST, dtype=dtype))
    for name in ("k_proj", "v_proj", "q_proj"):
        out.put(prefix + name + ".weight", torch.zeros(0, dim, dtype=dtype))
        out.put(prefix + name + ".bias", torch.zeros(0, dtype=dtype))
    out.put(prefix + "out_proj.weight", torch.zeros(dim, 0, dtype=dtype))
    out.fill(prefix + "out_proj.bias", torch.zeros(dim, dtype=dtype))
    out.put(prefix + "rel_attn_embed.weight", table)
    out.fill(prefix + "gru_rel_pos_linear.weight", torch.zeros(8, dim // total, dtype=dtype))
    out.fill(prefix + "gru_rel_pos_linear.bias", torch.zeros(8, dtype=dtype))


def _convention_notes(model: DPHuBERTModel) -> List[str]:
    cfg = model.cfg
    notes = []
    if cfg.frame_padding == "hubert":
        notes.append(
            "frame padding: the model masks frames HuBERT's way, the reference by conv output length, which can "
            "leave one more frame of a padded utterance unmasked: every frame of that utterance can then "
            "differ (attention reads that frame; unpadded input: no difference)"
        )
    if cfg.normalize:
        notes.append(
            "normalize_waveform is set: the reference model normalises each waveform itself; give it raw "
            "audio"
        )
    if cfg.sample_rate != 16000:
        notes.append(f"the model expects {cfg.sample_rate} Hz audio; the reference format does not record it")
    return notes


def _order_like(state: Dict[str, torch.Tensor], layout: Dict[str, Shape]) -> Dict[str, torch.Tensor]:
    """``state`` in the reference's ``state_dict()`` order, after checking that it matches ``layout``."""
    if set(state) != set(layout):
        raise RuntimeError(
            f"reference export: names differ from the builder's: missing "
            f"{sorted(set(layout) - set(state))[:3]}, extra {sorted(set(state) - set(layout))[:3]}"
        )
    for key, shape in layout.items():
        if tuple(state[key].shape) != shape:
            raise RuntimeError(
                f"reference export: {key} has shape {tuple(state[key].shape)}, the builder's {shape}"
            )
    return {key: state[key] for key in layout}


@torch.no_grad()
def reference_from_model(
    model: DPHuBERTModel,
    layout: str = "exact",
    verify: bool = True,
    probe: Optional[torch.Tensor] = None,
) -> Tuple[Dict[str, Any], ReferenceExportReport]:
    """``({"state_dict", "config"}, report)``: an ungated (pruned) ``dphubert`` model in the reference's
    format, which the reference builder loads with ``strict=True``.

    ``layout``: 'exact' (default) writes CNN channels our feature LayerNorm keeps as phantom zeros as
    zero-weight channels with ``dummy_weight`` 0; 'compact' drops them (the reference's own layout, not
    exact).
    With ``verify`` the file is run the reference's way (``model_from_reference``) on ``probe`` (default: the
    probe of ``pruning.prune``) and the max abs hidden-state deviation from ``model`` is measured.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    _check_writable(model)
    out = _Writer()
    conv, inexact = _write_front_end(model, out, layout)
    config = reference_config(model, conv)
    notes = _write_encoder(model, out, config) + _convention_notes(model)
    obj = {"state_dict": _order_like(out.state, reference_layout(config)), "config": config}
    deviation = None
    if verify:
        was_training = model.training
        model.eval()
        try:
            reference = next(model.parameters())
            # channel for channel, as the reference runs it (no folding of the zero channels back)
            written = model_from_reference(obj, name="the written file", fold_zero_channels=False)
            written = written.to(device=reference.device, dtype=reference.dtype)
            source = probe if probe is not None else probe_input(model)
            deviation = max_hidden_state_deviation(model, written, source)
        finally:
            model.train(was_training)
    report = ReferenceExportReport(
        layout=layout,
        exact=not inexact,
        inexact_parts=inexact,
        max_abs_deviation=deviation,
        probe="given input" if probe is not None else "2 x 1 s of seeded unit-variance noise",
        filler_params=out.filler,
        notes=notes,
    )
    for line in report.lines():
        (logger.warning if line.startswith("reference format") and not report.exact else logger.info)(
            "%s", line
        )
    return obj, report


def save_reference(obj: Dict[str, Any], path: str) -> str:
    """Write a reference-format dict with ``torch.save`` (atomically). Returns the path."""
    atomic_torch_save(obj, str(path))
    return str(path)
