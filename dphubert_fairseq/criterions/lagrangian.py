"""The L0 Lagrangian that drives the expected sparsity to its target (CoFi / DPHuBERT)."""

import torch
import torch.nn as nn
from fairseq.modules import GradMultiply

from ..models.float32_module import Float32Module


class SparsityLagrangian(Float32Module):
    """``lambda1 * (s - t) + lambda2 * (s - t)^2``, minimised by the model and *maximised* over the multipliers.

    The multipliers start at 0 and stay float32; their gradient is negated on the way back (gradient ascent
    with an ordinary optimizer and a positive learning rate). Their parameter group is 'lagrangian'.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        for p in (self.lambda1, self.lambda2):
            p.param_group = "lagrangian"

    def forward(self, expected_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        """A float32 scalar from the expected sparsity (float32 scalar, differentiable) and the target."""
        gap = expected_sparsity.float() - target
        lambda1 = GradMultiply.apply(self.lambda1, -1.0)
        lambda2 = GradMultiply.apply(self.lambda2, -1.0)
        return lambda1 * gap + lambda2 * gap * gap


def target_sparsity(final: float, warmup_updates: int, num_updates: int) -> float:
    """The target ramps linearly from 0 to ``final`` over ``warmup_updates``, then stays."""
    if warmup_updates <= 0:
        return final
    return final * min(1.0, num_updates / warmup_updates)
