"""Leave zero units out, or compute them masked: per block, whichever the running device does faster.

A block whose gate is 0 for some units in a forward pass (inactive units, ``inactive_units``, and in training
every unit whose hard-concrete sample is 0 at that update) can compute two ways with the same result and
gradients: *gather* the other units' rows and columns of its weights (``index_select``; its backward scatters
into full-size zero gradients) and compute with those only, or compute every unit at full width with the
zero ones masked by the gate (*mask*). Gathering saves the zero units' compute and pays for the copies and
the scatter; which wins depends on the fraction computed and on the device (on a CPU whose matrix products
are fast, AVX512 / AMX, the copies can cost more than a few zero units save).

``choose`` sets each gate's ``HardConcrete.gather_below``: the fraction of units computed below which its
block gathers. ``measure`` times, once per kind of block and run (all FFN blocks of one shape share a
measurement, each conv layer has its own), the forward and backward of the block at full width with some units masked, and gathered at a
few active fractions (``FRACTIONS``), fits the gathered time as a line in the fraction, and takes where the
line is ``GATHER_MARGIN`` below the masked time as the break-even: near where the two meet, gathering saves
less than the timings' noise, and a choice made on noise could make the update slower than computing every
unit masked, which costs what the all-active update does. Each probe runs on the shape of the batch last seen in training
(``Probe``), under the autocast that batch ran under, on a copy of the random state (the run's random
stream is unchanged) and without touching any ``.grad``. Under DDP the times are summed over the workers
before the fit, so every worker takes the same decision.

On a GPU ``measure`` computes every block masked, without timing: there a block timed alone does not predict
what gathering costs inside an update. On an H200 (Base shape, AMP, 16 x 10 s) the probes put the break-evens
at 0.77-0.88 of the units, yet whole updates that gathered 21-24 of their 31 blocks at about half the units
took 0.94, 1.13 and 1.44 x the update that masks them (medians of 5: 98, 118 and 151 ms against 104 ms;
their means 131 to 171 ms): a gathered block reads its active count on the host, which stalls the queue of
kernels the host runs ahead of, and every update gathers to new widths. ``gather`` still gathers there when
asked.
"""

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .hard_concrete import HardConcrete

logger = logging.getLogger(__name__)

#: the active fractions the gathered computation is timed at; the last near the top, where an update's draws
#: fall at the start of a run (FFN units at ~0.83-0.95, conv channels at ~0.999), so that no decision there
#: rests on a line extrapolated from lower fractions
FRACTIONS = (0.25, 0.5, 0.75, 0.95)
#: a block gathers only where the fitted line says that saves at least this share of the masked time
GATHER_MARGIN = 0.05
#: what ``criterion.inactive_compute`` may ask for
MODES = ("measure", "gather", "mask")
#: the device types on which ``measure`` times the blocks; on any other it computes them masked
MEASURED_DEVICE_TYPES = ("cpu",)


@dataclass
class Probe:
    """One gate's block, to be timed: ``run()`` computes the block's forward and backward on inputs of the
    last training batch's shape; blocks with the same ``key`` share a measurement."""

    gate: HardConcrete
    key: Hashable
    run: Callable[[], None]


@dataclass
class BreakEven:
    """The measured times of one kind of block (seconds, median) and the fraction where gathering stops
    paying: ``masked`` at full width, ``gathered`` at each of ``fractions`` (``FRACTIONS`` rounded to whole
    units: ``probed_fractions``)."""

    masked: float
    gathered: Tuple[float, ...]
    fractions: Tuple[float, ...] = FRACTIONS

    @property
    def below(self) -> float:
        """The active fraction below which gathering is faster by at least ``GATHER_MARGIN`` of the masked
        time, in [0, max(fractions)]: where the least-squares line through the gathered times meets
        ``(1 - GATHER_MARGIN)`` times the masked time (0 where it holds at no fraction). Never above the largest
        fraction measured: beyond it the line is an extrapolation, and the few units left out there save less
        than the timings' noise."""
        n = len(self.fractions)
        mean_f = sum(self.fractions) / n
        mean_t = sum(self.gathered) / n
        var = sum((f - mean_f) ** 2 for f in self.fractions)
        # a gate of a few units is timed at fewer distinct fractions (all of them one unit for two units)
        slope = (
            sum((f - mean_f) * (t - mean_t) for f, t in zip(self.fractions, self.gathered)) / var
            if var
            else 0.0
        )
        intercept = mean_t - slope * mean_f
        worth = self.masked * (1.0 - GATHER_MARGIN)  # the gathered time at which gathering is worth it
        top = max(self.fractions)
        if slope <= 0:  # gathering costs no less with fewer units: take it only if it is already cheaper
            return top if intercept <= worth else 0.0
        return min(top, max(0.0, (worth - intercept) / slope))


def choose(gates: Sequence[HardConcrete], mode: str, probes: Callable[[], List[Probe]], cache: Dict) -> None:
    """Set ``gather_below`` on ``gates``: 1.0 for ``mode`` 'gather', 0.0 for 'mask'; for 'measure', from the
    break-even of each gate's kind of block, measured at the first call (any unit may sample 0 at any update)
    and kept in ``cache`` (the model's) for the rest of the run, on a device type of
    ``MEASURED_DEVICE_TYPES`` (0.0, masked, on any other). ``probes`` lists the timeable blocks (called only
    when something is to be measured)."""
    if mode not in MODES:
        raise ValueError(f"inactive_compute must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "measure" and any(g.log_alpha.device.type not in MEASURED_DEVICE_TYPES for g in gates):
        mode = "mask"
    if mode != "measure":
        for gate in gates:
            gate.gather_below = 1.0 if mode == "gather" else 0.0
        return
    waiting = [g for g in gates if g.num_active > 0 and g.n > 1]
    if not waiting:
        return
    found = probes()
    keys = {id(p.gate): p.key for p in found}
    new = {}
    for probe in found:
        if probe.key not in cache and probe.key not in new and any(id(g) == id(probe.gate) for g in waiting):
            new[probe.key] = probe
    if new:
        times = [_time_probe(probe) for probe in new.values()]
        times = _summed_over_workers(times)
        for (key, probe), (masked, gathered) in zip(new.items(), times):
            cache[key] = BreakEven(masked, tuple(gathered), probed_fractions(probe.gate.n))
            logger.info(
                "zero units of %s: gathered below %.2f computed (masked %.1f ms; gathered at %s: %s ms)",
                key,
                cache[key].below,
                masked * 1e3,
                "/".join(f"{f:.3g}" for f in cache[key].fractions),  # the fractions timed, in whole units
                "/".join(f"{t * 1e3:.1f}" for t in gathered),
            )
    for gate in waiting:
        key = keys.get(id(gate))
        if key in cache:
            gate.gather_below = cache[key].below


def _time_probe(probe: Probe, warmup: int = 1, repeat: int = 3) -> Tuple[float, List[float]]:
    """(masked seconds with half the units active, [gathered seconds at each of FRACTIONS]) of one probe, with the gate's active set and
    ``gather_below`` put back afterwards."""
    gate = probe.gate
    saved_active, saved_below = gate.active.clone(), gate.gather_below
    device = gate.log_alpha.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            gate.set_active(_first(gate.n, 0.5, gate.active.device))
            gate.gather_below = 0.0
            masked = _seconds(probe.run, device, warmup, repeat)
            gathered = []
            for fraction in FRACTIONS:
                gate.set_active(_first(gate.n, fraction, gate.active.device))
                gate.gather_below = 1.0
                gathered.append(_seconds(probe.run, device, warmup, repeat))
    finally:
        gate.set_active(saved_active)
        gate.gather_below = saved_below
    return masked, gathered


def _probed_count(n: int, fraction: float) -> int:
    """The units a probe of a gate of ``n`` computes at ``fraction``: ``round(fraction * n)``, at least one
    and at most n - 1."""
    return min(n - 1, max(1, round(fraction * n)))


def probed_fractions(n: int) -> Tuple[float, ...]:
    """The fractions of a gate of ``n`` units the gathered computation is actually timed at (``FRACTIONS``
    rounded to whole units): what its break-even's line is fitted on."""
    return tuple(_probed_count(n, f) / n for f in FRACTIONS)


def _first(n: int, fraction: float, device: torch.device) -> torch.Tensor:
    """An active set of ``n`` units with its first ``_probed_count(n, fraction)`` active."""
    active = torch.zeros(n, dtype=torch.bool, device=device)
    active[: _probed_count(n, fraction)] = True
    return active


def _seconds(run: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``run`` after ``warmup`` calls, synchronised on a GPU."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _summed_over_workers(times: List[Tuple[float, List[float]]]) -> List[Tuple[float, List[float]]]:
    """Every worker's times summed, so that all of them fit the same lines (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return times
    flat = torch.tensor([[m, *g] for m, g in times], dtype=torch.float64)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    dist.all_reduce(flat)
    return [(row[0], row[1:]) for row in flat.cpu().tolist()]


def forward_backward(
    module_call: Callable[[torch.Tensor], torch.Tensor],
    make_input: Callable[[], torch.Tensor],
    module: nn.Module,
    autocast: Optional[Tuple[str, torch.dtype]],
) -> Callable[[], None]:
    """A ``Probe.run``: ``module_call(x)`` on a fresh ``make_input()`` and its backward into the input and
    ``module``'s trainable parameters with ``torch.autograd.grad`` (no ``.grad`` is written), under
    ``autocast`` (device type, dtype) when the training batch ran under one."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        x = make_input().requires_grad_(True)
        if autocast is not None:
            with torch.autocast(autocast[0], dtype=autocast[1]):
                out = module_call(x)
        else:
            out = module_call(x)
        torch.autograd.grad(out.float().sum(), [x, *params], allow_unused=True)

    return run


def model_probes(
    model: nn.Module, batch_shape: Tuple[int, int], autocast: Optional[Tuple[str, torch.dtype]] = None
) -> List[Probe]:
    """The probes of a ``DPHuBERTModel``'s unit gates for a training batch of ``batch_shape`` ``(B, L)``
    samples: each gated conv layer with the one after it (its gate decides both: the outputs the first
    computes, the inputs the second reads), each attention block with a head gate, each FFN block with a unit
    gate. Whole-block gates need no probe: a closed block is skipped, which always pays."""
    batch, samples = batch_shape
    blocks = list(model.feature_extractor.blocks)
    probes: List[Probe] = []
    lengths, channels = samples, 1
    for i, block in enumerate(blocks):
        if block.gate is not None:
            pair = blocks[i : i + 2]
            weight = block.conv.weight
            shape = (batch, channels, lengths)

            def make(shape=shape, weight=weight) -> torch.Tensor:
                return torch.randn(shape, device=weight.device, dtype=weight.dtype)

            call = lambda x, pair=pair: model.feature_extractor.run_blocks(x, pair)  # noqa: E731
            run = forward_backward(call, make, nn.ModuleList(pair), autocast)
            probes.append(Probe(block.gate, ("conv", i), run))
        lengths = (lengths - block.kernel) // block.stride + 1
        channels = block.out_channels
    frames = lengths
    for layer in model.encoder.layers:
        for module, gate_name in ((layer.self_attn, "head_gate"), (layer.ffn, "unit_gate")):
            gate = getattr(module, gate_name, None) if module is not None else None
            if gate is None or module.skipped:
                continue
            weight = next(module.parameters())
            width = model.cfg.encoder_embed_dim

            def make(weight=weight, width=width) -> torch.Tensor:
                return torch.randn(batch, frames, width, device=weight.device, dtype=weight.dtype)

            if gate_name == "head_gate":
                bias = None
                if hasattr(module, "teacher_heads"):  # WavLM's relative position bias, (H_teacher, T, T)
                    bias = torch.zeros(module.teacher_heads, frames, frames, device=weight.device)
                call = lambda x, module=module, bias=bias: module(x, None, bias)  # noqa: E731
                key = ("attention", type(module).__name__, width, gate.n, module.head_dim)
            else:
                call = module
                key = ("ffn", width, gate.n)
            probes.append(Probe(gate, key, forward_backward(call, make, module, autocast)))
    return probes
