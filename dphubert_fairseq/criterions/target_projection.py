"""Landing on the target size: the last updates of stage 1 end on the requested parameter count.

The Lagrangian drives the *expected* size to the target, but only as fast as its multipliers settle. The
reference's 50k updates give them that time (its released HuBERT Base model is 0.2499 of the teacher); a run of
a few hundred updates does not: the multipliers wind up while the gates resist during the ramp, the gates then
close at the optimizer's full speed and overshoot, and a closed gate reopens slowly, so the run ends too sparse
(0.80 for a 0.75 target in the quickstart before this). A user reads the target as the size they will get.

So in the final phase of stage 1 (``criterion.target_projection_start``, a fraction of the run) every update
ends with a projection onto the target: one common offset is added to every gate logit, chosen so that the
size the eval masks imply (what ``dphubert-export`` keeps) is the nearest reachable to the target. A common
offset keeps the gates' order, and so which units the training ranked highest; it moves the units nearest to
the decision boundary across it, and the updates that remain let the weights adapt to them. Where the
Lagrangian has settled on the target by itself, the offset is close to zero. The objective is unchanged,
and the export stays exact: it folds the masks the model has.

The offset is found by bisection on the device, with no value read back to the host (so a GPU never waits).
With several workers, rank 0's offset is the one every worker applies (one scalar broadcast per update): the
bisection sums over ``index_add``, which is not deterministic on CUDA, and near the target a rounding can tip
two workers to different offsets, which nothing would bring back together.
"""

from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..macs import Metric
from ..models.dphubert import DPHuBERTModel

#: Offsets are searched in [-SPAN, SPAN] (logit units); gate logits live within a few units of 0.
SPAN = 16.0
#: Bisection steps: the offset is found to 2 * SPAN / 2**ITERATIONS.
ITERATIONS = 24
#: A stage 1 that ends further than this from its target sparsity is warned about (at its end and on export).
TARGET_TOLERANCE = 0.02


def missed_target(reached: float, target: float, metric: str = "params") -> Optional[str]:
    """A one-line warning when sparsity ``reached`` (counted in ``metric``) is more than ``TARGET_TOLERANCE``
    from ``target``, saying what to change; None otherwise."""
    gap = reached - target
    if abs(gap) <= TARGET_TOLERANCE:
        return None
    what = {"params": "sparsity", "macs": "MACs sparsity"}.get(metric, f"{metric} sparsity")
    if metric != "params":
        what += f" (criterion.target_metric={metric})"
    return (
        f"stage 1 missed its target: {what} {reached:.4f} reached, criterion.target_sparsity={target:.4f} "
        f"asked ({abs(gap):.4f} {'too sparse' if gap > 0 else 'too dense'}). The run ended before its size "
        "settled: give it more updates (optimization.max_update) or let the learning-rate warm-up "
        "(optimizer.groups.default.lr_scheduler.warmup_updates) end well before it; keep "
        "criterion.target_projection_start below 1 and model.prune_units able to reach the target"
    )


@torch.no_grad()
def offset_to_target(model: DPHuBERTModel, target_params: float, metric: Metric = "params") -> torch.Tensor:
    """The scalar to add to every gate logit so that the eval-mask size in ``metric`` (``macs.size``) is the
    nearest reachable to ``target_params`` (0 when the target cannot be bracketed within ``SPAN``). A float32
    scalar tensor on the gates' device."""
    device = model.gate_set.gates[0].log_alpha.device

    def eval_mask_params(logit_shift: torch.Tensor) -> torch.Tensor:
        return model.eval_mask_size(metric, logit_shift=logit_shift)

    lo = torch.full((), -SPAN, device=device)
    hi = torch.full((), SPAN, device=device)
    f_lo, f_hi = eval_mask_params(lo), eval_mask_params(hi)
    bracketed = (f_lo <= target_params) & (f_hi >= target_params)
    for _ in range(ITERATIONS):  # invariant: size(lo) <= target <= size(hi); size grows with the offset
        mid = (lo + hi) / 2
        f_mid = eval_mask_params(mid)
        above = f_mid >= target_params
        hi, f_hi = torch.where(above, mid, hi), torch.where(above, f_mid, f_hi)
        lo, f_lo = torch.where(above, lo, mid), torch.where(above, f_lo, f_mid)
    nearest = torch.where((f_hi - target_params) <= (target_params - f_lo), hi, lo)
    return torch.where(bracketed, nearest, torch.zeros((), device=device))


@torch.no_grad()
def project_to_target(model: DPHuBERTModel, target_params: float, metric: Metric = "params") -> torch.Tensor:
    """Shift every gate logit of ``model`` by ``offset_to_target`` (rank 0's, with several workers); returns
    the offset."""
    offset = offset_to_target(model, target_params, metric)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(offset, src=0)
    for gate in model.gate_set.gates:
        gate.log_alpha.add_(offset.to(gate.log_alpha.dtype))
    return offset


@torch.no_grad()
def shift_master_copies(optimizer, model: DPHuBERTModel) -> None:
    """Write the gate logits, as the landing shifted them, into the flat float32 master copy that fairseq's
    ``FP16Optimizer`` keeps under ``common.fp16`` with flattened gradients (its default): that copy overwrites
    the model's parameters at every step, so a shift made on the model alone would be undone by the next one.
    Nothing to do for other optimizers: unflattened float32 masters of the (float32) gates share their storage.
    The copy's layout is fairseq's: per device, that device's ``fp16_params`` in order."""
    if not getattr(optimizer, "has_flat_params", False):
        return
    gates = {id(gate.log_alpha) for gate in model.gate_set.gates}
    on_device: Dict[Optional[int], List[torch.Tensor]] = defaultdict(list)
    for p in optimizer.fp16_params:
        on_device[p.device.index].append(p)
    for device, flat in optimizer.fp32_params.items():
        offset = 0
        for p in on_device[device]:
            if id(p) in gates:
                flat.data[offset : offset + p.numel()].copy_(p.data.view(-1))
            offset += p.numel()
