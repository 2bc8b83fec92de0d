"""Patch: stock ``hubert_ctc`` fine-tuning builds.

Target: ``HubertCtc.build_model``. ``HubertEncoder`` reads ``cfg.autoregressive``, which only
``HubertSeq2SeqConfig`` declares, so stock hubert_ctc fails with "Key 'autoregressive' not in
'HubertCtcConfig'". CTC is not autoregressive: the config gets that key, False, just before the encoder is
built.
Guard: ``HubertCtcConfig`` has no ``autoregressive`` field.
"""

import dataclasses
import functools

from fairseq.models.hubert.hubert_asr import HubertCtc, HubertCtcConfig
from omegaconf import OmegaConf, open_dict

from .patch import WRITTEN_FOR, Patch, mark, marked


def needed() -> bool:
    return "autoregressive" not in {f.name for f in dataclasses.fields(HubertCtcConfig)}


def applied() -> bool:
    return marked(HubertCtc.build_model.__func__)


def apply() -> None:
    original = HubertCtc.build_model.__func__

    @functools.wraps(original)
    def build_model(cls, cfg, task):
        if OmegaConf.is_config(cfg) and "autoregressive" not in cfg:
            with open_dict(cfg):
                cfg.autoregressive = False
        elif not OmegaConf.is_config(cfg) and not hasattr(cfg, "autoregressive"):
            cfg.autoregressive = False
        return original(cls, cfg, task)

    HubertCtc.build_model = classmethod(mark(build_model))


PATCH = Patch(
    "hubert_ctc_autoregressive",
    "fairseq.models.hubert.hubert_asr.HubertCtc.build_model",
    WRITTEN_FOR,
    needed,
    applied,
    apply,
)
