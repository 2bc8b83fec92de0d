"""Writing and reading ``dphubert`` models as plain fairseq checkpoints."""

from typing import Any, Dict, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.dataclass.configs import FairseqConfig
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
from omegaconf import OmegaConf

from .atomic_files import atomic_write
from .checkpoint_kind import read_student_checkpoint
from .models.dphubert import DPHuBERTModel, as_config


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_config(model: DPHuBERTModel) -> Dict[str, Any]:
    """A full fairseq config (as the trainer saves it) for ``model``, with a stock ``audio_pretraining`` task
    block so that loading or fine-tuning never needs the distillation task, a teacher or a data folder."""
    model_cfg = as_config(model.cfg)
    model_cfg._name = "dphubert"
    cfg = OmegaConf.structured(FairseqConfig())
    cfg.model = OmegaConf.structured(model_cfg)
    cfg.task = OmegaConf.structured(
        AudioPretrainingConfig(data="", sample_rate=model_cfg.sample_rate, normalize=model_cfg.normalize)
    )
    cfg.task._name = "audio_pretraining"
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def save_model(model: DPHuBERTModel, path: str, extra_state: Optional[Dict[str, Any]] = None) -> str:
    """Write ``model`` as a fairseq checkpoint that stock ``load_model_ensemble_and_task`` loads once the
    plugin is imported. Returns the path."""
    if not isinstance(model, DPHuBERTModel):
        raise TypeError(f"save_model expects a dphubert model, got {type(model).__name__}")
    state = {
        "args": None,
        "cfg": checkpoint_config(model),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "criterion": None,
        "optimizer_history": [
            {"criterion_name": "none", "optimizer_name": "none", "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "task_state": {},
        "extra_state": dict(extra_state or {}),
        "last_optimizer_state": None,
    }
    atomic_torch_save(state, str(path))
    return str(path)


def load_model_and_extra_state(path: str) -> Tuple[DPHuBERTModel, Dict[str, Any]]:
    """``load_model`` plus the checkpoint's ``extra_state`` (the export keeps distillation projections there)."""
    path = str(path)
    state = read_student_checkpoint(path)
    extra_state = dict(state.get("extra_state") or {})
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    return models[0].eval(), extra_state


def load_model(path: str) -> DPHuBERTModel:
    """A ``dphubert`` model from a checkpoint written by ``save_model`` (or by training), in eval mode."""
    return load_model_and_extra_state(path)[0]
