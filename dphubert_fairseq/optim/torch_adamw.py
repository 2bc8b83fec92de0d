"""``torch_adamw``: torch's AdamW as a fairseq optimizer, with its fused kernel.

The reference implementation trains with ``torch.optim.AdamW``. fairseq's ``adam`` differs from it in two ways
that matter here:

- the update: fairseq adds ``adam_eps`` to ``sqrt(v)`` before the bias correction (``lr * sqrt(1 - b2^t) /
  (1 - b1^t) * m / (sqrt(v) + eps)``), torch after it (``lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``),
  so early in a run fairseq's effective epsilon is up to ``1 / sqrt(1 - b2)`` (~32x, 3e-7 at the recipe's
  1e-8) larger: parameters whose gradients are that small move less than in the reference;
- the speed: without apex, fairseq's ``adam`` is a Python loop over the parameters, a dozen small kernels each
  (about 200 tensors for HuBERT Base); torch's fused AdamW updates every parameter of a device in one kernel
  (on CPU as well).

The config keys are ``adam``'s (``adam_betas``, ``adam_eps``, ``weight_decay``; decoupled weight decay in both),
so a config switches between the two by ``_name`` alone. A run saved with ``adam`` resumes with this one (the
moments and step counts carry over; the next update follows torch's formula) where fairseq's trainer wraps
both alike, as it does under ``common.amp`` or ``common.fp16`` and inside ``composite`` (the recipe's
stage 1): it refuses a checkpoint whose outermost optimizer class differs, which is the case for a plain fp32
run with one group (there, resume with ``adam``, or pass ``checkpoint.reset_optimizer=true``).
"""

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II
from torch.optim.optimizer import _get_fused_kernels_supported_devices


@dataclass
class TorchAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(
        default=(0.9, 0.999), metadata={"help": "Adam's (beta1, beta2): the moments' decay rates"}
    )
    adam_eps: float = field(
        default=1e-8,
        metadata={"help": "added to the bias-corrected sqrt(v) (torch's placement, the reference's)"},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay (AdamW's): the weights shrink by lr * weight_decay"},
    )
    fused: Optional[bool] = field(
        default=None,
        metadata={
            "help": "torch's fused kernel: null uses it where torch has one for every parameter's device and "
            "dtype (CUDA, CPU) and torch's multi-tensor path elsewhere; true requires it; false never uses it"
        },
    )
    lr: List[float] = field(
        default=II("optimization.lr"),
        metadata={
            "help": "the learning rate (its first entry), optimization.lr unless set; the scheduler sets it"
        },
    )


def fused_kernel_takes(p: torch.Tensor) -> bool:
    """Whether torch's fused AdamW updates ``p`` (it checks only at the first step, so checked here first)."""
    # torch's own list of the device types its fused optimizer kernels are built for
    devices = _get_fused_kernels_supported_devices()
    return p.device.type in devices and torch.is_floating_point(p)


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class TorchAdamW(FairseqOptimizer):
    """fairseq's optimizer interface over ``torch.optim.AdamW`` (see the module docstring)."""

    def __init__(self, cfg: TorchAdamWConfig, params) -> None:
        super().__init__(cfg)
        params = list(params)  # tensors, or parameter groups (dicts)
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        unfused = sorted({f"{p.device.type}/{p.dtype}" for p in tensors if not fused_kernel_takes(p)})
        if cfg.fused and unfused:
            raise ValueError(
                f"optimizer.fused=true: torch has no fused AdamW for parameters on {', '.join(unfused)}"
            )
        self.fused = not unfused if cfg.fused is None else cfg.fused
        self._optimizer = torch.optim.AdamW(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        """The arguments of ``torch.optim.AdamW`` (fairseq also hands them on where it wraps the optimizer:
        ``AMPOptimizer``, sharded ``OSS``)."""
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        betas = self.cfg.adam_betas
        if isinstance(betas, str):  # the argparse form, "(0.9, 0.999)"
            betas = tuple(float(b) for b in betas.strip("()[] ").split(","))
        return {
            "lr": lr,
            "betas": tuple(betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
            "fused": True if self.fused else None,
            "foreach": False if self.fused else None,
        }

    @property
    def supports_flat_params(self) -> bool:
        return True

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer_overrides=None) -> None:
        """Load a state saved by this optimizer or by fairseq's ``adam`` (same keys). torch takes the saved
        groups' settings whole, the kernel choice too; the kernel stays this process's (the saved one may be
        another device's, or absent: ``adam`` has none), with each step count where the kernel wants it."""
        super().load_state_dict(state_dict, optimizer_overrides)
        for group in self.optimizer.param_groups:
            group["fused"] = True if self.fused else None
            group["foreach"] = False if self.fused else None
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state and "step" in state:
                    step = state["step"]
                    value = float(step.item() if torch.is_tensor(step) else step)
                    # the fused kernel reads the count on the parameter's device; the others on the CPU
                    device = p.device if self.fused else torch.device("cpu")
                    state["step"] = torch.tensor(value, dtype=torch.float32, device=device)
