"""Hard-concrete gates (Louizos et al., 2018), with the constants of CoFi / FLOP and the DPHuBERT paper."""

import math

import torch
import torch.nn as nn

from .float32_module import Float32Module

#: Temperature, stretch interval and clamping of the uniform noise (METHOD.md).
BETA = 2.0 / 3.0
LEFT = -0.1
RIGHT = 1.1
EPS = 1e-6
#: Soft value kept by an open gate in the deterministic (eval) mask: ``sigmoid(log_alpha / BETA * 0.8)``.
EVAL_SHARPNESS = 0.8

#: Initial drop rate per kind of unit: ``log_alpha ~ N(log(1 - m) - log(m), 0.01)``.
INIT_DROP_RATE = {"conv": 0.01, "head": 0.01, "interm": 0.5, "attlayer": 0.01, "ffnlayer": 0.01}
INIT_STD = 0.01


class HardConcrete(Float32Module):
    """``n`` stochastic gates with a differentiable expected L0 norm.

    ``forward()`` returns a float32 mask of shape ``(n,)``: one sample shared by the whole batch in training
    mode, the deterministic mask in eval mode. All arithmetic is done in float32, whatever the dtype the module
    was cast to, because in fp16 the uniform noise rounds to 0 or 1.
    """

    def __init__(self, n: int, init_drop_rate: float, init_std: float = INIT_STD) -> None:
        super().__init__()
        if n <= 0:
            raise ValueError(f"a gate vector needs at least one unit, got n={n}")
        self.n = n
        self.init_drop_rate = init_drop_rate
        self.init_std = init_std
        self.log_alpha = nn.Parameter(torch.empty(n))
        self.log_alpha.param_group = "gates"  # its own learning rate (fairseq's composite optimizer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mean = math.log(1.0 - self.init_drop_rate) - math.log(self.init_drop_rate)
        nn.init.normal_(self.log_alpha, mean, self.init_std)

    def extra_repr(self) -> str:
        return f"n={self.n}, init_drop_rate={self.init_drop_rate}"

    def prob_open(self) -> torch.Tensor:
        """Probability that each gate is non-zero, ``(n,)`` float32, differentiable."""
        return torch.sigmoid(self.log_alpha.float() - BETA * math.log(-LEFT / RIGHT))

    def l0_norm(self) -> torch.Tensor:
        """Expected number of open gates, a float32 scalar, differentiable."""
        return self.prob_open().sum()

    def sample(self) -> torch.Tensor:
        log_alpha = self.log_alpha.float()
        u = torch.empty_like(log_alpha).uniform_(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        return torch.clamp(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)

    @torch.no_grad()
    def deterministic_mask(self) -> torch.Tensor:
        """Eval mask: the ``round(n - L0)`` gates with the smallest log_alpha are 0, the rest soft values."""
        log_alpha = self.log_alpha.float()
        num_zeros = round(self.n - self.l0_norm().item())
        mask = torch.sigmoid(log_alpha / BETA * EVAL_SHARPNESS)
        if num_zeros > 0:
            mask[torch.topk(log_alpha, k=num_zeros, largest=False).indices] = 0.0
        return mask

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic_mask()
