"""Units whose gates can no longer open: found during stage 1 and left out of the computation.

A unit is *inactive* once its probability of being non-zero, ``p = P(z > 0)`` (``hard_concrete.prob_open``),
has been below ``threshold`` at ``checks`` consecutive checks. From then on it is closed for good: its gate
samples 0, the expected and eval counts (so the Lagrangian and the landing) leave it out, and the prunable
modules compute without it (``active_index``): attention with the active heads only, the FFN with the active
units only, a conv layer with its active output channels and the previous layer's active input channels. Its
parameters keep their shapes and get exactly zero gradient (except in a CNN whose LayerNorm normalises over the
channels, the Large models' ``layer_norm`` mode: there an inactive channel is still computed for its layer's
statistics, and its conv weights get gradient through them; an export removes them all the same).

What this changes: a skipped unit would have been non-zero in a training sample with probability below
``threshold`` per update; skipping it sets that sample to 0. The logits of inactive units get no gradient (they
drift only as far as the optimizer's momentum still carries them), and the eval mask and the landing cannot
reopen them.

A gate may keep some units active whatever their logits (``HardConcrete.min_active``: a conv layer keeps one
channel, or it could not be computed).

Every worker takes the same decision: the per-unit "below threshold" flags are combined with a MIN all-reduce
before they count, so a unit is deactivated only where every worker saw it below (they all hold the same
logits under DDP, so this only guards against arithmetic differences).
"""

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .hard_concrete import HardConcrete, prob_open

#: Default threshold on ``p`` below which a unit counts as closed at a check: above where the gates the eval
#: mask closes float after the target ramp (``P`` about 0.01, for as long as a run goes on; benchmarks/README.md,
#: ``gate_decay.py``), so that a run of any length leaves them out; at 1e-4 none ever was
THRESHOLD = 0.02
#: Default number of consecutive checks below the threshold after which a unit is inactive.
CHECKS = 3
#: Default number of updates between checks.
INTERVAL = 100


@torch.no_grad()
def update_active_sets(
    gates: Sequence[HardConcrete], threshold: float = THRESHOLD, checks: int = CHECKS
) -> int:
    """One check: count a check below ``threshold`` for each unit (or reset its streak), and make the units
    whose streak reached ``checks`` inactive. Returns how many units became inactive (a host sync)."""
    if not gates:
        return 0
    below = torch.cat([prob_open(g.log_alpha.float()) < threshold for g in gates]).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(below, op=dist.ReduceOp.MIN)
    newly = 0
    for gate, flags in zip(gates, below.split([g.n for g in gates])):
        streak = torch.where(
            flags.bool(), gate.below_threshold_checks + 1, torch.zeros_like(flags, dtype=torch.long)
        )
        gate.below_threshold_checks.copy_(streak)
        closing = gate.active & (streak >= checks)
        if gate.min_active:
            closing = _keep_min_active(gate, closing)
        count = int(closing.sum())
        if count:
            gate.set_active(gate.active & ~closing)
            newly += count
    return newly


def _keep_min_active(gate: HardConcrete, closing: torch.Tensor) -> torch.Tensor:
    """``closing`` less the units that keep ``gate.min_active`` active: the active ones with the largest logits
    (the same on every worker, whose logits DDP keeps equal)."""
    remaining = gate.active & ~closing
    short = gate.min_active - int(remaining.sum())
    if short <= 0:
        return closing
    candidates = gate.log_alpha.detach().float().masked_fill(~closing, float("-inf"))
    spared = candidates.topk(short).indices
    return closing.index_fill(0, spared, False)


def touch(*modules: nn.Module) -> torch.Tensor:
    """A float32 scalar 0 that depends on every parameter of ``modules``: added to the output of a block that
    is skipped, it keeps the block's parameters in the autograd graph (with zero gradient), which DDP without
    ``find_unused_parameters`` requires of every parameter at every update. Costs no pass over the weights
    (an empty slice of each is summed)."""
    zero = None
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            part = p.view(-1)[:0].sum()
            zero = part if zero is None else zero + part
    return zero if zero is not None else torch.zeros(())
