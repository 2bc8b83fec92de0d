"""Multiply-accumulates of one forward pass, counted analytically per layer.

What is counted: every multiplication of a weight or an activation inside a matrix product or a convolution,
which is where the time goes. Each is one MAC (``2 MACs = FLOPs`` as ``torch.utils.flop_counter`` counts):

- conv block ``i``: ``C_in * C_out * kernel * T_i`` with ``T_i = floor((T_{i-1} - kernel) / stride) + 1``,
  ``T_{-1}`` the number of samples, ``C_in`` of the first block 1;
- feature projection: ``T * F * D``, ``F`` its input features (CNN channels, + 1 column after an exact export);
- positional convolution (padding ``kernel // 2``): ``(T + 1 - kernel % 2) * D * (D / groups) * kernel``
  output frames as computed, before fairseq trims the extra one of even kernels; times its layers
  (data2vec's ``conv_pos_depth``);
- attention with ``H`` heads of ``d``: q, k, v ``3 * T * D * H d``; scores ``T^2 H d``; weighted values
  ``T^2 H d``; out projection ``T * H d * D``;
- WavLM's relative position bias gate (per attention): ``T * H * s * 8``, ``s = D / H_teacher`` the input
  slice each head's gate reads; the bias table lookup and its scaling are elementwise;
- FFN with ``F`` units: ``2 * T * D * F``.

Not counted: normalisations, activations, biases, dropout, softmax, the conv front end's GELU and GroupNorm;
they are elementwise, cost O(size of the activation) and are a few percent of the time. The CNN front end is
counted in full: in HuBERT Base it is about a third of the MACs on 10 s of audio (docs/method.md, "Counting convention"), so a pruned
transformer alone does not tell the speed-up.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .conv_spec import parse_conv_layers
from .latency import LatencyTable
from .param_count import Number, UnitSizes, per_layer_vectors, static_sizes, total_params

#: The utterance length (seconds) at which MACs are a size: a training target (``criterion.target_metric:
#: macs``), a sparsity, the reports' MACs per second. Only the attention's ``T^2`` terms depend on it: a
#: 10 s utterance, the middle of the recipe's 2 to 15.6 s (the reference's batches), weighs them as inference
#: on such utterances does.
NOMINAL_SECONDS = 10.0
#: What a size (target, sparsity) can be counted in without a measured table; a ``latency.LatencyTable`` is
#: the third metric (predicted seconds on the device it was measured on), passed where these names are.
METRICS = ("params", "macs")
Metric = Union[str, LatencyTable]


@dataclass
class MacCount:
    """MACs of one forward pass, by part."""

    conv: List[int] = field(default_factory=list)
    feature_projection: int = 0
    pos_conv: int = 0
    attention: List[int] = field(default_factory=list)
    ffn: List[int] = field(default_factory=list)
    frames: int = 0

    @property
    def total(self) -> int:
        return sum(self.conv) + self.feature_projection + self.pos_conv + sum(self.attention) + sum(self.ffn)

    def as_dict(self) -> Dict[str, object]:
        return {
            "total": self.total,
            "conv": self.conv,
            "feature_projection": self.feature_projection,
            "pos_conv": self.pos_conv,
            "attention": self.attention,
            "ffn": self.ffn,
            "frames": self.frames,
        }


def attention_macs(frames: int, embed_dim: int, head_dim: int, num_heads: Number) -> Number:
    inner = head_dim * num_heads
    return 4 * frames * embed_dim * inner + 2 * frames * frames * inner


def relative_position_gate_macs(frames: int, slice_dim: int, num_heads: Number) -> Number:
    return frames * num_heads * slice_dim * 8


def ffn_macs(frames: int, embed_dim: int, ffn_dim: Number) -> Number:
    return 2 * frames * embed_dim * ffn_dim


def _parts(
    cfg,
    num_samples: int,
    sizes: UnitSizes,
    computed_channels: Optional[Sequence[int]] = None,
    projection_inputs: Optional[int] = None,
) -> MacCount:
    """Every part's MACs for ``sizes``: ints (numpy for the per-layer vectors) for a real architecture,
    tensors for expected sizes (differentiable). The one place the formulas above are applied.

    For a model that leaves inactive units out (``inactive_units``): ``computed_channels``, the output channels
    each conv block computes when they differ from those the next block reads (``sizes.conv_channels``), and
    ``projection_inputs``, the features the projection reads."""
    count = MacCount()
    length, in_channels = num_samples, 1
    conv_layers = parse_conv_layers(cfg.conv_feature_layers)
    computed = computed_channels if computed_channels is not None else sizes.conv_channels
    for (_, kernel, stride), out_channels, computed_out in zip(conv_layers, sizes.conv_channels, computed):
        length = (length - kernel) // stride + 1
        count.conv.append(in_channels * computed_out * kernel * length)
        in_channels = out_channels
    frames = length - length % cfg.crop_seq_to_multiple
    count.frames = frames
    dim = cfg.encoder_embed_dim
    if cfg.post_extract_proj:
        features = in_channels + (1 if cfg.feature_norm_removed_channels > 0 else 0)
        if projection_inputs is not None:
            features = projection_inputs
        count.feature_projection = frames * features * dim
    computed = frames + 1 - cfg.conv_pos % 2
    count.pos_conv = cfg.conv_pos_depth * computed * dim * (dim // cfg.conv_pos_groups) * cfg.conv_pos
    heads, ffn_dims, keep_att, keep_ffn = per_layer_vectors(
        sizes.heads, sizes.ffn_dims, sizes.attention_keep, sizes.ffn_keep
    )
    attention = attention_macs(frames, dim, cfg.attention_head_dim, heads)
    if cfg.relative_position_buckets > 0 and cfg.gru_rel_pos:
        attention = attention + relative_position_gate_macs(frames, dim // cfg.relative_position_heads, heads)
    count.attention = keep_att * attention
    count.ffn = keep_ffn * ffn_macs(frames, dim, ffn_dims)
    return count


def _as_ints(values, layers: int) -> List[int]:
    if isinstance(values, (np.ndarray, torch.Tensor)):
        return [int(v) for v in values.tolist()]
    return [int(values)] * layers


def count_macs(
    cfg,
    num_samples: int,
    sizes: Optional[UnitSizes] = None,
    computed_channels: Optional[Sequence[int]] = None,
    projection_inputs: Optional[int] = None,
) -> MacCount:
    """MACs of a forward pass over one utterance of ``num_samples`` samples (batch 1) for a ``DPHuBERTConfig``
    architecture (``sizes`` default to the config's own), by part. Linear in the batch size.
    ``computed_channels``, ``projection_inputs``: as ``_parts`` takes them."""
    parts = _parts(cfg, num_samples, sizes or static_sizes(cfg), computed_channels, projection_inputs)
    layers = cfg.encoder_layers
    return MacCount(
        conv=[int(c) for c in parts.conv],
        feature_projection=int(parts.feature_projection),
        pos_conv=int(parts.pos_conv),
        attention=_as_ints(parts.attention, layers),
        ffn=_as_ints(parts.ffn, layers),
        frames=parts.frames,
    )


def total_macs(cfg, num_samples: int, sizes: UnitSizes) -> Number:
    """The total of ``count_macs``, for ``sizes`` that may be expected (tensor) sizes: differentiable in
    them, exactly as ``param_count.total_params`` is."""
    parts = _parts(cfg, num_samples, sizes)
    # summed together: a structure without gates is one number standing for every layer (per_layer_vectors),
    # which broadcasts against the other's per-layer vector
    return sum(parts.conv) + parts.feature_projection + parts.pos_conv + (parts.attention + parts.ffn).sum()


def nominal_samples(cfg) -> int:
    """Samples of a ``NOMINAL_SECONDS`` utterance at the model's sample rate."""
    return int(round(NOMINAL_SECONDS * cfg.sample_rate))


def size(cfg, sizes: UnitSizes, metric: Metric) -> Number:
    """The size of an architecture in ``metric``: counted parameters ('params'), MACs of one
    ``NOMINAL_SECONDS`` utterance ('macs'), or the seconds a ``latency.LatencyTable`` predicts. Ints (floats
    for seconds) for real sizes, differentiable tensors for expected ones."""
    if isinstance(metric, LatencyTable):
        return metric.predict(cfg, sizes)
    if metric == "params":
        return total_params(cfg, sizes)
    if metric == "macs":
        n = total_macs(cfg, nominal_samples(cfg), sizes)
        return n if torch.is_tensor(n) else int(n)
    raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def real_size(cfg, sizes: UnitSizes, metric: Metric) -> Union[int, float]:
    """``size`` of real (int) ``sizes`` as a Python number: an int, or float seconds for a latency table."""
    n = size(cfg, sizes, metric)
    return float(n) if isinstance(metric, LatencyTable) else int(n)


def architecture_size(cfg, metric: Metric) -> Union[int, float]:
    """The size in ``metric`` of the architecture a ``DPHuBERTConfig`` describes."""
    return real_size(cfg, static_sizes(cfg), metric)
