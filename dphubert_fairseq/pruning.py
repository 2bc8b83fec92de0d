"""Export: fold the eval-mode gate masks into the weights and remove what they switched off.

All folding lives here. A gate multiplies the *output* of its units, so its soft value is folded into the
*input* of whatever reads them (the next conv's input channels, out_proj's or fc2's columns) and the units with
a zero mask are index-selected away. Two places need more care than a plain index-select, and are exact here:

- the LayerNorm after the CNN saw the removed channels as zeros: ``FeatureLayerNorm`` keeps them as phantom
  zeros in its statistics, carries the kept channels' soft values as a per-channel scale, and its extra
  ``-mean/std`` output with one more projection column stands for the removed channels' gamma; their beta is
  folded into the projection bias;
- a block whose units are all removed still adds its output bias (times its layer gate): it is kept as a
  0-unit block holding only that bias.

Kept head counts and FFN sizes can be rounded up to multiples (``round_heads`` / ``round_ffn``) for hardware
that prefers them: the extra units are the removed ones whose gates came closest to opening, kept with a mask of
0, so their output columns fold to zero and the output is unchanged; they cost parameters, not accuracy, and
can learn in stage 2 (their input rows keep their trained weights).

One place cannot be exact: in the 'layer_norm' extractor (Large models) each conv block normalises over all
its channels *before* the gate, so removing channels changes the statistics for every kept channel. ``prune``
measures the resulting deviation on a probe input and reports it.
"""

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .conv_spec import format_conv_layers
from .errors import ConfigError, DPHuBERTError
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel, as_config
from .models.hard_concrete import HardConcrete
from .models.prunable_wavlm_attention import PrunableWavLMSelfAttention

logger = logging.getLogger(__name__)


@dataclass
class PruningReport:
    """What ``prune`` did: whether the pruned model reproduces the gated one exactly, and how closely it did
    on the probe input (max abs difference over all hidden states)."""

    exact: bool
    inexact_parts: List[str]
    max_abs_deviation: Optional[float]
    probe: str


def _mask(gate: Optional[HardConcrete], n: int, like: torch.Tensor) -> torch.Tensor:
    """The eval mask in float32 on ``like``'s device, whatever the model's dtype: which units are kept is
    decided on it (a kept unit's soft value can be below fp16's smallest, ~6e-8), and the folds multiply in
    float32 before the result is cast into the pruned model's parameters."""
    if gate is None:
        return torch.ones(n, dtype=torch.float32, device=like.device)
    return gate.deterministic_mask().to(like.device)


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask, as_tuple=False).squeeze(-1)


def round_up(count: int, multiple: int, limit: Optional[int] = None) -> int:
    """``count`` rounded up to a multiple of ``multiple`` (0 stays 0), at most ``limit``."""
    if multiple < 1:
        raise ConfigError(f"a rounding multiple must be >= 1, got {multiple}")
    rounded = math.ceil(count / multiple) * multiple
    return rounded if limit is None else min(rounded, limit)


def rounded_config(
    cfg,
    heads_multiple: int,
    ffn_multiple: int,
    max_heads: Optional[int] = None,
    max_ffn: Optional[int] = None,
) -> DPHuBERTConfig:
    """The architecture ``cfg`` with every head count and FFN size rounded up, at most the teacher's
    ``max_heads`` / ``max_ffn``: the sizes ``prune`` with ``round_heads`` / ``round_ffn`` gives."""
    cfg = as_config(cfg)
    return dataclasses.replace(
        cfg,
        encoder_attention_heads=[round_up(h, heads_multiple, max_heads) for h in cfg.encoder_attention_heads],
        encoder_ffn_embed_dims=[round_up(f, ffn_multiple, max_ffn) for f in cfg.encoder_ffn_embed_dims],
    )


def _units_to_keep(mask: torch.Tensor, gate: Optional[HardConcrete], multiple: int) -> torch.Tensor:
    """Indices of the units with a non-zero mask, plus (rounding) the removed units with the largest gate
    logits until the count is a multiple of ``multiple``; sorted."""
    units = _kept(mask)
    extra = round_up(units.numel(), multiple, mask.numel()) - units.numel()
    if extra > 0 and units.numel() > 0:
        removed = torch.nonzero(mask == 0, as_tuple=False).squeeze(-1)
        order = torch.argsort(gate.log_alpha.detach()[removed], descending=True)
        units = torch.sort(torch.cat([units, removed[order[:extra]]])).values
    return units


def _fold_feature_extractor(
    model: DPHuBERTModel, state: Dict[str, torch.Tensor], cfg: DPHuBERTConfig
) -> List[str]:
    """Conv blocks, the feature LayerNorm and the projection. Returns the parts that are not exact."""
    inexact = []
    prev_kept: Optional[torch.Tensor] = None
    prev_scale: Optional[torch.Tensor] = None
    conv_layers = []
    for i, block in enumerate(model.feature_extractor.blocks):
        prefix = f"feature_extractor.blocks.{i}."
        weight = block.conv.weight
        if prev_kept is not None:
            weight = weight[:, prev_kept, :] * prev_scale.view(1, -1, 1)
        mask = _mask(block.gate, block.out_channels, weight)
        kept = _kept(mask)
        if kept.numel() == 0:
            raise DPHuBERTError(
                f"conv layer {i} would lose all its channels: the model would output constants"
            )
        state[prefix + "conv.weight"] = weight[kept]
        if block.conv.bias is not None:
            state[prefix + "conv.bias"] = block.conv.bias[kept]
        if block.norm is not None:
            state[prefix + "norm.weight"] = block.norm.weight[kept]
            state[prefix + "norm.bias"] = block.norm.bias[kept]
            if block.norm_kind == "layer" and kept.numel() < block.out_channels:
                inexact.append(
                    f"feature_extractor.blocks.{i}: its LayerNorm normalised over {block.out_channels} "
                    f"channels and now over {kept.numel()}"
                )
        conv_layers.append((kept.numel(), block.kernel, block.stride))
        prev_kept, prev_scale = kept, mask[kept]
    cfg.conv_feature_layers = format_conv_layers(conv_layers)

    norm = model.layer_norm
    last_gated = model.feature_extractor.blocks[-1].gate is not None
    removed = torch.tensor(
        sorted(set(range(norm.channels)) - set(prev_kept.tolist())), dtype=torch.long, device=prev_kept.device
    )
    state["layer_norm.weight"] = norm.weight[prev_kept]
    state["layer_norm.bias"] = norm.bias[prev_kept]
    if norm.channel_scale is not None or last_gated:
        old_scale = norm.channel_scale if norm.channel_scale is not None else torch.ones_like(norm.weight)
        state["layer_norm.channel_scale"] = old_scale[prev_kept] * prev_scale
        cfg.feature_norm_channel_scale = True
    cfg.feature_norm_removed_channels = norm.removed_channels + removed.numel()

    proj = model.post_extract_proj
    if proj is not None:
        main, extra = proj.weight[:, : norm.channels], proj.weight[:, norm.channels :]
        weight = main[:, prev_kept]
        if cfg.feature_norm_removed_channels > 0:
            # removed channel j gave (-mean/std) * gamma_j + beta_j to the projection
            column = main[:, removed] @ norm.weight[removed]
            if extra.size(1) > 0:
                column = column + extra[:, 0]
            weight = torch.cat([weight, column.unsqueeze(1)], dim=1)
        state["post_extract_proj.weight"] = weight
        state["post_extract_proj.bias"] = proj.bias + main[:, removed] @ norm.bias[removed]
    return inexact


def _fold_block(
    prefix: str,
    in_projs: Dict[str, torch.nn.Linear],
    out_name: str,
    out_proj: torch.nn.Linear,
    unit_gate: Optional[HardConcrete],
    num_units: int,
    unit_width: int,
    layer_gate: Optional[HardConcrete],
    state: Dict[str, torch.Tensor],
    multiple: int = 1,
) -> Tuple[int, int]:
    """A gated block ``in_projs -> units -> out_proj`` (attention: q/k/v, heads of ``head_dim`` rows, out_proj;
    FFN: fc1, units of 1 row, fc2). Kept units' rows of the input projections are selected, the unit and layer
    mask values folded into out_proj's columns (and the layer mask into its bias). The kept count is rounded up
    to ``multiple`` with removed units, whose columns fold to zero.
    Returns (kept units, 1) or (0, 0) when the layer gate removes the block."""
    like = out_proj.bias
    layer_mask = _mask(layer_gate, 1, like)[0]
    if layer_mask == 0:
        return 0, 0
    unit_mask = _mask(unit_gate, num_units, like)
    units = _units_to_keep(unit_mask, unit_gate, multiple)
    rows = (units.unsqueeze(1) * unit_width + torch.arange(unit_width, device=units.device)).reshape(-1)
    for name, proj in in_projs.items():
        state[prefix + name + ".weight"] = proj.weight[rows]
        state[prefix + name + ".bias"] = proj.bias[rows]
    column_scale = unit_mask[units].repeat_interleave(unit_width) * layer_mask
    state[prefix + out_name + ".weight"] = out_proj.weight[:, rows] * column_scale
    state[prefix + out_name + ".bias"] = out_proj.bias * layer_mask
    return units.numel(), 1


def _fold_attention(
    model: DPHuBERTModel, i: int, state: Dict[str, torch.Tensor], multiple: int = 1
) -> Tuple[int, int]:
    """Layer i's attention block. Returns (heads, use_attention)."""
    attn = model.encoder.layers[i].self_attn
    if attn is None:
        return 0, 0
    prefix = f"encoder.layers.{i}.self_attn."
    in_projs = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj}
    units = _fold_block(
        prefix,
        in_projs,
        "out_proj",
        attn.out_proj,
        attn.head_gate,
        attn.num_heads,
        attn.head_dim,
        attn.layer_gate,
        state,
        multiple,
    )
    if isinstance(attn, PrunableWavLMSelfAttention) and units[1]:
        # the kept heads keep their teacher indices (bias columns, gate input slices) and their grep_a
        kept = _units_to_keep(
            _mask(attn.head_gate, attn.num_heads, attn.out_proj.bias), attn.head_gate, multiple
        )
        state[prefix + "head_index"] = attn.head_index[kept]
        if attn.grep_linear is not None:
            state[prefix + "grep_a"] = attn.grep_a[:, kept]
            state[prefix + "grep_linear.weight"] = attn.grep_linear.weight
            state[prefix + "grep_linear.bias"] = attn.grep_linear.bias
    return units


def _fold_ffn(
    model: DPHuBERTModel, i: int, state: Dict[str, torch.Tensor], multiple: int = 1
) -> Tuple[int, int]:
    """Layer i's FFN block. Returns (units, use_ffn)."""
    ffn = model.encoder.layers[i].ffn
    if ffn is None:
        return 0, 0
    return _fold_block(
        f"encoder.layers.{i}.ffn.",
        {"fc1": ffn.fc1},
        "fc2",
        ffn.fc2,
        ffn.unit_gate,
        ffn.ffn_dim,
        1,
        ffn.layer_gate,
        state,
        multiple,
    )


def probe_input(model: DPHuBERTModel, seconds: float = 1.0) -> torch.Tensor:
    """A fixed, speech-scaled input: two seeded seconds of noise, normalised to unit variance."""
    generator = torch.Generator().manual_seed(0)
    wave = torch.randn(2, int(model.cfg.sample_rate * seconds), generator=generator)
    wave = (wave - wave.mean(-1, keepdim=True)) / wave.std(-1, keepdim=True)
    reference = next(model.parameters())
    return wave.to(device=reference.device, dtype=reference.dtype)


@torch.no_grad()
def max_hidden_state_deviation(a: DPHuBERTModel, b: DPHuBERTModel, source: torch.Tensor) -> float:
    """Max abs difference between the hidden states of two models on ``source`` ``(B, L)``."""
    return max((x - y).abs().max().item() for x, y in zip(a.hidden_states(source), b.hidden_states(source)))


@torch.no_grad()
def prune(
    model: DPHuBERTModel,
    verify: bool = True,
    probe: Optional[torch.Tensor] = None,
    round_heads: int = 1,
    round_ffn: int = 1,
) -> DPHuBERTModel:
    """A new, smaller ``dphubert`` model that computes what ``model`` computes in eval mode, gates folded in.

    The result has no gates, carries its sizes in its config and a ``pruning_report`` (``PruningReport``).
    With ``verify`` both models are run on ``probe`` (default: two fixed seconds of noise) to measure the
    deviation. ``round_heads`` / ``round_ffn``: keep head counts / FFN sizes that are multiples of these
    (rounded up, output unchanged; see the module's docstring).
    """
    for name, value in (("round_heads", round_heads), ("round_ffn", round_ffn)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    was_training = model.training
    model.eval()
    try:
        cfg = as_config(model.cfg)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("log_alpha")}
        for key in [
            k for k in state if k.startswith(("feature_extractor.", "layer_norm.", "post_extract_proj."))
        ]:
            del state[key]
        inexact = _fold_feature_extractor(model, state, cfg)
        heads, ffn_dims, use_attention, use_ffn = [], [], [], []
        for i, layer in enumerate(model.encoder.layers):
            for key in [
                k
                for k in state
                if k.startswith((f"encoder.layers.{i}.self_attn.", f"encoder.layers.{i}.ffn."))
            ]:
                del state[key]
            h, use_a = _fold_attention(model, i, state, round_heads)
            f, use_f = _fold_ffn(model, i, state, round_ffn)
            heads.append(h)
            ffn_dims.append(f)
            use_attention.append(use_a)
            use_ffn.append(use_f)
            if cfg.layer_norm_first:  # a pre-LN block's LayerNorm goes with the block
                for norm, used in (("self_attn_layer_norm", use_a), ("final_layer_norm", use_f)):
                    if not used:
                        state.pop(f"encoder.layers.{i}.{norm}.weight", None)
                        state.pop(f"encoder.layers.{i}.{norm}.bias", None)
        cfg.encoder_attention_heads = heads
        cfg.encoder_ffn_embed_dims = ffn_dims
        cfg.use_attention = use_attention
        cfg.use_ffn = use_ffn
        cfg.prune_units = []

        reference = next(model.parameters())
        pruned = DPHuBERTModel(cfg).to(device=reference.device, dtype=reference.dtype)
        pruned.load_state_dict(state, strict=True)
        pruned.eval()

        deviation = None
        if verify:
            source = probe if probe is not None else probe_input(model)
            deviation = max_hidden_state_deviation(model, pruned, source)
        pruned.pruning_report = PruningReport(
            exact=not inexact,
            inexact_parts=inexact,
            max_abs_deviation=deviation,
            probe="given input" if probe is not None else "2 x 1 s of seeded unit-variance noise",
        )
        if inexact:
            logger.warning(
                "pruning is not exact in %d place(s) (%s); max abs deviation of hidden states on the probe: %s",
                len(inexact),
                "; ".join(inexact),
                deviation,
            )
        elif deviation is not None:
            logger.info(
                "pruned model reproduces the gated one; max abs deviation on the probe: %.3g", deviation
            )
        return pruned
    finally:
        model.train(was_training)
