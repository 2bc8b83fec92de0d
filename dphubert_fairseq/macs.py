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
from typing import Dict, List

from .conv_spec import parse_conv_layers
from .param_count import UnitSizes, static_sizes


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


def attention_macs(frames: int, embed_dim: int, head_dim: int, num_heads: int) -> int:
    inner = head_dim * num_heads
    return 4 * frames * embed_dim * inner + 2 * frames * frames * inner


def relative_position_gate_macs(frames: int, slice_dim: int, num_heads: int) -> int:
    return frames * num_heads * slice_dim * 8


def ffn_macs(frames: int, embed_dim: int, ffn_dim: int) -> int:
    return 2 * frames * embed_dim * ffn_dim


def count_macs(cfg, num_samples: int, sizes: UnitSizes = None) -> MacCount:
    """MACs of a forward pass over one utterance of ``num_samples`` samples (batch 1) for a ``DPHuBERTConfig``
    architecture (``sizes`` default to the config's own). Linear in the batch size."""
    sizes = sizes or static_sizes(cfg)
    count = MacCount()
    length, in_channels = num_samples, 1
    for (_, kernel, stride), out_channels in zip(
        parse_conv_layers(cfg.conv_feature_layers), sizes.conv_channels
    ):
        length = (length - kernel) // stride + 1
        count.conv.append(int(in_channels * out_channels * kernel * length))
        in_channels = out_channels
    frames = length - length % cfg.crop_seq_to_multiple
    count.frames = frames
    dim = cfg.encoder_embed_dim
    if cfg.post_extract_proj:
        features = in_channels + (1 if cfg.feature_norm_removed_channels > 0 else 0)
        count.feature_projection = frames * features * dim
    computed = frames + 1 - cfg.conv_pos % 2
    count.pos_conv = cfg.conv_pos_depth * computed * dim * (dim // cfg.conv_pos_groups) * cfg.conv_pos
    gated_bias = cfg.relative_position_buckets > 0 and cfg.gru_rel_pos
    for heads, ffn_dim, keep_att, keep_ffn in zip(
        sizes.heads, sizes.ffn_dims, sizes.attention_keep, sizes.ffn_keep
    ):
        attention = attention_macs(frames, dim, cfg.attention_head_dim, int(heads))
        if gated_bias:
            attention += relative_position_gate_macs(frames, dim // cfg.relative_position_heads, int(heads))
        count.attention.append(int(keep_att) * attention)
        count.ffn.append(int(keep_ffn) * ffn_macs(frames, dim, int(ffn_dim)))
    return count
