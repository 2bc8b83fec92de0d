"""Layer-to-layer distillation loss and its projections (identity-initialised, or DistilHuBERT's heads)."""

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError


def parse_layer_groups(spec: str) -> List[List[int]]:
    """``"0;4,8,12"`` -> ``[[0], [4, 8, 12]]``: each group of layers shares one projection."""
    groups = []
    for part in str(spec).split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            groups.append([int(x) for x in part.split(",")])
        except ValueError:
            raise ConfigError(
                f"criterion.distill_layers: cannot read {spec!r}; expected e.g. '0;4,8,12'"
            ) from None
    if not groups:
        raise ConfigError(f"criterion.distill_layers: no layer in {spec!r}")
    layers = [layer for group in groups for layer in group]
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ConfigError(
            f"criterion.distill_layers: layer(s) {', '.join(map(str, repeated))} appear more than once in "
            f"{spec!r}; list each teacher layer once"
        )
    return groups


def identity_linear(dim: int) -> nn.Linear:
    proj = nn.Linear(dim, dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(dim))
        proj.bias.zero_()
    return proj


def layer_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: Optional[torch.Tensor],
    l1_weight: float,
    cos_weight: float,
    mse_weight: float,
) -> torch.Tensor:
    """``l1 * mean|S - T| + mse * mean (S - T)^2 - cos * mean cos(S, T)`` over valid frames, in float32.

    ``student``, ``teacher``: ``(B, T, D)``; ``valid``: ``(B, T)`` bool or None (all frames).
    """
    s, t = student.float(), teacher.float()
    if valid is not None:
        s, t = s[valid], t[valid]
    loss = s.new_zeros(())
    if l1_weight:
        loss = loss + l1_weight * F.l1_loss(s, t)
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(s, t)
    if cos_weight:
        loss = loss - cos_weight * F.cosine_similarity(s, t, dim=-1).mean()
    return loss


#: what a prediction head is (``criterion.prediction_head``): ``linear``, a linear layer started at the
#: identity; ``distilhubert``, DistilHuBERT's head (``distilhubert_head``)
PREDICTION_HEADS = ("linear", "distilhubert")


def distilhubert_head(dim: int) -> nn.Sequential:
    """DistilHuBERT's prediction head, ``(B, T, D) -> (B, T, D)``: linear, GELU, linear, at torch's default
    initialisation (DistilHuBERT computes its heads' first layers as one wide linear layer split per head, and
    its second layers with uniform(+-1/sqrt(D)) weights and biases: the same functions, the same
    initial distributions). Its inner width is the student's."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class DistillationProjections(nn.Module):
    """Maps student hidden states onto the teacher's.

    Layer-to-layer (default): target layer ``i`` is predicted from the student's layer ``i`` through a linear
    layer started at the identity; the layers of a group share one. Prediction-head mode (DistilHuBERT): every
    target layer has its own head, all reading the student's last layer; ``head`` says what a head is:
    ``linear`` (a linear layer started at the identity) or ``distilhubert`` (DistilHuBERT's own,
    ``distilhubert_head``). The reference implementation's prediction-head mode is a third kind (linear, then
    GELU), which neither reproduces (docs/method.md).
    """

    def __init__(
        self, groups: Sequence[Sequence[int]], dim: int, prediction_heads: bool, head: str = "linear"
    ) -> None:
        super().__init__()
        if head not in PREDICTION_HEADS:
            raise ConfigError(
                f"criterion.prediction_head: {head!r}; choose from {', '.join(PREDICTION_HEADS)}"
            )
        if head != "linear" and not prediction_heads:
            raise ConfigError(
                f"criterion.prediction_head={head} is a kind of prediction head; set criterion.prediction_heads=true "
                "or leave it at linear"
            )
        self.prediction_heads = prediction_heads
        self.head = head
        if prediction_heads:
            self.targets = [layer for group in groups for layer in group]
            make = distilhubert_head if head == "distilhubert" else identity_linear
            self.proj = nn.ModuleList(make(dim) for _ in self.targets)
            self.proj_index = list(range(len(self.targets)))
        else:
            self.targets = [layer for group in groups for layer in group]
            self.proj = nn.ModuleList(identity_linear(dim) for _ in groups)
            self.proj_index = [g for g, group in enumerate(groups) for _ in group]

    def forward(self, student_states: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """One prediction ``(B, T, D)`` per target layer, in ``self.targets`` order."""
        out = []
        for layer, index in zip(self.targets, self.proj_index):
            source = student_states[-1] if self.prediction_heads else student_states[layer]
            out.append(self.proj[index](source))
        return out
