"""Patch: allow-list the classes native fairseq checkpoints pickle, so that they load under torch's
``weights_only=True`` default (``safe_loading.SAFE_GLOBALS``, plus the user's ``DPHUBERT_SAFE_GLOBALS``).

Target: ``torch.serialization``'s allow-list, for ``checkpoint_utils.load_checkpoint_to_cpu`` and the trainer's
broadcast of a resumed checkpoint, which call ``torch.load`` without ``weights_only``.
Guard: torch >= 2.6 (``torch.load`` defaults to weights-only) and fairseq's reader does not pass
``weights_only`` itself (fairseq's own torch 2.6 fix passes ``weights_only=False``).
"""

import inspect

import torch
from fairseq import checkpoint_utils

from .. import safe_loading
from .patch import WRITTEN_FOR, Patch

_installed = False


def _torch_loads_weights_only() -> bool:
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6) and hasattr(torch.serialization, "add_safe_globals")


def needed() -> bool:
    reader = inspect.unwrap(checkpoint_utils.load_checkpoint_to_cpu)
    return _torch_loads_weights_only() and "weights_only" not in inspect.getsource(reader)


def applied() -> bool:
    return _installed


def apply() -> None:
    global _installed
    safe_loading.allow_list_classes()
    _installed = True


PATCH = Patch(
    "weights_only_allow_list", "torch.serialization safe globals", WRITTEN_FOR, needed, applied, apply
)
