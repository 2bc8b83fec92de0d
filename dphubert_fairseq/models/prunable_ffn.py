"""Position-wise feed-forward block with prunable intermediate units and an optional whole-layer gate."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils

from .hard_concrete import INIT_DROP_RATE, HardConcrete
from .prunable_attention import linear


class PrunableFeedForward(nn.Module):
    """fc1 -> activation -> activation dropout -> [unit gate] -> fc2 -> [layer gate]. ``(B, T, D) -> (B, T, D)``.

    The unit gate scales fc2's columns rather than the ``(B, T, F)`` activations: the same product, computed on
    a ``(D, F)`` weight, with one activation-sized tensor less to keep for the backward pass.
    With 0 units the block outputs ``fc2.bias``.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        activation_fn: str,
        activation_dropout: float,
        unit_gate: bool = False,
        layer_gate: bool = False,
    ) -> None:
        super().__init__()
        self.ffn_dim = ffn_dim
        self.fc1 = linear(embed_dim, ffn_dim)
        self.fc2 = linear(ffn_dim, embed_dim)
        self.activation_fn = utils.get_activation_fn(activation_fn)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.unit_gate = (
            HardConcrete(ffn_dim, INIT_DROP_RATE["interm"]) if unit_gate and ffn_dim > 0 else None
        )
        self.layer_gate = HardConcrete(1, INIT_DROP_RATE["ffnlayer"]) if layer_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation_dropout(self.activation_fn(self.fc1(x)))
        weight = self.fc2.weight
        if self.unit_gate is not None:
            weight = weight * self.unit_gate().to(weight.dtype)
        out = F.linear(h, weight, self.fc2.bias)
        if self.layer_gate is not None:
            out = out * self.layer_gate().to(out.dtype)
        return out
