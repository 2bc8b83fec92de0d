"""Patch: fairseq's AMP optimizer unscales the gradients once, and works with the composite optimizer.

Target: ``AMPOptimizer.optimizer`` (``common.amp``, the recipe's precision). fairseq hands two different objects
to torch's GradScaler: ``clip_grad_norm`` unscales ``self.optimizer``, the inner torch optimizer, and
``step()`` steps ``self.fp32_optimizer``, the fairseq wrapper. GradScaler tracks optimizers by identity, so
``step()`` finds the wrapper not yet unscaled and divides the same gradients by the loss scale a second time
(Adam's eps then swamps every small gradient). With the composite optimizer (per-group learning rates) the
inner object is torch-level glue with no param_groups or state_dict, and the first zero_grad fails. Both go
away when ``optimizer`` is the fairseq optimizer itself, as FairseqOptimizer's own methods expect.
Guard: ``AMPOptimizer.optimizer`` (called on a stand-in) returns something other than ``fp32_optimizer``.
"""

from types import SimpleNamespace

from fairseq.optim.amp_optimizer import AMPOptimizer

from .patch import WRITTEN_FOR, Patch, mark, marked


def needed() -> bool:
    fp32_optimizer = SimpleNamespace(optimizer=object())
    return AMPOptimizer.optimizer.fget(SimpleNamespace(fp32_optimizer=fp32_optimizer)) is not fp32_optimizer


def applied() -> bool:
    return marked(AMPOptimizer.optimizer)


def apply() -> None:
    def get(self):
        return self.fp32_optimizer

    def set(self, optimizer):
        self.fp32_optimizer.optimizer = optimizer

    AMPOptimizer.optimizer = property(
        mark(get), set, doc="the fairseq optimizer that AMP unscales, steps and saves"
    )


PATCH = Patch(
    "amp_optimizer", "fairseq.optim.amp_optimizer.AMPOptimizer.optimizer", WRITTEN_FOR, needed, applied, apply
)
