"""Checks of a fairseq audio manifest (``{split}.tsv``) before any training starts."""

import os
import sys
from typing import List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch.distributed as dist

from ..errors import ManifestError

#: soundfile subtypes that decode to integer samples: they cannot hold NaN or inf, the content scan skips them
INTEGER_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ULAW", "ALAW"})
#: samples per block of the content scan (1 MiB of float32 per channel): memory stays bounded on long files
_SCAN_BLOCK = 1 << 18
_REGENERATE = "regenerate the manifest, e.g. with fairseq's examples/wav2vec/wav2vec_manifest.py"


def _decoded_lines(path: str) -> List[Tuple[int, str]]:
    """``(line number, text)`` of every line of ``path`` (numbered from 1, newline removed), decoded as
    UTF-8 one line at a time so that an undecodable byte is reported with its line and the file it names."""
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    root = None
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            shown = raw.split(b"\t")[0].decode("utf-8", "backslashreplace")
            what = f"root folder {shown!r}" if number == 1 else f"audio file {os.path.join(root, shown)!r}"
            raise ManifestError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}) "
                f"in {what}; fairseq reads manifests as UTF-8: rename the file to a UTF-8 name and "
                f"{_REGENERATE}"
            ) from None
        if number == 1:
            root = text.strip()
        lines.append((number, text))
    return lines


def _has_non_finite(audio: sf.SoundFile) -> bool:
    """Whether any sample of ``audio`` (read block by block from its current position) is NaN or inf."""
    for block in audio.blocks(blocksize=_SCAN_BLOCK, dtype="float32"):
        if not np.isfinite(block).all():
            return True
    return False


def check_manifest(
    path: str,
    sample_rate: int,
    read_headers: bool = True,
    read_content: bool = False,
    share: Tuple[int, int] = (0, 1),
) -> int:
    """Validate ``path``: its encoding (UTF-8), its root folder and every listed file.

    Every file must exist. With ``read_headers`` its header must also be readable and say ``sample_rate`` and
    a frame count that is not zero and equals the manifest's sample count. With ``read_content`` (implies
    ``read_headers``) every file not stored as integer samples is read completely and refused if it holds a
    NaN or inf sample. Each file is opened once. ``share=(k, n)``: check only every n-th entry from the k-th
    (one worker's part, ``check_manifest_on_workers``). Returns the number of utterances. Raises
    ``ManifestError`` for the first entry at fault (its ``line``).
    """
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no such manifest (expected task.data/<split>.tsv)")
    numbered = _decoded_lines(path)
    if not numbered:
        raise ManifestError(f"{path}: the manifest lists no audio files")
    root = numbered[0][1].strip()
    entries = numbered[1:]  # blank lines too: fairseq's reader refuses them
    if not entries:
        raise ManifestError(f"{path}: the manifest lists no audio files")
    if not os.path.isdir(root):
        raise ManifestError(f"{path}:1: root folder {root!r} does not exist")
    first, step = share
    for number, line in entries[first::step]:
        try:
            _check_entry(path, number, line, root, sample_rate, read_headers, read_content)
        except ManifestError as err:
            raise ManifestError(str(err), line=number) from None
    return len(entries)


def check_manifest_on_workers(
    path: str, sample_rate: int, read_headers: bool = True, read_content: bool = False
) -> int:
    """``check_manifest`` with the files split across the workers of the default process group: each opens
    every world_size-th file, so that no worker spends world_size times longer than it must before the next
    collective (a slow shared file system could otherwise take one past NCCL's timeout). The verdicts are
    shared: every worker returns the count, or raises the same error, that of the earliest line at fault, as a
    single process would (a failure that is not a manifest's, an ``OSError`` say, as a ``ManifestError`` naming
    the worker, chained to it on that worker). Without a process group, ``check_manifest``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return check_manifest(path, sample_rate, read_headers, read_content)
    rank, world = dist.get_rank(), dist.get_world_size()
    verdict: Optional[Tuple[int, str]] = None
    cause: Optional[Exception] = None
    count = 0
    try:
        count = check_manifest(path, sample_rate, read_headers, read_content, share=(rank, world))
    except ManifestError as err:
        verdict = (err.line, str(err))
    except Exception as err:
        # any other failure (an I/O error of the file system) must reach the gather too, or the other workers
        # wait in it until the process group's timeout; the workers raise it as the verdict of no line, after
        # any line at fault
        cause = err
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        verdict = (
            sys.maxsize,
            f"{path}: worker {rank} failed checking its files: {type(err).__name__}: {first_line}",
        )
    verdicts: List[Optional[Tuple[int, str]]] = [None] * world
    dist.all_gather_object(verdicts, verdict)
    failed = sorted(v for v in verdicts if v is not None)
    if failed:
        raise ManifestError(failed[0][1], line=failed[0][0] if failed[0][0] != sys.maxsize else 0) from cause
    return count


def _check_entry(
    path: str, number: int, line: str, root: str, sample_rate: int, read_headers: bool, read_content: bool
) -> None:
    """One manifest entry (line ``number`` of ``path``, ``line`` its text): its format, read as fairseq's
    ``FileAudioDataset`` reads it (the line stripped, then exactly two tab-separated fields), and its file."""
    if not line.strip():
        raise ManifestError(f"{path}:{number}: a blank line, which fairseq's reader refuses; remove it")
    fields = line.strip().split("\t")
    if len(fields) != 2 or not fields[1].isdigit():
        raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
    audio = os.path.join(root, fields[0])
    if not os.path.isfile(audio):
        raise ManifestError(f"{path}:{number}: audio file {audio} does not exist")
    if read_headers or read_content:
        _check_audio(audio, int(fields[1]), f"{path}:{number}", sample_rate, read_content)


def _check_audio(audio: str, listed: int, where: str, sample_rate: int, read_content: bool) -> None:
    """The header of ``audio`` (and with ``read_content`` its samples) against the manifest line ``where``
    (``manifest:line``) that lists it with ``listed`` samples."""
    try:
        handle = sf.SoundFile(audio)
    except Exception as err:  # soundfile raises its own error types for unreadable files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ManifestError(f"{where}: cannot read audio file {audio} ({reason})") from None
    with handle:
        if handle.frames == 0:
            raise ManifestError(f"{where}: audio file {audio} holds no samples (0 frames); remove its line")
        if handle.samplerate != sample_rate:
            raise ManifestError(
                f"{where}: {audio} is sampled at {handle.samplerate} Hz but the teacher expects "
                f"{sample_rate} Hz (task.sample_rate); resample the data"
            )
        if handle.frames != listed:
            raise ManifestError(
                f"{where}: audio file {audio} holds {handle.frames} samples but the manifest lists {listed}; "
                f"{_REGENERATE}"
            )
        if read_content and handle.subtype not in INTEGER_SUBTYPES and _has_non_finite(handle):
            raise ManifestError(
                f"{where}: audio file {audio} holds non-finite samples (NaN or inf); fix or remove the file"
            )
