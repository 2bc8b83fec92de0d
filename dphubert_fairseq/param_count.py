"""Parameter-count arithmetic, written once.

The same functions give the real size of a model (ints), the expected size of a gated model during training
(tensors built from gate probabilities, differentiable) and the size implied by eval-mode masks before export.

Convention (docs/method.md, "Counting convention"): we count what is used to extract representations: the CNN feature extractor, the
LayerNorm and projection after it, the positional convolution, every transformer layer and the encoder's final
LayerNorm. Pretraining-only parts (final_proj, label embeddings, mask embedding, quantizer, target GLU) and
training-only parts (gate logits, distillation projections) are not counted. LayerNorms are never pruned; in a
pre-LayerNorm layer the LayerNorm belongs to its block and disappears with it.

An exported model may carry two small extras that make pruning exact (see ``pruning.py``): a per-channel scale
in front of the feature LayerNorm (the soft gate values of the last conv layer, ``C`` parameters) and one extra
projection column standing for the removed channels (``D`` parameters).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .conv_spec import conv_norm_kind, parse_conv_layers

Number = Union[int, float, torch.Tensor]


def conv_block_params(
    in_channels: Number, out_channels: Number, kernel: int, conv_bias: bool, norm: Optional[str]
) -> Number:
    n = in_channels * out_channels * kernel
    if conv_bias:
        n = n + out_channels
    if norm is not None:
        n = n + 2 * out_channels
    return n


def layer_norm_params(dim: Number) -> Number:
    return 2 * dim


def feature_projection_params(
    channels: Number, embed_dim: int, channel_scale: bool = False, removed_channels_column: bool = False
) -> Number:
    """LayerNorm over the CNN's output channels and the Linear to the encoder dimension."""
    n = layer_norm_params(channels) + (channels + 1) * embed_dim
    if channel_scale:
        n = n + channels
    if removed_channels_column:
        n = n + embed_dim
    return n


def attention_params(embed_dim: int, head_dim: int, num_heads: Number) -> Number:
    """q/k/v projections with bias for ``num_heads`` heads, out_proj with bias (its bias survives 0 heads)."""
    inner = head_dim * num_heads
    return (embed_dim + 1) * 3 * inner + inner * embed_dim + embed_dim


def relative_position_gate_params(slice_dim: int, num_heads: Number) -> Number:
    """WavLM's bias gate in one attention: ``grep_linear`` (a head's input slice to 8, with bias) and one
    ``grep_a`` per head."""
    return (slice_dim + 1) * 8 + num_heads


def relative_position_table_params(num_buckets: int, teacher_heads: int) -> int:
    """WavLM's relative position bias table, one for the encoder: a bias per bucket and teacher head."""
    return num_buckets * teacher_heads


def ffn_params(embed_dim: int, ffn_dim: Number) -> Number:
    """fc1 and fc2 with bias (fc2's bias survives 0 units)."""
    return (embed_dim + 1) * ffn_dim + (ffn_dim + 1) * embed_dim


def pos_conv_params(embed_dim: int, kernel: int, groups: int, batch_norm: bool, depth: int = 1) -> int:
    """fairseq's positional convolution: weight-normalised grouped conv (g over the kernel axis, v) with bias,
    or BatchNorm + plain conv in its batch-norm variant; with ``depth`` > 1, data2vec's stack of ``depth``
    plain grouped convs with bias (its LayerNorms have no parameters)."""
    weight = embed_dim * (embed_dim // groups) * kernel
    if depth > 1:
        return depth * (weight + embed_dim)
    if batch_norm:
        return 2 * embed_dim + weight + embed_dim
    return kernel + weight + embed_dim


@dataclass
class UnitSizes:
    """Size of every prunable structure: ints for a real model, tensors for an expected count.

    ``attention_keep`` / ``ffn_keep`` are 1/0 for a present/removed block, or a keep probability.
    """

    conv_channels: Sequence[Number]
    heads: Sequence[Number]
    ffn_dims: Sequence[Number]
    attention_keep: Sequence[Number]
    ffn_keep: Sequence[Number]


def static_sizes(cfg) -> UnitSizes:
    """The sizes a ``DPHuBERTConfig`` describes."""
    return UnitSizes(
        conv_channels=[c for c, _, _ in parse_conv_layers(cfg.conv_feature_layers)],
        heads=list(cfg.encoder_attention_heads),
        ffn_dims=list(cfg.encoder_ffn_embed_dims),
        attention_keep=[int(u) for u in cfg.use_attention],
        ffn_keep=[int(u) for u in cfg.use_ffn],
    )


def per_layer_vectors(*columns: Sequence[Number]) -> List[Union[np.ndarray, torch.Tensor, int]]:
    """Per-layer size lists as vectors, so that the per-layer formulas run once for all layers.

    Without tensors: int64 arrays (exact). With tensors (expected sizes): a float32 tensor per column that
    holds any, and a column of one repeated Python number stays that number, broadcasting for free: building
    it on the GPU would be a host-to-device copy, which waits for the GPU, in every training step.
    """
    reference = next((v for column in columns for v in column if torch.is_tensor(v)), None)
    if reference is None:
        return [np.asarray(column, dtype=np.int64) for column in columns]
    out: List[Union[torch.Tensor, int]] = []
    for column in columns:
        if all(torch.is_tensor(v) for v in column):
            out.append(torch.stack([v.float() for v in column]))
        elif not any(torch.is_tensor(v) for v in column) and len(set(column)) == 1:
            out.append(column[0])
        else:
            out.append(
                torch.stack(
                    [torch.as_tensor(v, dtype=torch.float32, device=reference.device) for v in column]
                )
            )
    return out


def total_params(cfg, sizes: UnitSizes) -> Number:
    """Counted parameters of a ``DPHuBERTConfig`` architecture whose prunable structures have ``sizes``."""
    conv_layers = parse_conv_layers(cfg.conv_feature_layers)
    embed_dim = cfg.encoder_embed_dim
    n: Number = 0
    in_channels: Number = 1
    for i, ((_, kernel, _), out_channels) in enumerate(zip(conv_layers, sizes.conv_channels)):
        n = n + conv_block_params(
            in_channels, out_channels, kernel, cfg.conv_bias, conv_norm_kind(cfg.extractor_mode, i)
        )
        in_channels = out_channels
    if cfg.post_extract_proj:
        n = n + feature_projection_params(
            in_channels,
            embed_dim,
            channel_scale=cfg.feature_norm_channel_scale,
            removed_channels_column=cfg.feature_norm_removed_channels > 0,
        )
    else:
        n = n + layer_norm_params(in_channels)
    n = n + pos_conv_params(
        embed_dim, cfg.conv_pos, cfg.conv_pos_groups, cfg.conv_pos_batch_norm, cfg.conv_pos_depth
    )
    block_norm = layer_norm_params(embed_dim)
    heads, ffn_dims, keep_att, keep_ffn = per_layer_vectors(
        sizes.heads, sizes.ffn_dims, sizes.attention_keep, sizes.ffn_keep
    )
    attention = attention_params(embed_dim, cfg.attention_head_dim, heads)
    if cfg.relative_position_buckets > 0:
        teacher_heads = cfg.relative_position_heads
        n = n + relative_position_table_params(cfg.relative_position_buckets, teacher_heads)
        if cfg.gru_rel_pos:
            attention = attention + relative_position_gate_params(embed_dim // teacher_heads, heads)
    ffn = ffn_params(embed_dim, ffn_dims)
    if cfg.layer_norm_first:
        attention, ffn = attention + block_norm, ffn + block_norm
    else:
        n = n + 2 * block_norm * len(sizes.heads)
    n = n + (keep_att * attention + keep_ffn * ffn).sum() + layer_norm_params(embed_dim)
    return n if torch.is_tensor(n) else int(n)


def config_params(cfg) -> int:
    """Counted parameters of the architecture a ``DPHuBERTConfig`` describes."""
    return int(total_params(cfg, static_sizes(cfg)))
