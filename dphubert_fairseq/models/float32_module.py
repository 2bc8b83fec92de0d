"""Modules whose parameters stay float32 whatever the model is cast to."""

import torch
import torch.nn as nn

_REDUCED = (torch.float16, torch.bfloat16)


class Float32Module(nn.Module):
    """An ``nn.Module`` whose own parameters survive ``.half()`` / ``.to(torch.bfloat16)`` as float32.

    Gate logits and Lagrange multipliers need it: in fp16 the hard-concrete noise rounds to 0 or 1 and small
    updates of the logits vanish. fairseq's trainer casts the whole model and criterion for fp16 / bf16
    training; its FP16 optimizer keeps float32 master copies per parameter and copies them back, which works
    for mixed dtypes.
    """

    def _apply(self, fn, recurse=True):
        originals = {name: p.data for name, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, p in self.named_parameters(recurse=False):
            if p.dtype in _REDUCED:
                p.data = originals[name].to(device=p.device, dtype=torch.float32)
        return self
