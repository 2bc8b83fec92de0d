"""Multi-head self-attention with prunable heads and an optional whole-layer gate."""

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hard_concrete import INIT_DROP_RATE, HardConcrete


def linear(in_features: int, out_features: int) -> nn.Linear:
    """``nn.Linear`` that may have a zero size (a block whose units were all pruned keeps its output bias)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features)


class PrunableSelfAttention(nn.Module):
    """Self-attention with ``num_heads`` heads of ``head_dim``, run by ``scaled_dot_product_attention``.

    ``(B, T, D)`` and key padding mask ``(B, T)`` (True = padding) ``-> (B, T, D)``. The head gate multiplies
    each head's context before ``out_proj``, computed as a scale of out_proj's columns (no extra pass over, or
    saved copy of, the context); the layer gate multiplies the block's output. With 0 heads the
    block outputs ``out_proj.bias`` (what the removed heads left behind).
    State-dict names follow fairseq's ``MultiheadAttention`` (q_proj, k_proj, v_proj, out_proj).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float,
        head_gate: bool = False,
        layer_gate: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.q_proj = linear(embed_dim, inner)
        self.k_proj = linear(embed_dim, inner)
        self.v_proj = linear(embed_dim, inner)
        self.out_proj = linear(inner, embed_dim)
        self.head_gate = (
            HardConcrete(num_heads, INIT_DROP_RATE["head"]) if head_gate and num_heads > 0 else None
        )
        self.layer_gate = HardConcrete(1, INIT_DROP_RATE["attlayer"]) if layer_gate else None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    def attention_mask(
        self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """The mask ``scaled_dot_product_attention`` gets: ``(B, 1, 1, T)`` bool, True = may attend, or None.
        ``position_bias`` is for attentions that use one (``PrunableWavLMSelfAttention``); this one has none."""
        if position_bias is not None:
            raise ValueError("this attention has no relative position bias; got one")
        if key_padding_mask is None:
            return None
        return ~key_padding_mask[:, None, None, :]

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        position_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``position_bias``: the encoder's relative position bias ``(H_teacher, T, T)``, for attentions that
        use one."""
        batch, time, _ = x.shape
        if self.num_heads == 0:
            # a copy, not a view of the parameter (torch's module tracker refuses those under no_grad)
            out = self.out_proj.bias.to(x.dtype).expand(batch, time, self.embed_dim).clone()
        else:
            shape = (batch, time, self.num_heads, self.head_dim)
            q = self.q_proj(x).view(shape).transpose(1, 2)
            k = self.k_proj(x).view(shape).transpose(1, 2)
            v = self.v_proj(x).view(shape).transpose(1, 2)
            attn_mask = self.attention_mask(x, key_padding_mask, position_bias)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(q.dtype)  # an additive bias must match the query's (autocast) dtype
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H, T, head_dim)
            weight = self.out_proj.weight
            if self.head_gate is not None:
                weight = weight * self.head_gate().to(weight.dtype).repeat_interleave(self.head_dim)
            out = F.linear(ctx.transpose(1, 2).reshape(batch, time, -1), weight, self.out_proj.bias)
        if self.layer_gate is not None:
            out = out * self.layer_gate().to(out.dtype)
        return out
