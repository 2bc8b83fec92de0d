"""A gated ``dphubert`` student made as an exact copy of a teacher (fairseq HuBERT / wav2vec2, WavLM)."""

from typing import Iterable, Union

import torch.nn as nn

from .macs import architecture_size
from .models.dphubert import DPHuBERTModel
from .param_count import config_params
from .teacher import config_from_fairseq, dphubert_state, load_teacher_and_config


def load_weights(student: DPHuBERTModel, source: nn.Module) -> DPHuBERTModel:
    """Copy every weight of ``student`` but its gate state (logits, active sets) from ``source``: a fairseq
    HuBERT / wav2vec2 teacher of the same architecture, or another ``dphubert`` model of the same sizes (a
    WavLM teacher)."""
    own = student.state_dict()
    state = {k: v for k, v in dphubert_state(source.state_dict()).items() if k in own}
    gate_state = {f"{name}.{key}" for name, gate in student.gates().items() for key in gate.state_dict()}
    missing = [k for k in own if k not in state and k not in gate_state]
    if missing:
        raise RuntimeError(f"no weights for student parameters {missing[:5]}")
    nn.Module.load_state_dict(student, state, strict=False)
    return student


def student_from_teacher(
    teacher: Union[str, nn.Module], prune_units: Iterable[str] = ("conv", "head", "interm")
) -> DPHuBERTModel:
    """A ``dphubert`` model that computes exactly what ``teacher`` (a checkpoint path, a loaded fairseq
    HubertModel / Wav2Vec2Model, or a loaded WavLM teacher, see ``teacher.load_teacher``) computes, with hard-concrete gates on ``prune_units``."""
    if isinstance(teacher, nn.Module):
        cfg = config_from_fairseq(teacher)
    else:
        teacher, cfg = load_teacher_and_config(teacher)
    cfg.prune_units = list(prune_units)  # checked by the model (validate_config)
    cfg.teacher_params = config_params(cfg)
    cfg.teacher_macs = architecture_size(cfg, "macs")
    reference = next(teacher.parameters())
    student = DPHuBERTModel(cfg).to(device=reference.device, dtype=reference.dtype)
    return load_weights(student, teacher).train(teacher.training)
