"""Patch: ``checkpoint_last.pt`` and ``checkpoint_best.pt`` appear whole or not at all.

Target: the ``PathManager`` that ``checkpoint_utils.save_checkpoint`` uses. It writes ``checkpoint_E_N.pt``
atomically (a .tmp file renamed), then makes ``checkpoint_last.pt`` and ``checkpoint_best.pt`` with a plain
``PathManager.copy`` over the old file: a kill during that copy leaves a truncated ``checkpoint_last.pt``, and
the next run refuses to resume. Local copies become ``atomic_files.atomic_copy`` (a hard link or a copy under a
temporary name, renamed). A hard link shares its file with the checkpoint it copies, so a write in place
(``checkpoint.write_checkpoints_asynchronously``: ``PathManager.opena``, iopath's) first unlinks the name it
writes, and the other names keep their checkpoints.
Guard: ``save_checkpoint`` still copies with ``PathManager.copy``.
"""

import inspect
import os

from fairseq import checkpoint_utils
from fairseq.file_io import PathManager

from ..atomic_files import atomic_copy
from .patch import MARK, WRITTEN_FOR, Patch


class AtomicCopyPathManager:
    """fairseq's PathManager, except that ``copy`` between local files is atomic."""

    def __getattr__(self, name):
        return getattr(PathManager, name)

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in src_path or "://" in dst_path or (not overwrite and os.path.exists(dst_path)):
            return PathManager.copy(src_path, dst_path, overwrite)
        atomic_copy(src_path, dst_path)
        return True

    @staticmethod
    def opena(path: str, mode: str = "r", *args, **kwargs):
        if "://" not in path and "w" in mode and os.path.isfile(path) and os.stat(path).st_nlink > 1:
            os.unlink(path)
        return PathManager.opena(path, mode, *args, **kwargs)


setattr(AtomicCopyPathManager, MARK, True)


def needed() -> bool:
    return "PathManager.copy" in inspect.getsource(inspect.unwrap(checkpoint_utils.save_checkpoint))


def applied() -> bool:
    return isinstance(checkpoint_utils.PathManager, AtomicCopyPathManager)


def apply() -> None:
    checkpoint_utils.PathManager = AtomicCopyPathManager()


PATCH = Patch(
    "atomic_checkpoint_copies",
    "fairseq.checkpoint_utils.PathManager.copy",
    WRITTEN_FOR,
    needed,
    applied,
    apply,
)
