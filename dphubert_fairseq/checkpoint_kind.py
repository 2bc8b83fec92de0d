"""What a checkpoint holds: a ``dphubert`` student, a teacher the plugin supports (a native fairseq HuBERT /
wav2vec2, or a WavLM checkpoint as WavLM's authors release it), or neither. Decided here once, from the
model name the checkpoint's config records (WavLM's: from its layout)."""

from .errors import CheckpointError
from .safe_loading import read_checkpoint, read_torch_file

#: The model name of the plugin's own checkpoints (training runs and exports).
STUDENT = "dphubert"
#: Model names of the native fairseq teachers the plugin copies.
#: fairseq's data2vec audio model (registered by its example, ``teacher.import_data2vec``)
DATA2VEC_AUDIO = "data2vec_audio"
SUPPORTED_TEACHERS = ("hubert", "wav2vec2", DATA2VEC_AUDIO)
#: The name given to WavLM checkpoints: ``{"cfg": WavLM's config as a flat dict, "model": state dict}``.
WAVLM = "wavlm"
SUPPORTED_TEXT = (
    "supported teachers: fairseq hubert, wav2vec2 and data2vec_audio, and WavLM checkpoints as released "
    "(Base and Large shapes, transformer layers)"
)


def is_wavlm_checkpoint(state: object) -> bool:
    """Whether a loaded torch file has WavLM's release layout: a flat config dict (no fairseq ``model``
    section) with WavLM's relative position keys, and a state dict."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        return False
    cfg = state.get("cfg")
    return (
        isinstance(cfg, dict)
        and "model" not in cfg
        and any(k in cfg for k in ("relative_position_embedding", "gru_rel_pos", "num_buckets"))
    )


def checkpoint_model_name(state: dict) -> str:
    """The registered model name a loaded fairseq checkpoint was written for (``"?"`` when it records none)."""
    cfg = state.get("cfg")
    if isinstance(cfg, dict) and cfg.get("_name") == WAVLM:
        return WAVLM
    if cfg is not None and cfg.get("model") is not None:
        return str(cfg["model"].get("_name") or getattr(cfg["model"], "_name", "") or "?")
    args = state.get("args")
    return str(getattr(args, "arch", None) or "?")


def read_teacher_checkpoint(path: str) -> dict:
    """The loaded checkpoint ``path``, which must hold a supported teacher: a WavLM checkpoint as read
    weights-only, a fairseq one as ``safe_loading.read_checkpoint`` reads it; ``CheckpointError`` naming the
    file otherwise (``checkpoint_model_name`` says what it holds; ``WAVLM`` for WavLM's layout)."""
    raw = read_torch_file(path, mmap=True)  # tensors mapped, not read: only WavLM's are used from here
    if is_wavlm_checkpoint(raw):
        raw["cfg"] = dict(raw["cfg"], _name=WAVLM)
        return raw
    del raw  # a fairseq checkpoint: read through fairseq (upgrades, config conversion)
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


def _holds_wavlm(path: str) -> bool:
    """Whether ``path`` is a readable WavLM checkpoint (tensors mapped, not read)."""
    try:
        return is_wavlm_checkpoint(read_torch_file(path, mmap=True))
    except CheckpointError:
        return False


def read_student_checkpoint(path: str, expected: str = "a dphubert one") -> dict:
    """The loaded checkpoint ``path``, which must hold a ``dphubert`` model; otherwise a ``CheckpointError``
    saying it holds another model, not ``expected``."""
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:
        failed = err
    else:
        failed = None
    if failed is not None:
        # WavLM's own checkpoints are no fairseq checkpoints: say what the file is, not what it lacks
        if _holds_wavlm(path):
            raise CheckpointError(f"{path}: holds a WavLM teacher (WavLM's own format), not {expected}")
        raise failed
    name = checkpoint_model_name(state)
    if name != STUDENT:
        raise CheckpointError(
            f"{path}: holds a {name!r} model, not {expected} (a native teacher loads with load_teacher)"
        )
    return state
