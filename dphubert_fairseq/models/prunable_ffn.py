"""Position-wise feed-forward block with prunable intermediate units and an optional whole-layer gate."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils

from .hard_concrete import INIT_DROP_RATE, HardConcrete
from .inactive_units import touch
from .prunable_attention import linear


class PrunableFeedForward(nn.Module):
    """fc1 -> activation -> activation dropout -> [unit gate] -> fc2 -> [layer gate]. ``(B, T, D) -> (B, T, D)``.

    The unit gate scales fc2's columns rather than the ``(B, T, F)`` activations: the same product, computed on
    a ``(D, F)`` weight, with one activation-sized tensor less to keep for the backward pass.
    With 0 units the block outputs ``fc2.bias``. Units that are 0 in the forward pass's mask (inactive units,
    and in training those whose sample is 0) are left out when that pays (``HardConcrete.compute_index``):
    fc1's rows and fc2's columns are index-selected to the others; a closed layer gate skips the block (its
    output is a scalar 0).
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

    @property
    def skipped(self) -> bool:
        """The layer gate is closed (inactive, or 0 in this forward pass's mask): the block contributes
        nothing."""
        return self.layer_gate is not None and self.layer_gate.num_open == 0

    @property
    def reads_input(self) -> bool:
        """Whether the output depends on the input: some unit may be non-zero."""
        return not self.skipped and (self.unit_gate is None or self.unit_gate.num_open > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skipped:
            return touch(self)
        index = self.unit_gate.compute_index(x.device) if self.unit_gate is not None else None
        if index is None:
            h = self.activation_dropout(self.activation_fn(self.fc1(x)))
            weight = self.fc2.weight
            if self.unit_gate is not None:
                weight = weight * self.unit_gate().to(weight.dtype)
            out = F.linear(h, weight, self.fc2.bias)
        elif index.numel() == 0:
            out = self.fc2.bias.to(x.dtype).expand(*x.shape[:-1], -1) + touch(
                self.fc1, self.fc2, self.unit_gate
            )
        else:
            fc1_weight = self.fc1.weight.index_select(0, index)
            h = self.activation_dropout(self.activation_fn(F.linear(x, fc1_weight, self.fc1.bias[index])))
            gate = self.unit_gate()[index].to(self.fc2.weight.dtype)
            out = F.linear(h, self.fc2.weight.index_select(1, index) * gate, self.fc2.bias)
        if self.layer_gate is not None:
            out = out * self.layer_gate().to(out.dtype)
        return out
