"""What a fairseq checkpoint holds: a ``dphubert`` student, a native teacher the plugin supports, or neither.
Decided here once, from the model name the checkpoint's config records."""

from .errors import CheckpointError
from .safe_loading import read_checkpoint

#: The model name of the plugin's own checkpoints (training runs and exports).
STUDENT = "dphubert"
#: Model names of the native fairseq teachers the plugin copies.
SUPPORTED_TEACHERS = ("hubert", "wav2vec2")
SUPPORTED_TEXT = "supported teachers: hubert and wav2vec2 (Base and Large shapes, transformer layers)"


def checkpoint_model_name(state: dict) -> str:
    """The registered model name a loaded fairseq checkpoint was written for (``"?"`` when it records none)."""
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return str(cfg["model"].get("_name") or getattr(cfg["model"], "_name", "") or "?")
    args = state.get("args")
    return str(getattr(args, "arch", None) or "?")


def read_teacher_checkpoint(path: str) -> dict:
    """The loaded checkpoint ``path`` (see ``safe_loading.read_checkpoint``), which must hold a supported
    native teacher; ``CheckpointError`` naming the file otherwise."""
    state = read_checkpoint(path)
    name = checkpoint_model_name(state)
    if name == STUDENT:
        raise CheckpointError(
            f"{path}: holds a dphubert student, not a native fairseq teacher; load it with "
            f"dphubert_fairseq.load_model, and give a HuBERT / wav2vec2 checkpoint as the teacher"
        )
    if name not in SUPPORTED_TEACHERS:
        raise CheckpointError(f"{path}: model type {name!r} is not supported; {SUPPORTED_TEXT}")
    return state


def read_student_checkpoint(path: str, expected: str = "a dphubert one") -> dict:
    """The loaded checkpoint ``path``, which must hold a ``dphubert`` model; otherwise a ``CheckpointError``
    saying it holds another model, not ``expected``."""
    state = read_checkpoint(path)
    name = checkpoint_model_name(state)
    if name != STUDENT:
        raise CheckpointError(
            f"{path}: holds a {name!r} model, not {expected} (a native teacher loads with load_teacher)"
        )
    return state
