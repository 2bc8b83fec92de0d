"""Patch: a resume never stops on a damaged ``checkpoint_last.pt`` while a whole checkpoint lies beside it.

Target: ``checkpoint_utils.load_checkpoint`` with the default ``checkpoint.restore_file=checkpoint_last.pt``.
A ``checkpoint_last.pt`` damaged by a kill (fairseq's plain copy, a full disk, a copy by hand) would stop every
later resume: resume from the newest whole ``checkpoint*.pt`` instead and say so; remove the temporary files of
interrupted saves first. Decided from the files alone (``checkpoint_recovery``), so that every worker of a
multi-GPU run decides the same.
Guard: fairseq's ``load_checkpoint`` resolves the default ``checkpoint_last.pt`` itself and never inspects the
file before loading it (its source names ``checkpoint_last`` and no damage check; fairseq main has none).
"""

import inspect
import logging
import os

from fairseq import checkpoint_utils
from omegaconf import open_dict

from ..checkpoint_recovery import checkpoint_damage, newest_intact_checkpoint, remove_stale_temporaries
from ..errors import CheckpointError
from .patch import function_patch

logger = logging.getLogger("dphubert_fairseq")


def needed() -> bool:
    source = inspect.getsource(inspect.unwrap(checkpoint_utils.load_checkpoint))
    return "checkpoint_last" in source and "zipfile" not in source and "damage" not in source


def _restore_name(checkpoint: str, suffix: str) -> str:
    """``checkpoint_3_400-shard0.pt`` -> ``checkpoint_3_400.pt``: the name restore_file takes (fairseq adds the
    suffix)."""
    return os.path.basename(checkpoint)[: -len(suffix + ".pt")] + ".pt"


def _resume_past_damage(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        if cfg.restore_file != "checkpoint_last.pt":
            return original(cfg, trainer, **passthrough_args)
        if getattr(trainer, "should_save_checkpoint_on_current_rank", True) and os.path.isdir(cfg.save_dir):
            removed = remove_stale_temporaries(cfg.save_dir)
            if removed:
                logger.info("%s: removed temporary files of interrupted saves: %s", cfg.save_dir, removed)
        suffix = trainer.checkpoint_suffix or ""
        last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
        problem = checkpoint_damage(last) if os.path.isfile(last) else None
        if problem is None:
            try:
                return original(cfg, trainer, **passthrough_args)
            except CheckpointError as err:
                other = newest_intact_checkpoint(cfg.save_dir, last, suffix)
                if other is None:
                    raise
                raise CheckpointError(
                    f"{err}; to resume from the newest other checkpoint, add "
                    f"checkpoint.restore_file={_restore_name(other, suffix)}"
                ) from None
        other = newest_intact_checkpoint(cfg.save_dir, last, suffix)
        if other is None:
            raise CheckpointError(
                f"{last}: cannot resume from it: {problem}, and {cfg.save_dir} holds no other whole checkpoint; "
                "remove it to start the run over"
            )
        logger.warning(
            "%s: %s (a kill while it was written?); resuming from the newest whole checkpoint, %s",
            last,
            problem,
            other,
        )
        with open_dict(cfg):
            cfg.restore_file = os.path.join(cfg.save_dir, _restore_name(other, suffix))
        try:
            return original(cfg, trainer, **passthrough_args)
        finally:
            with open_dict(cfg):
                cfg.restore_file = "checkpoint_last.pt"

    return load_checkpoint


PATCH = function_patch(
    "resume_past_damaged_checkpoint", checkpoint_utils, "load_checkpoint", needed, _resume_past_damage
)
