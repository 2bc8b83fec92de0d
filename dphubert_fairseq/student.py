"""A gated ``dphubert`` student made as an exact copy of a fairseq teacher."""

import re
from typing import Dict, Iterable, Union

import torch
import torch.nn as nn

from .models.dphubert import DPHuBERTModel
from .param_count import config_params
from .teacher import config_from_fairseq, load_teacher_and_config

# teacher (fairseq) state-dict name -> student name; names matching no rule and absent from the student are
# the teacher's pretraining-only parts (final_proj, label_embs_concat, mask_emb, quantizer, ...)
_RENAMES = [
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.conv.\2",
    ),
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.norm.\2",
    ),
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.norm.\2",
    ),
    (re.compile(r"^encoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.ffn.\2.\3"),
    (re.compile(r"^mask_emb$"), "masking.mask_emb"),
]


def student_state_from_teacher(teacher_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a fairseq HuBERT / wav2vec2 state dict to the dphubert layout."""
    out = {}
    for name, value in teacher_state.items():
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                name = pattern.sub(replacement, name)
                break
        out[name] = value
    return out


def load_weights(student: DPHuBERTModel, source: nn.Module) -> DPHuBERTModel:
    """Copy every weight of ``student`` but its gate logits from ``source``: a fairseq HuBERT / wav2vec2
    teacher of the same architecture, or another ``dphubert`` model of the same sizes."""
    own = student.state_dict()
    state = {k: v for k, v in student_state_from_teacher(source.state_dict()).items() if k in own}
    missing = [k for k in own if k not in state and not k.endswith("log_alpha")]
    if missing:
        raise RuntimeError(f"no weights for student parameters {missing[:5]}")
    nn.Module.load_state_dict(student, state, strict=False)
    return student


def student_from_teacher(
    teacher: Union[str, nn.Module], prune_units: Iterable[str] = ("conv", "head", "interm")
) -> DPHuBERTModel:
    """A ``dphubert`` model that computes exactly what ``teacher`` (a checkpoint path or a loaded fairseq
    HubertModel / Wav2Vec2Model) computes, with hard-concrete gates on ``prune_units``."""
    if isinstance(teacher, nn.Module):
        cfg = config_from_fairseq(teacher)
    else:
        teacher, cfg = load_teacher_and_config(teacher)
    cfg.prune_units = list(prune_units)  # checked by the model (validate_config)
    cfg.teacher_params = config_params(cfg)
    reference = next(teacher.parameters())
    student = DPHuBERTModel(cfg).to(device=reference.device, dtype=reference.dtype)
    return load_weights(student, teacher).train(teacher.training)
