"""Patch: gradients on the CPU are clipped on the CPU, also on a machine with a GPU.

Target: ``fairseq.utils.clip_grad_norm_``, which every fairseq optimizer's ``clip_grad_norm`` calls. With more
than one gradient and without apex's fused kernels it takes the norm on ``torch.cuda.current_device()``
whenever CUDA is available, wherever the gradients are; the clip then multiplies CPU gradients by a scalar on
the GPU and fails ("scalar tensor is expected to be on cpu but is on cuda:0"). So no CPU run can update on a
machine that has a GPU: ``common.cpu=true``, a CPU benchmark, the test suite on a GPU workstation (seen on an
H200 machine). When every gradient is on the CPU, fairseq's own function runs with CUDA hidden from its
device choice (``torch.cuda.is_available()`` reads False inside it, and apex's CUDA-only norm is not
offered), so the norm is taken where the gradients are; anything else goes to it unchanged.
Guard: fairseq's function picks the GPU from ``torch.cuda.is_available()`` alone (its source says so).
"""

import inspect
import types
from typing import Callable

import torch
from fairseq import utils

from .patch import function_patch


class _TorchWithoutCuda:
    """``torch`` as ``fairseq.utils`` sees it while it clips CPU gradients: CUDA reads as unavailable."""

    cuda = types.SimpleNamespace(is_available=lambda: False)

    def __getattr__(self, name: str):
        return getattr(torch, name)


def needed() -> bool:
    source = inspect.getsource(inspect.unwrap(utils.clip_grad_norm_))
    return "if torch.cuda.is_available():" in source and "device = torch.cuda.current_device()" in source


def wrapper_for(original: Callable) -> Callable:
    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor:
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        grads = [p.grad for p in params if p is not None and getattr(p, "grad", None) is not None]
        if not grads or any(g.device.type != "cpu" for g in grads):
            return original(params, max_norm, aggregate_norm_fn)
        # module globals of fairseq.utils, swapped for this call only (the trainer clips on its own thread)
        saved = utils.torch, utils.multi_tensor_l2norm_available
        utils.torch, utils.multi_tensor_l2norm_available = _TorchWithoutCuda(), False
        try:
            return original(params, max_norm, aggregate_norm_fn)
        finally:
            utils.torch, utils.multi_tensor_l2norm_available = saved

    return clip_grad_norm_


PATCH = function_patch("cpu_grad_norm", utils, "clip_grad_norm_", needed, wrapper_for)
