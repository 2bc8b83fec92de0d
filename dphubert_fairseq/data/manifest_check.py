"""Checks of a fairseq audio manifest (``{split}.tsv``) before any training starts."""

import os

import soundfile as sf


class ManifestError(ValueError):
    """A manifest or an audio file it lists cannot be used; the message names the file and the line."""


def check_manifest(path: str, sample_rate: int, read_headers: bool = True) -> int:
    """Validate ``path``: its root folder, every listed file (exists; with ``read_headers`` also a readable
    audio file at ``sample_rate``). Returns the number of utterances. Raises ``ManifestError``."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no such manifest (expected task.data/<split>.tsv)")
    with open(path) as f:
        root = f.readline().strip()
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise ManifestError(f"{path}: the manifest lists no audio files")
    if not os.path.isdir(root):
        raise ManifestError(f"{path}:1: root folder {root!r} does not exist")
    for number, line in enumerate(lines, start=2):
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            raise ManifestError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        audio = os.path.join(root, fields[0])
        if not os.path.isfile(audio):
            raise ManifestError(f"{path}:{number}: audio file {audio} does not exist")
        if read_headers:
            try:
                info = sf.info(audio)
            except Exception as err:  # soundfile raises its own error types for unreadable files
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ManifestError(f"{path}:{number}: cannot read audio file {audio} ({reason})") from None
            if info.samplerate != sample_rate:
                raise ManifestError(
                    f"{path}:{number}: {audio} is sampled at {info.samplerate} Hz but the teacher expects "
                    f"{sample_rate} Hz (task.sample_rate); resample the data"
                )
    return len(lines)
