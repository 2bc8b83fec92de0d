"""Telling a damaged checkpoint from a whole one without loading it, and finding the newest whole one of a
run, so that a resume after a kill never stops on a cut-short ``checkpoint_last.pt``."""

import glob
import os
import re
import zipfile
from typing import List, Optional

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_UPDATES = re.compile(r"checkpoint_\d+_(\d+)")


def checkpoint_damage(path: str) -> Optional[str]:
    """Why ``path`` cannot be a whole PyTorch checkpoint, or None if it looks whole.

    Cheap: torch writes a zip archive whose directory is its last record, so a file cut short anywhere has
    none; zipfile reads only that directory. Files in torch's legacy (pre-1.6) format cannot be judged
    without loading them and pass."""
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"it is cut short or damaged ({err}; {size:,} bytes)"
        return None
    if head.startswith(_PICKLE_PROTO):
        return None
    return f"it is not a PyTorch checkpoint (it starts with {head!r})"


def _age_key(path: str):
    match = _UPDATES.search(os.path.basename(path))
    return (os.path.getmtime(path), int(match.group(1)) if match else -1)


def newest_intact_checkpoint(save_dir: str, exclude: str, suffix: str = "") -> Optional[str]:
    """The most recently written ``checkpoint*{suffix}.pt`` in ``save_dir`` other than ``exclude`` that
    ``checkpoint_damage`` finds whole (ties: the one with more updates in its name), or None."""
    candidates = [
        p
        for p in glob.glob(os.path.join(glob.escape(save_dir), f"checkpoint*{suffix}.pt"))
        if os.path.abspath(p) != os.path.abspath(exclude) and os.path.isfile(p)
    ]
    for path in sorted(candidates, key=_age_key, reverse=True):
        if checkpoint_damage(path) is None:
            return path
    return None


def remove_stale_temporaries(save_dir: str) -> List[str]:
    """Remove the temporary files of checkpoint writes that a kill interrupted (fairseq's
    ``checkpoint*.pt.tmp``, the plugin's ``.checkpoint*.pt.*.tmp``); returns their names. Call it only where no
    write can be under way: before a run resumes, on the worker that saves."""
    pattern = os.path.join(glob.escape(save_dir), "{}checkpoint*.pt*.tmp")
    removed = []
    for path in glob.glob(pattern.format("")) + glob.glob(pattern.format(".")):
        if os.path.isfile(path):
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed
