"""Loading native fairseq checkpoints with torch's ``weights_only=True`` default left on.

Since torch 2.6, ``torch.load`` refuses to unpickle anything but tensors and plain containers unless the class
is allow-listed; fairseq's ``load_checkpoint_to_cpu`` (and its multi-GPU broadcast of a resumed checkpoint)
call it without ``weights_only``. We allow-list exactly the classes that native fairseq checkpoints hold, and
no more; a file that pickles anything else is refused with a one-line error naming the class and the opt-in.
"""

import argparse
import collections
import functools
import importlib
import os
import pickle
import re
import typing
from typing import Iterable, List

import torch
from fairseq import checkpoint_utils
from fairseq.data.dictionary import Dictionary
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from .errors import CheckpointError

#: Environment variable with extra ``module.Class`` names (comma-separated) a user trusts.
TRUST_ENV = "DPHUBERT_SAFE_GLOBALS"

#: What native fairseq checkpoints pickle besides tensors and plain containers.
SAFE_GLOBALS: List[object] = [
    # official HuBERT checkpoints and fairseq's resume checkpoints: task_state["dictionaries"]
    Dictionary,
    # old wav2vec2 releases keep their configuration as an argparse Namespace in state["args"]
    argparse.Namespace,
    # fairseq's trainer broadcasts a resumed checkpoint from rank 0 to the others with torch.save/torch.load,
    # after load_checkpoint_to_cpu turned its cfg into an OmegaConf DictConfig and took the tensors out
    _TensorPlaceholder,
    DictConfig,
    ListConfig,
    ContainerMetadata,
    Metadata,
    AnyNode,
    typing.Any,
    dict,
    list,
    int,
    collections.defaultdict,
]

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


def allow_globals(names: Iterable[str]) -> None:
    """Allow-list classes given as ``module.Class`` names, for users who trust their files."""
    for name in names:
        name = name.strip()
        if not name:
            continue
        module, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module or "builtins"), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"{TRUST_ENV}: cannot import {name!r}") from None
        torch.serialization.add_safe_globals([obj])


def check_checkpoint_file(path: str) -> None:
    """Fail early, with the file's name, on a missing file or one that is not a torch checkpoint."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file (.pt)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with {head!r})")


def describe_load_error(path: str, err: BaseException) -> str:
    """One line saying why ``torch.load`` refused ``path``."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if found:
        cls = found.group(1)
        return (
            f"{path}: refused to load: it pickles {cls}, which is not a class native fairseq checkpoints hold "
            f"(torch weights_only loading). If you trust this file, allow the class with "
            f"{TRUST_ENV}={cls} in the environment (or torch.serialization.add_safe_globals([{cls}])) "
            f"and load it again"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    return f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({reason})"


class _NotAFairseqCheckpoint(ValueError):
    pass


def _wrap_upgrade_state_dict(original):
    # fairseq upgrades whatever torch.load returned and fails with a bare KeyError on a torch file that is not
    # a fairseq checkpoint; check the layout first (load_checkpoint_to_cpu below adds the file name)
    @functools.wraps(original)
    def _upgrade_state_dict(state):
        if not isinstance(state, dict) or "model" not in state:
            raise _NotAFairseqCheckpoint("not a fairseq checkpoint (no 'model' entry)")
        if state.get("cfg") is None and state.get("args") is None:
            raise _NotAFairseqCheckpoint("not a fairseq checkpoint (neither 'cfg' nor 'args')")
        return original(state)

    _upgrade_state_dict.__dphubert_wrapped__ = True
    return _upgrade_state_dict


def _wrap_load_checkpoint_to_cpu(original):
    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        check_checkpoint_file(path)
        try:
            return original(path, *args, **kwargs)
        except _NotAFairseqCheckpoint as err:
            raise CheckpointError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError) as err:
            raise CheckpointError(describe_load_error(path, err)) from None
        except RuntimeError as err:
            if "PytorchStreamReader" in str(err) or "zip archive" in str(err):
                raise CheckpointError(describe_load_error(path, err)) from None
            raise

    load_checkpoint_to_cpu.__dphubert_wrapped__ = True
    return load_checkpoint_to_cpu


def install() -> None:
    """Allow-list the classes of native checkpoints (and the user's trusted ones) and make fairseq's
    checkpoint reader fail with readable errors. Idempotent."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    allow_globals(os.environ.get(TRUST_ENV, "").split(","))
    if not getattr(checkpoint_utils._upgrade_state_dict, "__dphubert_wrapped__", False):
        checkpoint_utils._upgrade_state_dict = _wrap_upgrade_state_dict(checkpoint_utils._upgrade_state_dict)
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "__dphubert_wrapped__", False):
        checkpoint_utils.load_checkpoint_to_cpu = _wrap_load_checkpoint_to_cpu(
            checkpoint_utils.load_checkpoint_to_cpu
        )


def read_checkpoint(path: str) -> dict:
    """Load a fairseq checkpoint to CPU through fairseq (weights-only, layout checked, upgraded)."""
    return checkpoint_utils.load_checkpoint_to_cpu(str(path))
