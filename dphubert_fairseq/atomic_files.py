"""Files that appear whole or not at all: written (or copied) under a temporary name in the destination's
folder, then renamed over it, so a crash or a kill never leaves a half-written file where the last good one
was. They get the permissions a plain ``open(path, "w")`` would give (0666 less the umask)."""

import contextlib
import os
import shutil
import tempfile
from typing import IO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_of(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return folder


def _temporary_beside(path: str) -> str:
    """A new, empty temporary file in ``path``'s folder (created if need be), with normal permissions."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=_folder_of(path))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
    return tmp


def _replace_or_remove(tmp: str, path: str, fill: Callable[[str], None]) -> None:
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a binary file that becomes ``path`` (flushed to disk) once ``write`` returns."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    _replace_or_remove(_temporary_beside(path), path, fill)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` in one step. A hard link where the file system allows (instant, no
    space: fairseq replaces checkpoint files by renaming new ones over them, never rewrites one in place),
    otherwise a full copy under a temporary name."""
    tmp = _temporary_beside(dst)
    os.remove(tmp)  # only the unique name is wanted; os.link needs it free

    def fill(name: str) -> None:
        try:
            os.link(src, name)
        except OSError:  # no hard links here (some network or FUSE file systems, another device)
            with open(src, "rb") as fin, open(name, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
                fout.flush()
                os.fsync(fout.fileno())
            os.chmod(name, 0o666 & ~_umask())

    _replace_or_remove(tmp, dst, fill)


@contextlib.contextmanager
def work_folder_beside(path: str) -> Iterator[str]:
    """A new temporary folder in ``path``'s folder (created if need be), named like ``atomic_write``'s
    temporary files, removed with what it holds when the ``with`` block is left: room for the intermediate
    files of what becomes ``path``, on its file system rather than in the system's temporary folder, and
    never left behind."""
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=_folder_of(path))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
