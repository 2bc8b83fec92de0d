"""Every import-time patch the plugin makes to fairseq, one module each, written for ve-fairseq 0.12.3 (a build
of fairseq's main branch). ``install()`` (run by ``import dphubert_fairseq``) applies each patch whose guard says
the fairseq in use still needs it, and reports which are in place.

=================================  ===============================================  ==========================
patch                              replaces                                         applied when (guard)
=================================  ===============================================  ==========================
weights_only_allow_list            torch's safe globals, for fairseq's torch.load   torch >= 2.6 and fairseq's
                                                                                    reader passes no
                                                                                    ``weights_only``
checkpoint_layout_check            checkpoint_utils._upgrade_state_dict             upgrading ``{}`` fails with
                                                                                    a bare KeyError/IndexError
checkpoint_read_errors             checkpoint_utils.load_checkpoint_to_cpu          a missing file is not a
                                                                                    ValueError naming it
hubert_ctc_autoregressive          HubertCtc.build_model                            HubertCtcConfig lacks
                                                                                    ``autoregressive``
amp_optimizer                      AMPOptimizer's clip_grad_norm, step,             clip and step hand the
                                   param_groups, zero_grad, state_dict,             scaler two objects, a step
                                   load_state_dict                                  hides whether it was taken,
                                                                                    or no loss scale is saved
atomic_checkpoint_copies           checkpoint_utils.PathManager                     save_checkpoint copies with
                                                                                    PathManager.copy
resume_past_damaged_checkpoint     checkpoint_utils.load_checkpoint                 it resolves checkpoint_last
                                                                                    with no damage check
dummy_batch                        EpochBatchIterator.first_batch                   it returns an empty first
                                                                                    batch as the dummy
config_type_errors                 fairseq.dataclass.utils.merge_with_parent        it lets omegaconf's
                                                                                    ValidationError through
cpu_grad_norm                      fairseq.utils.clip_grad_norm_                    it puts the norm on the
                                                                                    GPU whenever CUDA is
                                                                                    available
=================================  ===============================================  ==========================

Each module's docstring says what fairseq does wrong, what the patch does instead, and its guard.
"""

from typing import Dict, List

from . import (
    amp_optimizer,
    atomic_checkpoint_copies,
    checkpoint_layout_check,
    checkpoint_read_errors,
    config_type_errors,
    cpu_grad_norm,
    dummy_batch,
    hubert_ctc_autoregressive,
    resume_past_damaged_checkpoint,
    weights_only_allow_list,
)
from .patch import WRITTEN_FOR, Patch

#: In the order they are applied: the reader's own checks wrap the upgrade check, and the resume patch wraps
#: a reader that already names files.
PATCHES: List[Patch] = [
    weights_only_allow_list.PATCH,
    checkpoint_layout_check.PATCH,
    checkpoint_read_errors.PATCH,
    hubert_ctc_autoregressive.PATCH,
    amp_optimizer.PATCH,
    atomic_checkpoint_copies.PATCH,
    resume_past_damaged_checkpoint.PATCH,
    dummy_batch.PATCH,
    config_type_errors.PATCH,
    cpu_grad_norm.PATCH,
]


def install() -> Dict[str, bool]:
    """Apply every patch this fairseq needs (idempotent); returns, per patch name, whether it is in place."""
    for patch in PATCHES:
        if not patch.applied() and patch.needed():
            patch.apply()
    return status()


def status() -> Dict[str, bool]:
    """Per patch name, whether the patch is in place."""
    return {patch.name: patch.applied() for patch in PATCHES}


__all__ = ["PATCHES", "WRITTEN_FOR", "Patch", "install", "status"]
