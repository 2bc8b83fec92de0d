"""The transformer encoder: positional convolution, prunable layers, final LayerNorm."""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import LayerNorm

from .encoder_layer import PrunableEncoderLayer
from .inactive_units import touch
from .positional_conv import positional_conv
from .prunable_attention import PrunableSelfAttention
from .prunable_ffn import PrunableFeedForward
from .prunable_wavlm_attention import PrunableWavLMSelfAttention
from .relative_position import RelativePositionBias


class PrunableTransformerEncoder(nn.Module):
    """fairseq's wav2vec2 ``TransformerEncoder`` with per-layer sizes, or WavLM's (``relative_position_buckets``
    > 0: the relative position bias table lives here and every layer's attention reads it). Batch-first.

    ``forward((B, T, D), (B, T) padding mask) -> ([h_1, ..., h_L], final)``: each ``h_i`` is layer i's output
    ``(B, T, D)``; ``final`` is ``h_L`` passed through the encoder LayerNorm for pre-LN models, else ``h_L``.
    """

    def __init__(self, cfg, prune_units: frozenset) -> None:
        super().__init__()
        embed_dim = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.dropout = cfg.dropout
        self.pos_conv = positional_conv(
            embed_dim, cfg.conv_pos, cfg.conv_pos_groups, cfg.conv_pos_batch_norm, cfg.conv_pos_depth
        )
        self.relative_attention_bias = None
        if cfg.relative_position_buckets > 0:
            self.relative_attention_bias = RelativePositionBias(
                cfg.relative_position_buckets, cfg.relative_position_heads, cfg.relative_position_max_distance
            )
        layers = []
        for i in range(cfg.encoder_layers):
            self_attn = None
            if cfg.use_attention[i]:
                gates = dict(head_gate="head" in prune_units, layer_gate="attlayer" in prune_units)
                sizes = (
                    embed_dim,
                    cfg.encoder_attention_heads[i],
                    cfg.attention_head_dim,
                    cfg.attention_dropout,
                )
                if self.relative_attention_bias is not None:
                    self_attn = PrunableWavLMSelfAttention(
                        *sizes, cfg.relative_position_heads, gated=cfg.gru_rel_pos, **gates
                    )
                else:
                    self_attn = PrunableSelfAttention(*sizes, **gates)
            ffn = None
            if cfg.use_ffn[i]:
                ffn = PrunableFeedForward(
                    embed_dim,
                    cfg.encoder_ffn_embed_dims[i],
                    cfg.activation_fn,
                    cfg.activation_dropout,
                    unit_gate="interm" in prune_units,
                    layer_gate="ffnlayer" in prune_units,
                )
            layers.append(PrunableEncoderLayer(self_attn, ffn, embed_dim, cfg.dropout, cfg.layer_norm_first))
        self.layers = nn.ModuleList(layers)
        self.layer_norm = LayerNorm(embed_dim)
        self.layerdrop = cfg.encoder_layerdrop

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        bias = None
        if self.relative_attention_bias is not None:
            bias = self.relative_attention_bias(x.size(1))  # (H_teacher, T, T), shared by every layer
        outputs = []
        bias_read = False
        for layer in self.layers:
            if not (self.training and self.layerdrop > 0 and torch.rand(()).item() < self.layerdrop):
                x = layer(x, padding_mask, bias)
                bias_read = bias_read or (layer.self_attn is not None and layer.self_attn.reads_input)
            outputs.append(x)  # a dropped layer passes its input on: the list keeps one entry per layer
        if bias is not None and not bias_read and outputs:
            # every attention skipped in this pass: the bias table stays in the graph for DDP
            x = outputs[-1] = x + touch(self.relative_attention_bias)
        final = self.layer_norm(x) if self.layer_norm_first else x
        return outputs, final
