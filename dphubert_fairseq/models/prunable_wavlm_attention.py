"""WavLM's self-attention: prunable heads plus the gated relative position bias."""

from typing import Optional

import torch
import torch.nn as nn

from .prunable_attention import PrunableSelfAttention


class PrunableWavLMSelfAttention(PrunableSelfAttention):
    """``PrunableSelfAttention`` whose scores get WavLM's gated relative position bias.

    The encoder computes the bias of the teacher's ``teacher_heads`` heads once, ``(H_teacher, T, T)``; this
    layer reads the columns of the heads it kept (``head_index``, their indices in the teacher, a buffer that
    export narrows). With ``gated`` (WavLM's ``gru_rel_pos``), head ``h`` scales its bias for query frame ``t``
    by ``a * (b * grep_a[h] - 1) + 2``, where ``a, b`` are sigmoids of sums of ``grep_linear``'s outputs on
    the slice of the attention's *input* that belonged to head ``head_index[h]`` in the teacher: the gate reads
    the input, not the projections, so pruning other heads leaves it unchanged.
    State-dict names follow WavLM's (``grep_linear``, ``grep_a`` of shape ``(1, H, 1, 1)``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float,
        teacher_heads: int,
        gated: bool = True,
        head_gate: bool = False,
        layer_gate: bool = False,
    ) -> None:
        super().__init__(embed_dim, num_heads, head_dim, dropout, head_gate, layer_gate)
        self.teacher_heads = teacher_heads
        self.register_buffer("head_index", torch.arange(num_heads))
        self.grep_linear = nn.Linear(embed_dim // teacher_heads, 8) if gated else None
        self.grep_a = nn.Parameter(torch.ones(1, num_heads, 1, 1)) if gated else None

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", teacher_heads={self.teacher_heads}, gated={self.grep_linear is not None}"
        )

    def attention_mask(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        position_bias: Optional[torch.Tensor],
        heads: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(B, H, T, T)`` additive mask: the kept heads' (gated) bias, ``-inf`` at padded keys. ``heads``: the
        heads computed (``active_heads``, ``H`` of them), None for all."""
        if position_bias is None:
            raise ValueError("a WavLM attention needs the encoder's relative position bias")
        batch, time, _ = x.shape
        head_index = self.head_index if heads is None else self.head_index[heads]
        bias = position_bias[head_index]  # (H, T, T)
        if self.grep_linear is not None:
            grep_a = self.grep_a if heads is None else self.grep_a[:, heads]
            slices = x.view(batch, time, self.teacher_heads, -1)[:, :, head_index].transpose(1, 2)
            gates = self.grep_linear(slices).view(batch, head_index.numel(), time, 2, 4).sum(-1)
            gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)  # (B, H, T, 1) each
            bias = (gate_a * (gate_b * grep_a - 1.0) + 2.0) * bias
        else:
            bias = bias.unsqueeze(0).expand(batch, -1, -1, -1)
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return bias
