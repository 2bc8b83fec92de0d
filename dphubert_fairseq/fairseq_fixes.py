"""Narrow fixes for stock fairseq paths the plugin's users take, where this fairseq build is broken."""

import functools

from fairseq.models.hubert.hubert_asr import HubertCtc
from omegaconf import OmegaConf, open_dict


def _hubert_ctc_autoregressive() -> None:
    # fairseq issue 4916: HubertEncoder reads cfg.autoregressive, which only HubertSeq2SeqConfig declares, so
    # stock hubert_ctc fails with "Key 'autoregressive' not in 'HubertCtcConfig'". CTC is not autoregressive:
    # give the config that key, False, just before the encoder is built.
    original = HubertCtc.build_model.__func__
    if getattr(original, "__dphubert_fixed__", False):
        return

    @functools.wraps(original)
    def build_model(cls, cfg, task):
        if OmegaConf.is_config(cfg) and "autoregressive" not in cfg:
            with open_dict(cfg):
                cfg.autoregressive = False
        elif not OmegaConf.is_config(cfg) and not hasattr(cfg, "autoregressive"):
            cfg.autoregressive = False
        return original(cls, cfg, task)

    build_model.__dphubert_fixed__ = True
    HubertCtc.build_model = classmethod(build_model)


def install() -> None:
    _hubert_ctc_autoregressive()
