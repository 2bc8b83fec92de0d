"""Loading native fairseq checkpoints with torch's ``weights_only=True`` default left on.

Since torch 2.6, ``torch.load`` refuses to unpickle anything but tensors and plain containers unless the class
is allow-listed; fairseq's ``load_checkpoint_to_cpu`` (and its multi-GPU broadcast of a resumed checkpoint)
call it without ``weights_only``. We allow-list exactly the classes that native fairseq checkpoints hold, and
no more; a file that pickles anything else is refused with a one-line error naming the class and the opt-in.

This module holds the allow-list, the checks and the error messages; the patches that put them into fairseq's
reader are ``fairseq_patches.weights_only_allow_list``, ``checkpoint_read_errors`` and
``checkpoint_layout_check``.
"""

import argparse
import collections
import importlib
import inspect
import os
import pickle
import re
import sys
import typing
from typing import Callable, Iterable, List, Optional, TypeVar

import torch
from fairseq import checkpoint_utils
from fairseq.data.dictionary import Dictionary
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from .errors import CheckpointError, CheckpointLayoutError, ConfigError

T = TypeVar("T")

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


#: Modules whose objects never belong in a checkpoint: they run code, import code, or reach the system.
#: Checked on the root package, so ``os.path`` or ``importlib.util`` are denied too.
DENIED_MODULES = frozenset(
    "builtins os posix nt subprocess sys importlib pickle copyreg marshal shutil runpy ctypes socket code "
    "codeop pty signal multiprocessing threading _thread asyncio tempfile io pathlib glob types functools "
    "operator inspect gc webbrowser pydoc timeit pdb bdb cProfile profile trace ssl http urllib ftplib "
    "smtplib telnetlib zipimport pkgutil site sysconfig platform resource fcntl mmap select".split()
)


def why_not_allowable(name: str, obj: object = None) -> Optional[str]:
    """Why the global ``name`` (``module.attr``; ``obj`` when already imported) must not be allow-listed, or
    None when it is a class of an ordinary module, which a user may choose to trust."""
    module = name.rpartition(".")[0] or "builtins"
    if module.split(".")[0] in DENIED_MODULES:
        return f"an object of the {module} module, which runs code or reaches the system"
    if obj is not None:
        if not inspect.isclass(obj):
            return f"a {type(obj).__name__}, not a class (only data classes may be allow-listed)"
        if issubclass(obj, type):
            return "a metaclass, not a data class"
    return None


def allow_globals(names: Iterable[str], source: str = TRUST_ENV) -> None:
    """Allow-list classes given as ``module.Class`` names, for users who trust their files. Functions,
    metaclasses and anything from a module that runs code or reaches the system are refused."""
    for name in names:
        name = name.strip()
        if not name:
            continue
        module, _, attr = name.rpartition(".")
        reason = why_not_allowable(name)
        if reason is None:
            try:
                obj = getattr(importlib.import_module(module or "builtins"), attr)
            except (ImportError, AttributeError, ValueError):
                raise ConfigError(f"{source}: cannot import {name!r}") from None
            reason = why_not_allowable(name, obj)
        if reason is not None:
            raise ConfigError(f"{source}: refusing to allow-list {name}: it is {reason}")
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


def _loaded_object(name: str) -> object:
    """The object ``name`` names if its module is already imported (never imports anything), else None."""
    module, _, attr = name.rpartition(".")
    return getattr(sys.modules.get(module or "builtins"), attr, None)


def describe_load_error(path: str, err: BaseException) -> str:
    """One line saying why ``torch.load`` refused ``path``."""
    text = str(err)
    # torch words it "GLOBAL x.y was not an allowed global" or "unsupported GLOBAL x.y whose module x is blocked"
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        name = found.group(1)
        reason = why_not_allowable(name, _loaded_object(name))
        if reason is not None:
            return (
                f"{path}: loading refused: it pickles {name}, {reason}; a checkpoint never needs it and "
                "loading it could run code (torch weights_only loading). Do not load this file"
            )
        return (
            f"{path}: refused to load: it pickles {name}, which is not a class native fairseq checkpoints hold "
            f"(torch weights_only loading). If you trust this file and {name} is a data class, allow it with "
            f"{TRUST_ENV}={name} in the environment and load it again"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    return f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({reason})"


def check_layout(state: object) -> None:
    """Refuse what fairseq's upgrade would fail on with a bare KeyError / IndexError deep inside
    (``CheckpointLayoutError``, without the file name: the reader adds it)."""
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointLayoutError("not a fairseq checkpoint (no 'model' entry)")
    if state.get("cfg") is None and state.get("args") is None:
        raise CheckpointLayoutError("not a fairseq checkpoint (neither 'cfg' nor 'args')")
    if not isinstance(state["model"], dict):
        raise CheckpointLayoutError(
            f"an incomplete fairseq checkpoint: 'model' is a {type(state['model']).__name__}, not a state dict"
        )
    cfg = state.get("cfg")
    if cfg is not None and (not isinstance(cfg, (dict, DictConfig)) or cfg.get("model") is None):
        raise CheckpointLayoutError("an incomplete fairseq checkpoint: 'cfg' has no 'model' section")
    history = state.get("optimizer_history", [{}])
    if not isinstance(history, list) or not history or not isinstance(history[-1], dict):
        raise CheckpointLayoutError(
            "an incomplete fairseq checkpoint: 'optimizer_history' is empty or not a list of records"
        )
    if not isinstance(state.get("extra_state", {}), (dict, type(None))):
        raise CheckpointLayoutError("an incomplete fairseq checkpoint: 'extra_state' is not a dict")


#: The problem with ``DPHUBERT_SAFE_GLOBALS`` found by ``allow_list_classes``, raised by every checkpoint load.
_trusted_globals_problem: Optional[str] = None


def allow_list_classes() -> None:
    """Allow-list ``SAFE_GLOBALS`` and the classes ``DPHUBERT_SAFE_GLOBALS`` names. A malformed variable does
    not fail here (importing the plugin must not fail): ``check_trusted_globals`` raises it when a checkpoint
    is loaded. Idempotent."""
    global _trusted_globals_problem
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    try:
        allow_globals(os.environ.get(TRUST_ENV, "").split(","))
        _trusted_globals_problem = None
    except ConfigError as err:
        _trusted_globals_problem = str(err)


def check_trusted_globals() -> None:
    """Raise the ``ConfigError`` (one line naming ``DPHUBERT_SAFE_GLOBALS`` and the bad entry) that the
    variable's value gave when it was read, if any."""
    if _trusted_globals_problem is not None:
        raise ConfigError(_trusted_globals_problem)


def read_with_readable_errors(path: str, read: Callable[[], T]) -> T:
    """``read()`` (a torch or fairseq read of ``path``), its refusals and damaged-file errors turned into one
    line naming the file (``CheckpointError``): a refused class, a truncated zip, a layout problem."""
    try:
        return read()
    except CheckpointLayoutError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(describe_load_error(path, err)) from None
    except RuntimeError as err:
        if "PytorchStreamReader" in str(err) or "zip archive" in str(err):
            raise CheckpointError(describe_load_error(path, err)) from None
        raise


def read_torch_file(path: str, mmap: bool = False) -> object:
    """Whatever a torch file holds, loaded to CPU weights-only (checked and refused as ``read_checkpoint``
    does), for files that are not fairseq checkpoints (WavLM's, the reference implementation's). ``mmap``:
    map the tensors' storage instead of reading it (zip-format files; others are read), for a look at the
    layout that costs no full read."""
    # allow-listed here too: the patch that does it at import is guarded on torch >= 2.6, and this read is
    # weights-only on every torch (a HuBERT teacher's Dictionary is looked at through it first)
    allow_list_classes()
    check_trusted_globals()
    check_checkpoint_file(path)
    with open(path, "rb") as f:
        mmap = mmap and f.read(4).startswith(_ZIP_MAGIC)
    return read_with_readable_errors(
        path, lambda: torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    )


def read_checkpoint(path: str) -> dict:
    """Load a fairseq checkpoint to CPU through fairseq (weights-only, layout checked, upgraded)."""
    check_trusted_globals()
    return checkpoint_utils.load_checkpoint_to_cpu(str(path))
