"""Narrow fixes for stock fairseq paths the plugin's users take, where this fairseq build is broken."""

import functools

from fairseq.models.hubert.hubert_asr import HubertCtc
from fairseq.optim.amp_optimizer import AMPOptimizer
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


def _amp_optimizer_unscales_once() -> None:
    # fairseq's AMPOptimizer (common.amp, the recipe's precision) hands two different objects to torch's
    # GradScaler: clip_grad_norm unscales `self.optimizer`, the inner torch optimizer, and step() steps
    # `self.fp32_optimizer`, the fairseq wrapper. GradScaler tracks optimizers by identity, so step() finds the
    # wrapper not yet unscaled and divides the same gradients by the loss scale a second time (Adam's eps then
    # swamps every small gradient). With the composite optimizer (per-group learning rates) the inner object
    # is torch-level glue with no param_groups or state_dict, and the first zero_grad fails. Both go away when
    # `optimizer` is the fairseq optimizer itself, as FairseqOptimizer's own methods expect.
    if getattr(AMPOptimizer.optimizer.fget, "__dphubert_fixed__", False):
        return

    def get(self):
        return self.fp32_optimizer

    def set(self, optimizer):
        self.fp32_optimizer.optimizer = optimizer

    get.__dphubert_fixed__ = True
    AMPOptimizer.optimizer = property(
        get, set, doc="the fairseq optimizer that AMP unscales, steps and saves"
    )


def install() -> None:
    _hubert_ctc_autoregressive()
    _amp_optimizer_unscales_once()
