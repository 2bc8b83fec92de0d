"""One transformer layer whose attention and FFN blocks can be pruned or removed."""

from typing import Optional

import torch
import torch.nn as nn
from fairseq.modules import LayerNorm

from .inactive_units import touch
from .prunable_attention import PrunableSelfAttention
from .prunable_ffn import PrunableFeedForward


class PrunableEncoderLayer(nn.Module):
    """fairseq's ``TransformerSentenceEncoderLayer`` (post- or pre-LayerNorm) with prunable blocks.

    ``(B, T, D)`` and key padding mask ``(B, T)`` ``-> (B, T, D)``. A removed block (``None``) contributes
    nothing. Post-LN layers keep both LayerNorms whatever is removed, since they sit on the residual stream;
    a pre-LN layer's LayerNorm belongs to its block and goes with it, and is skipped with it when the block's
    layer gate is closed (inactive, or 0 in the forward pass's mask).
    """

    def __init__(
        self,
        self_attn: Optional[PrunableSelfAttention],
        ffn: Optional[PrunableFeedForward],
        embed_dim: int,
        dropout: float,
        layer_norm_first: bool,
    ) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.self_attn = self_attn
        self.ffn = ffn
        keep_attn_norm = self_attn is not None or not layer_norm_first
        keep_ffn_norm = ffn is not None or not layer_norm_first
        self.self_attn_layer_norm = LayerNorm(embed_dim) if keep_attn_norm else None
        self.final_layer_norm = LayerNorm(embed_dim) if keep_ffn_norm else None
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        position_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``position_bias``: the encoder's relative position bias (WavLM), passed to the attention."""
        if self.layer_norm_first:
            if self.self_attn is not None:
                x = self._pre_norm_block(
                    x,
                    self.self_attn,
                    self.self_attn_layer_norm,
                    self.dropout1,
                    key_padding_mask,
                    position_bias,
                )
            if self.ffn is not None:
                x = self._pre_norm_block(x, self.ffn, self.final_layer_norm, self.dropout3)
            return x
        if self.self_attn is not None:
            x = x + self.dropout1(self.self_attn(x, key_padding_mask, position_bias))
        x = self.self_attn_layer_norm(x)
        if self.ffn is not None:
            x = x + self.dropout3(self.ffn(x))
        return self.final_layer_norm(x)

    @staticmethod
    def _pre_norm_block(
        x: torch.Tensor, block: nn.Module, norm: nn.Module, dropout: nn.Module, *args
    ) -> torch.Tensor:
        """``x + dropout(block(norm(x)))``; when the block does not read its input (no unit non-zero, or
        none left), the LayerNorm is not computed and only kept in the graph (``touch``)."""
        if not block.reads_input:
            return x + dropout(block(x, *args)) + touch(norm)
        return x + dropout(block(norm(x), *args))
