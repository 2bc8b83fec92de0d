"""Multi-head self-attention with prunable heads and an optional whole-layer gate."""

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hard_concrete import INIT_DROP_RATE, HardConcrete
from .inactive_units import touch


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
    block outputs ``out_proj.bias`` (what the removed heads left behind). Heads that are 0 in the forward
    pass's mask (inactive heads, and in training those whose sample is 0) are left out when that pays
    (``HardConcrete.compute_index``): q, k, v's rows and out_proj's columns are index-selected to the others,
    and the attention runs with those only; a closed layer gate skips the block (its output is a scalar 0).
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

    @property
    def skipped(self) -> bool:
        """The layer gate is closed (inactive, or 0 in this forward pass's mask): the block contributes
        nothing."""
        return self.layer_gate is not None and self.layer_gate.num_open == 0

    @property
    def reads_input(self) -> bool:
        """Whether the output depends on the input: some head may be non-zero."""
        if self.skipped:
            return False
        return (self.head_gate.num_open if self.head_gate is not None else self.num_heads) > 0

    def active_heads(self, device: torch.device) -> Optional[torch.Tensor]:
        """Indices of the heads computed, ``(H_active,)`` long, or None to compute every head (each may be
        non-zero, or masking the others is cheaper: ``HardConcrete.compute_index``)."""
        return self.head_gate.compute_index(device) if self.head_gate is not None else None

    def attention_mask(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        position_bias: Optional[torch.Tensor],
        heads: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """The mask ``scaled_dot_product_attention`` gets: ``(B, 1, 1, T)`` bool, True = may attend, or None.
        ``position_bias`` is for attentions that use one (``PrunableWavLMSelfAttention``); this one has none.
        ``heads``: the heads computed (``active_heads``), None for all."""
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
        if self.skipped:
            return touch(self)
        batch, time, _ = x.shape
        heads = self.active_heads(x.device)
        num_heads = self.num_heads if heads is None else heads.numel()
        if num_heads == 0:
            # a copy, not a view of the parameter (torch's module tracker refuses those under no_grad),
            # plus the unused projections, kept in the graph for DDP)
            out = self.out_proj.bias.to(x.dtype).expand(batch, time, self.embed_dim) + touch(self)
        else:
            q_weight, q_bias = self.q_proj.weight, self.q_proj.bias
            k_weight, k_bias = self.k_proj.weight, self.k_proj.bias
            v_weight, v_bias = self.v_proj.weight, self.v_proj.bias
            out_weight = self.out_proj.weight
            gate = self.head_gate() if self.head_gate is not None else None
            if heads is not None:
                rows = self._head_rows(heads)
                q_weight, q_bias = q_weight.index_select(0, rows), q_bias[rows]
                k_weight, k_bias = k_weight.index_select(0, rows), k_bias[rows]
                v_weight, v_bias = v_weight.index_select(0, rows), v_bias[rows]
                out_weight = out_weight.index_select(1, rows)
                gate = gate[heads]
            shape = (batch, time, num_heads, self.head_dim)
            q = F.linear(x, q_weight, q_bias).view(shape).transpose(1, 2)
            k = F.linear(x, k_weight, k_bias).view(shape).transpose(1, 2)
            v = F.linear(x, v_weight, v_bias).view(shape).transpose(1, 2)
            attn_mask = self.attention_mask(x, key_padding_mask, position_bias, heads)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(q.dtype)  # an additive bias must match the query's (autocast) dtype
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )  # (B, H_active, T, head_dim)
            if gate is not None:
                out_weight = out_weight * gate.to(out_weight.dtype).repeat_interleave(self.head_dim)
            out = F.linear(ctx.transpose(1, 2).reshape(batch, time, -1), out_weight, self.out_proj.bias)
        if self.layer_gate is not None:
            out = out * self.layer_gate().to(out.dtype)
        return out

    def _head_rows(self, heads: torch.Tensor) -> torch.Tensor:
        """The rows of q, k, v (and columns of out_proj) of ``heads``, ``(H_active * head_dim,)`` long."""
        offsets = torch.arange(self.head_dim, device=heads.device)
        return (heads.unsqueeze(1) * self.head_dim + offsets).flatten()
