"""s3prl glue: the ``dphubert_local`` upstream entry, its registration in ``s3prl.hub``, and a launcher for
s3prl's SUPERB runner that reaches it without editing s3prl.

s3prl 0.4.18's runner takes its upstream from ``s3prl.hub`` only (``downstream/runner.py``,
``Runner._get_upstream``: ``getattr(hub, args.upstream)``), a fixed list of star imports of s3prl's own
``upstream/*/hubconf.py``; ``s3prl.nn.S3PRLUpstream`` looks names up the same way. Its other source,
``--hub huggingface``, downloads an ``expert.py`` from a Hugging Face Hub repository after a login call
(``HfApi().login``) that huggingface_hub no longer has. So ``register`` sets
``s3prl.hub.dphubert_local`` in this process, and ``main`` does that, then runs s3prl's own
``run_downstream.main`` with the same command line::

    python -m dphubert_fairseq.formats.s3prl_hub -m train -u dphubert_local -k CKPT -d asr -p EXPDIR

s3prl 0.4.18 predates torchaudio 2.9, which removed ``torchaudio.set_audio_backend`` (a no-op since the
backend dispatcher of torchaudio 2.1), ``torchaudio.sox_effects``, and made ``torchaudio.load`` decode through
torchcodec: ``register`` and ``main`` fill these in where they are missing (``patch_torchaudio``,
``load_with_soundfile``), and change nothing on an older torchaudio.
"""

import argparse
import importlib.util
import os
import sys
import types
from typing import Any, BinaryIO, List, Optional, Tuple, Union

import soundfile as sf
import torch
import torchaudio

from .s3prl_upstream import UpstreamExpert

#: The upstream's name in ``s3prl.hub`` (s3prl's ``-u``); ``_local``: it needs a local checkpoint (``-k``).
ENTRY = "dphubert_local"
INSTALL = "pip install 'dphubert-fairseq[superb]' (s3prl==0.4.18 and what its runner needs)"


def dphubert_local(ckpt: str, *args: Any, **kwargs: Any) -> UpstreamExpert:
    """s3prl hub entry: the upstream of the ``dphubert`` checkpoint ``ckpt`` (s3prl's ``-k``); s3prl's
    ``model_config`` (``-g``) and ``refresh`` (``-r``) are passed on (see ``UpstreamExpert``)."""
    return UpstreamExpert(ckpt, *args, **kwargs)


def _set_audio_backend(backend: Optional[str]) -> None:
    """torchaudio < 2.9's ``set_audio_backend`` with the backend dispatcher on: nothing to do."""


def _sox_effects_removed(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        f"torchaudio {torchaudio.__version__} has no sox effects (removed in 2.9); the s3prl feature that "
        "called them needs torchaudio < 2.9"
    )


def patch_torchaudio() -> None:
    """Let s3prl 0.4.18 import on torchaudio >= 2.9: add a no-op ``torchaudio.set_audio_backend`` and a
    ``torchaudio.sox_effects`` whose functions raise when called (s3prl imports them at module level, uses
    them only in upstreams / downstreams that need sox). Nothing is changed where they exist."""
    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = _set_audio_backend
    if (
        "torchaudio.sox_effects" not in sys.modules
        and importlib.util.find_spec("torchaudio.sox_effects") is None
    ):
        stub = types.ModuleType(
            "torchaudio.sox_effects", "stand-in for the sox effects torchaudio 2.9 removed"
        )
        for name in ("apply_effects_tensor", "apply_effects_file", "effect_names"):
            setattr(stub, name, _sox_effects_removed)
        sys.modules[stub.__name__] = stub
        torchaudio.sox_effects = stub


def load_with_soundfile(
    uri: Union[str, BinaryIO],
    frame_offset: int = 0,
    num_frames: int = -1,
    normalize: bool = True,
    channels_first: bool = True,
    **unused: Any,
) -> Tuple[torch.Tensor, int]:
    """``torchaudio.load`` through soundfile: ``(waveform, sample_rate)``, the waveform float32 in [-1, 1],
    ``(C, L)`` (``(L, C)`` with ``channels_first=False``). ``normalize=False`` is read as True (float32)."""
    data, rate = sf.read(uri, start=frame_offset, frames=num_frames, dtype="float32", always_2d=True)
    wav = torch.from_numpy(data)
    return (wav.t() if channels_first else wav).contiguous(), rate


def _torchcodec_works() -> bool:
    try:
        import torchcodec  # noqa: F401  (loads FFmpeg's libraries: fails where none is installed)
    except Exception:
        return False
    return True


def use_soundfile_without_torchcodec() -> bool:
    """Where ``torchaudio.load`` needs torchcodec (torchaudio >= 2.9) and torchcodec cannot be used, route it
    through soundfile (s3prl's SUPERB datasets are WAV / FLAC). Returns whether it did."""
    if not hasattr(torchaudio, "load_with_torchcodec") or _torchcodec_works():
        return False
    torchaudio.load = load_with_soundfile
    return True


def register() -> types.ModuleType:
    """Add ``dphubert_local`` to ``s3prl.hub`` (after ``patch_torchaudio``); returns ``s3prl.hub``.
    ``ImportError`` naming the install command when s3prl cannot be imported."""
    patch_torchaudio()
    try:
        import s3prl.hub as hub
    except ImportError as e:
        raise ImportError(
            f"dphubert_fairseq/formats/s3prl_hub.py: cannot import s3prl.hub ({e}); {INSTALL}"
        ) from e
    setattr(hub, ENTRY, dphubert_local)
    return hub


def missing_task_config(argv: List[str]) -> Optional[str]:
    """The one-line error for a new experiment (no ``-e`` / ``-a``) whose config s3prl would look for in
    ``./downstream/<task>/config.yaml`` (no ``-c``) when that file is not there; None otherwise."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag, name in (("-d", "--downstream"), ("-c", "--config"), ("-e", "--past_exp")):
        parser.add_argument(flag, name)
    parser.add_argument("-a", "--auto_resume", action="store_true")
    args, _ = parser.parse_known_args(argv)
    if args.downstream is None or args.config or args.past_exp or args.auto_resume:
        return None
    path = os.path.join(".", "downstream", args.downstream, "config.yaml")
    if os.path.isfile(path):
        return None
    return (
        f"{path}: not found in {os.getcwd()}; run from the s3prl/ folder of an s3prl 0.4.18 checkout "
        "(pip's s3prl ships no task configs) or pass -c CONFIG"
    )


def main(argv: Optional[List[str]] = None) -> None:
    """s3prl's ``run_downstream.py`` with ``-u dphubert_local`` available; ``argv``: its arguments (default:
    this process's). Run it where s3prl's ``downstream/<task>/config.yaml`` files are (the ``s3prl/`` folder
    of an s3prl 0.4.18 checkout: the wheel ships none) or give ``-c``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    problem = missing_task_config(argv)
    if problem:
        sys.exit(problem)
    register()
    use_soundfile_without_torchcodec()
    try:
        from s3prl import run_downstream
    except ImportError as e:
        raise ImportError(
            f"dphubert_fairseq/formats/s3prl_hub.py: cannot import s3prl's runner ({e}); {INSTALL}"
        ) from e
    sys.argv = [run_downstream.__file__] + argv  # s3prl's runner parses sys.argv
    run_downstream.main()


if __name__ == "__main__":
    main()
