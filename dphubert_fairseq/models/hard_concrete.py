"""Hard-concrete gates (Louizos et al., 2018), with the constants of CoFi / FLOP and the DPHuBERT paper."""

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .float32_module import Float32Module

#: Temperature, stretch interval and clamping of the uniform noise (docs/method.md, "Gates: constants and their sources").
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

    A unit that is 0 in the mask of a forward pass contributes nothing to its output and gets zero gradient,
    its logit included (the sample is clamped there). Within a model's forward pass (``GateSet.drawn``) the
    modules that read this gate leave such units out of their computation (``compute_index``) when that pays,
    or compute every unit with those masked (``gather_policy``): the same result and gradients either way. In
    training most closed gates sample exactly 0 at most updates, so stage 1 gets cheaper as the expected size
    falls, with no approximation.

    Units can also be made inactive for good (``inactive_units.update_active_sets``, during stage 1): an
    inactive unit is closed in every sample, in the expected and the eval counts and in the eval mask. The
    ``active`` set and the ``below_threshold_checks`` streaks are buffers: saved in checkpoints and restored
    on resume.
    """

    def __init__(
        self, n: int, init_drop_rate: float, init_std: float = INIT_STD, min_active: int = 0
    ) -> None:
        """``min_active``: units that stay active whatever their gates (``inactive_units``), the ones with the
        largest logits: a conv layer needs one channel to be computed at all."""
        super().__init__()
        if n <= 0:
            raise ValueError(f"a gate vector needs at least one unit, got n={n}")
        if not 0 <= min_active <= n:
            raise ValueError(f"min_active must be in [0, n={n}], got {min_active}")
        self.n = n
        self.min_active = min_active
        self.init_drop_rate = init_drop_rate
        self.init_std = init_std
        self.log_alpha = nn.Parameter(torch.empty(n))
        self.log_alpha.param_group = "gates"  # its own learning rate (fairseq's composite optimizer)
        self.drawn: Optional[torch.Tensor] = None  # set by GateSet.drawn() for one forward pass
        #: (indices of the non-zero units of ``drawn``, their number), when the forward pass may leave out the rest
        self.drawn_open: Optional[Tuple[torch.Tensor, int]] = None
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        self.register_buffer("below_threshold_checks", torch.zeros(n, dtype=torch.long))
        #: host copy of the active units' indices, None while every unit is active; ``version`` counts changes
        self._active_list: Optional[List[int]] = None
        self._active_index: Dict[torch.device, torch.Tensor] = {}
        self.version = 0
        #: the fraction of units computed below which the modules leave the others out (``compute_index``):
        #: 1.0 always, 0.0 never; set per run from a measured break-even (``gather_policy``), not saved
        self.gather_below = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mean = math.log(1.0 - self.init_drop_rate) - math.log(self.init_drop_rate)
        nn.init.normal_(self.log_alpha, mean, self.init_std)

    def extra_repr(self) -> str:
        return f"n={self.n}, init_drop_rate={self.init_drop_rate}"

    # ----- the active set -----

    @property
    def num_active(self) -> int:
        """Units still active (known on the host: no device sync)."""
        return self.n if self._active_list is None else len(self._active_list)

    @property
    def all_active(self) -> bool:
        return self._active_list is None

    def active_index(self, device: torch.device) -> Optional[torch.Tensor]:
        """Indices of the active units, ``(num_active,)`` long on ``device``; None while every unit is active."""
        if self._active_list is None:
            return None
        if device not in self._active_index:
            self._active_index[device] = torch.tensor(self._active_list, dtype=torch.long, device=device)
        return self._active_index[device]

    @property
    def num_open(self) -> int:
        """Units that may be non-zero: within a forward pass that leaves units out (``GateSet.drawn``), the
        non-zero units of its mask; else the active ones. Known on the host."""
        return self.drawn_open[1] if self.drawn_open is not None else self.num_active

    def compute_index(self, device: torch.device) -> Optional[torch.Tensor]:
        """The units the modules compute, ``(k,)`` long, or None for all of them: within a forward pass that
        leaves units out (``GateSet.drawn``) the non-zero units of its mask, else the active units, when
        leaving the others out pays (they are fewer than ``gather_below`` of the units, or none). Otherwise
        every unit is computed and the others, 0 in the mask, are masked by the gate: the same result and
        gradients, without gathering rows and columns. A gate with ``min_active`` never gets an empty index (a
        conv layer without channels cannot be computed): a mask that is 0 everywhere is applied instead."""
        if self.drawn_open is not None:
            index, count = self.drawn_open
            if count == self.n or (count == 0 and self.min_active):
                return None
            return index.to(device) if count == 0 or count < self.gather_below * self.n else None
        if self._active_list is None:
            return None
        if self._active_list and len(self._active_list) >= self.gather_below * self.n:
            return None
        return self.active_index(device)

    def active_mask(self) -> torch.Tensor:
        """``active`` as a float32 ``(n,)`` multiplier: 1 for active units, 0 for inactive ones."""
        return self.active.float()

    @torch.no_grad()
    def set_active(self, active: torch.Tensor) -> None:
        """Replace the active set (``(n,)`` bool) and refresh the host copy (one device sync)."""
        self.active.copy_(active)
        self.refresh_active()

    def refresh_active(self) -> None:
        """Re-read the ``active`` buffer into the host copy the forward pass slices with."""
        active = self.active.tolist()
        self._active_list = None if all(active) else [i for i, a in enumerate(active) if a]
        self._active_index = {}
        self.version += 1

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # checkpoints written before active sets existed have every unit active
        for name, default in (("active", True), ("below_threshold_checks", 0)):
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), default))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self.refresh_active()

    # ----- probabilities, samples and masks -----

    def prob_open(self) -> torch.Tensor:
        """Probability that each gate is non-zero (0 for inactive units), ``(n,)`` float32, differentiable."""
        return prob_open(self.log_alpha.float()) * self.active_mask()

    def l0_norm(self) -> torch.Tensor:
        """Expected number of open gates, a float32 scalar, differentiable."""
        return self.prob_open().sum()

    def sample(self) -> torch.Tensor:
        return sample(self.log_alpha.float()) * self.active_mask()

    @torch.no_grad()
    def deterministic_mask(self) -> torch.Tensor:
        """Eval mask: the ``round(n - L0)`` gates with the smallest log_alpha are 0 (at most ``n - min_active``:
        a conv layer keeps a channel, as its active set does), the rest soft values. Inactive units count as
        the smallest (``L0`` leaves them out, so they are among the zeros)."""
        log_alpha = self.log_alpha.float()
        num_zeros = min(round(self.n - self.l0_norm().item()), self.n - self.min_active)
        mask = torch.sigmoid(log_alpha / BETA * EVAL_SHARPNESS)
        if num_zeros > 0:
            ranked = log_alpha.masked_fill(~self.active, float("-inf"))
            mask[torch.topk(ranked, k=num_zeros, largest=False).indices] = 0.0
        return mask

    def forward(self) -> torch.Tensor:
        if self.drawn is not None:
            return self.drawn
        return self.sample() if self.training else self.deterministic_mask()


def prob_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate > 0)`` for each logit, same shape, differentiable."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """One stretched, clamped hard-concrete sample per logit, same shape, differentiable."""
    u = torch.empty_like(log_alpha).uniform_(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return torch.clamp(s * (RIGHT - LEFT) + LEFT, 0.0, 1.0)


class GateSet:
    """The gates of one model, sampled and counted in one vectorised pass each instead of one per gate.

    A training step of HuBERT Base has 31 gates; drawing them one by one costs about 17 small kernels each
    (forward and backward), which on a GPU is launch overhead of the same order as the expected-count
    arithmetic. Here the logits are concatenated once, sampled once, and summed per gate with one
    ``index_add``.
    """

    def __init__(self, gates: Sequence[HardConcrete]) -> None:
        self.gates = tuple(gates)
        self._segments: Dict[torch.device, torch.Tensor] = {}
        self._sizes: Dict[torch.device, torch.Tensor] = {}
        self._active_key: Optional[tuple] = None
        self._active: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.gates)

    def _log_alpha(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        log_alpha = torch.cat([g.log_alpha.float() for g in self.gates])
        return log_alpha if shift is None else log_alpha + shift

    def _active_mask(self, device: torch.device) -> torch.Tensor:
        """The gates' ``active_mask`` concatenated, rebuilt only when an active set changed."""
        key = (device, tuple(g.version for g in self.gates))
        if self._active_key != key:
            self._active = torch.cat([g.active_mask() for g in self.gates]).to(device)
            self._active_key = key
        return self._active

    def _segment_ids(self, device: torch.device) -> torch.Tensor:
        if device not in self._segments:
            sizes = torch.tensor([g.n for g in self.gates])
            self._segments[device] = torch.repeat_interleave(torch.arange(len(self.gates)), sizes).to(device)
        return self._segments[device]

    def expected_open(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Expected number of open gates of each gate vector, ``(len(self),)`` float32, differentiable.
        ``shift``: a scalar added to every logit first (what-if counts for ``target_projection``)."""
        log_alpha = self._log_alpha(shift)
        probs = prob_open(log_alpha) * self._active_mask(log_alpha.device)
        ids = self._segment_ids(probs.device)
        return torch.zeros(len(self.gates), device=probs.device).index_add(0, ids, probs)

    def eval_open(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Number of gates open in each gate vector's deterministic (eval) mask, ``(len(self),)`` float32:
        ``n - round(n - L0)``, at least ``min_active``: the count ``HardConcrete.deterministic_mask`` keeps,
        computed without reading any value back to the host. ``shift`` as in ``expected_open``."""
        with torch.no_grad():
            expected = self.expected_open(shift)
            if expected.device not in self._sizes:
                self._sizes[expected.device] = torch.tensor(
                    [[float(g.n) for g in self.gates], [float(g.min_active) for g in self.gates]]
                ).to(expected.device)
            n, least = self._sizes[expected.device]
            return torch.maximum(n - torch.round(n - expected), least)

    @contextmanager
    def drawn(self) -> Iterator[None]:
        """Within the block every gate returns its part of one mask: in training mode one shared sample, in
        eval mode the deterministic masks. When some gate may leave units out (``gather_below`` above 0), each
        also gets the indices of its non-zero units (``HardConcrete.drawn_open``; one host sync)."""
        if not self.gates:
            yield
            return
        if self.gates[0].training:
            log_alpha = self._log_alpha()
            flat = sample(log_alpha) * self._active_mask(log_alpha.device)
        else:
            flat = torch.cat([g.deterministic_mask() for g in self.gates])
        sizes = [g.n for g in self.gates]
        for gate, mask in zip(self.gates, flat.split(sizes)):
            gate.drawn = mask
        if any(g.gather_below > 0 for g in self.gates):
            self._set_open(flat.detach(), sizes)
        try:
            yield
        finally:
            for gate in self.gates:
                gate.drawn = None
                gate.drawn_open = None

    def _set_open(self, flat: torch.Tensor, sizes: List[int]) -> None:
        """Give each gate the indices of its units that are non-zero in ``flat`` (all gates' masks, in
        order) and their number."""
        ids = self._segment_ids(flat.device)
        is_open = flat > 0
        counts = torch.zeros(len(self.gates), dtype=torch.long, device=flat.device)
        counts = counts.index_add(0, ids, is_open.long()).tolist()
        index = is_open.nonzero().squeeze(1)
        starts = torch.tensor([0] + sizes[:-1], device=flat.device).cumsum(0)
        local = index - starts[ids[index]]
        for gate, part, count in zip(self.gates, local.split(counts), counts):
            gate.drawn_open = (part, count)
