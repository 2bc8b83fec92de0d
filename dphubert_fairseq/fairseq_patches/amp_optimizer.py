"""Patch: fairseq's AMP optimizer unscales the gradients once, works with the composite optimizer, says whether
its step was taken, and saves its loss scale.

Target: ``AMPOptimizer`` (``common.amp``, the recipe's precision): its ``clip_grad_norm``, ``step``,
``param_groups``, ``zero_grad``, ``state_dict`` and ``load_state_dict``. ``AMPOptimizer.optimizer`` stays what
fairseq means by it, the torch optimizer (``reduce_lr_on_plateau``, optimizer sharding and ``trainer.py`` read
it so). What fairseq does wrong:

- ``clip_grad_norm`` unscales ``self.optimizer`` (the torch optimizer) and ``step()`` steps ``self.fp32_optimizer``
  (the fairseq wrapper). GradScaler tracks optimizers by identity, so ``step()`` finds the wrapper not yet
  unscaled and divides the same gradients by the loss scale a second time (Adam's eps then swamps every small
  gradient). Here both hand the scaler one object (``ScalerTarget``): the fairseq optimizer's parameter groups
  and step.
- With the composite optimizer (per-group learning rates) the torch-level object is glue with no
  ``param_groups`` or ``state_dict``: the first ``zero_grad`` and every checkpoint fail. Here the parameter
  groups, ``zero_grad`` and the state dict are the fairseq optimizer's.
- When the scaled gradients overflowed the scaler skips the step, and fairseq retries the batch
  (``common.amp_batch_retries``) with the same update number, calling ``task.optimizer_step`` again. Here
  ``last_step_taken`` says whether the last ``step()`` changed the parameters, so that what runs once per
  update (the criterion's ``after_optimizer_step``) runs once per update taken.
- The scaler's state is not saved, so every resume restarts the loss scale at ``common.fp16_init_scale``. Here
  the state dict holds it under ``SCALER_KEY`` (numbers only: weights-only loading reads it), and loading
  restores it.

Guard: on an ``AMPOptimizer`` over stand-ins, clip and step hand the scaler different objects, or ``step()``
leaves no ``last_step_taken``, or the state dict has no ``SCALER_KEY``.
"""

import logging
from types import SimpleNamespace
from typing import Any, Dict, List

import torch
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fairseq_optimizer import FairseqOptimizer

from .patch import WRITTEN_FOR, Patch, mark, marked

#: fairseq's own logger for AMP messages (logs and tools look for "AMP: overflow detected")
logger = logging.getLogger("fairseq.optim.amp_optimizer")

#: The key of the GradScaler's state in the AMP optimizer's state dict (``last_optimizer_state`` of a checkpoint).
SCALER_KEY = "amp_scaler"


class ScalerTarget:
    """What the GradScaler unscales and steps, one object for both: the fairseq optimizer's parameter groups
    and step. ``stepped`` records whether the scaler called ``step()`` (it does not when gradients overflowed)."""

    def __init__(self, optimizer: FairseqOptimizer) -> None:
        self.optimizer = optimizer
        self.stepped = False

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return list(self.optimizer.param_groups)

    def step(self) -> None:
        self.stepped = True
        self.optimizer.step()


def _scaler_target(amp: AMPOptimizer) -> ScalerTarget:
    target = amp.__dict__.get("_scaler_target")
    if target is None or target.optimizer is not amp.fp32_optimizer:
        if target is None:
            # the patch applies to every AMP run of a process that loaded the plugin, stock tasks' too: say so
            logger.info(
                "AMP: gradients unscaled once per update and the loss scale saved in checkpoints "
                "(dphubert_fairseq's patch of AMPOptimizer; fairseq's own divides the gradients by the loss "
                "scale twice)"
            )
        target = amp.__dict__["_scaler_target"] = ScalerTarget(amp.fp32_optimizer)
    return target


def clip_grad_norm(self: AMPOptimizer, max_norm, aggregate_norm_fn=None):
    """Unscale the gradients (once: ``step`` hands the scaler the same object), clip them, and report an
    overflow as fairseq does."""
    self.scaler.unscale_(_scaler_target(self))
    grad_norm = self.fp32_optimizer.clip_grad_norm(max_norm, aggregate_norm_fn)
    if not torch.isfinite(grad_norm).all():
        new_loss_scale = self.next_loss_scale
        if new_loss_scale <= self.min_loss_scale:
            raise FloatingPointError(
                f"AMP: Minimum loss scale reached ({self.min_loss_scale}). Your loss is probably exploding. "
                f"Try restarting training or use fp32. {new_loss_scale}"
            )
        logger.info(f"AMP: overflow detected, setting scale to {new_loss_scale}")
    return grad_norm


def step(self: AMPOptimizer) -> None:
    """Step unless the gradients overflowed, update the loss scale; ``last_step_taken`` says which."""
    target = _scaler_target(self)
    target.stepped = False
    self.scaler.step(target)
    self.scaler.update()
    self.last_step_taken = target.stepped


def param_groups(self: AMPOptimizer):
    return self.fp32_optimizer.param_groups


def zero_grad(self: AMPOptimizer) -> None:
    self.fp32_optimizer.zero_grad()


def state_dict(self: AMPOptimizer) -> Dict[str, Any]:
    """The fairseq optimizer's state dict, with the scaler's under ``SCALER_KEY`` (none while it is disabled)."""
    state = dict(self.fp32_optimizer.state_dict())
    scaler_state = self.scaler.state_dict()
    if scaler_state:
        state[SCALER_KEY] = scaler_state
    return state


def load_state_dict(self: AMPOptimizer, state_dict: Dict[str, Any], optimizer_overrides=None) -> None:
    """Restore the loss scale where the checkpoint has one (an enabled scaler's), then the optimizer."""
    state = dict(state_dict)
    scaler_state = state.pop(SCALER_KEY, None)
    if scaler_state and self.scaler.is_enabled():
        self.scaler.load_state_dict(scaler_state)
    self.fp32_optimizer.load_state_dict(state, optimizer_overrides)


def needed() -> bool:
    handed: List[object] = []

    class Scaler:
        def unscale_(self, optimizer) -> None:
            handed.append(optimizer)

        def step(self, optimizer) -> None:
            handed.append(optimizer)
            optimizer.step()

        def update(self) -> None:
            pass

        def state_dict(self) -> Dict[str, float]:
            return {"scale": 2.0}

    inner = SimpleNamespace(
        optimizer=SimpleNamespace(param_groups=[], state_dict=dict, step=lambda *a, **k: None),
        param_groups=[],
        clip_grad_norm=lambda *a, **k: torch.zeros(()),
        step=lambda *a, **k: None,
        state_dict=dict,
    )
    amp = AMPOptimizer.__new__(AMPOptimizer)
    amp.fp32_optimizer, amp._grad_scaler, amp.min_loss_scale = inner, Scaler(), 1e-4
    amp.clip_grad_norm(1.0)
    amp.step()
    one_object = len(handed) == 2 and handed[0] is handed[1]
    return not (one_object and hasattr(amp, "last_step_taken") and SCALER_KEY in amp.state_dict())


def applied() -> bool:
    return marked(AMPOptimizer.step)


def apply() -> None:
    for fn in (clip_grad_norm, step, zero_grad, state_dict, load_state_dict):
        setattr(AMPOptimizer, fn.__name__, mark(fn))
    AMPOptimizer.param_groups = property(mark(param_groups), doc="the fairseq optimizer's parameter groups")


PATCH = Patch(
    "amp_optimizer",
    "fairseq.optim.amp_optimizer.AMPOptimizer (clip_grad_norm, step, param_groups, zero_grad, state_dict, "
    "load_state_dict)",
    WRITTEN_FOR,
    needed,
    applied,
    apply,
)
