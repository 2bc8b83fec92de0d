"""Narrow fixes for stock fairseq paths the plugin's users take, where this fairseq build is broken."""

import functools
import logging
import os

from fairseq import checkpoint_utils
from fairseq.data import iterators
from fairseq.dataclass import utils as dataclass_utils
from fairseq.file_io import PathManager
from fairseq.models.hubert.hubert_asr import HubertCtc
from fairseq.optim.amp_optimizer import AMPOptimizer
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ValidationError

from .atomic_files import atomic_copy
from .checkpoint_recovery import checkpoint_damage, newest_intact_checkpoint, remove_stale_temporaries
from .errors import CheckpointError

logger = logging.getLogger("dphubert_fairseq")


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


class _AtomicCopyPathManager:
    """fairseq's PathManager, except that ``copy`` between local files is atomic."""

    def __getattr__(self, name):
        return getattr(PathManager, name)

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if "://" in src_path or "://" in dst_path or (not overwrite and os.path.exists(dst_path)):
            return PathManager.copy(src_path, dst_path, overwrite)
        atomic_copy(src_path, dst_path)
        return True


def _atomic_checkpoint_copies() -> None:
    # save_checkpoint writes checkpoint_E_N.pt atomically (a .tmp file renamed), then makes checkpoint_last.pt
    # and checkpoint_best.pt with a plain copy over the old file: a kill during that copy leaves a truncated
    # checkpoint_last.pt, and the next run refuses to resume. Make checkpoint_utils' copies atomic.
    if isinstance(checkpoint_utils.PathManager, _AtomicCopyPathManager):
        return
    checkpoint_utils.PathManager = _AtomicCopyPathManager()


def _resume_from_an_intact_checkpoint() -> None:
    # A checkpoint_last.pt damaged by a kill (fairseq's plain copy, a full disk, a copy by hand) would stop
    # every later resume although a whole checkpoint_E_N.pt lies beside it: resume from the newest whole one
    # and say so. Decided from the files alone, so that every worker of a multi-GPU run decides the same.
    original = checkpoint_utils.load_checkpoint
    if getattr(original, "__dphubert_fixed__", False):
        return

    @functools.wraps(original)
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
                restore = os.path.basename(other)[: -len(suffix + ".pt")] + ".pt"
                raise CheckpointError(
                    f"{err}; to resume from the newest other checkpoint, add checkpoint.restore_file={restore}"
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
        restore = os.path.join(cfg.save_dir, os.path.basename(other)[: -len(suffix + ".pt")] + ".pt")
        with open_dict(cfg):
            cfg.restore_file = restore
        try:
            return original(cfg, trainer, **passthrough_args)
        finally:
            with open_dict(cfg):
                cfg.restore_file = "checkpoint_last.pt"

    load_checkpoint.__dphubert_fixed__ = True
    checkpoint_utils.load_checkpoint = load_checkpoint


def _dummy_batch_from_a_non_empty_batch() -> None:
    # fairseq's trainer runs an empty batch ({}) as a "dummy" copy of the split's first batch, collated once per
    # iterator (EpochBatchIterator.first_batch). The plugin's collater returns {} for a batch whose items all
    # hold non-finite audio; when that is the first batch, the dummy itself is {} and the trainer fails with
    # "Invalid dummy batch: {}". Take the first batch that collates to something instead; "DUMMY" (fairseq's own
    # placeholder, replaced by the first real batch) if none does.
    original = iterators.EpochBatchIterator.first_batch.fget
    if getattr(original, "__dphubert_fixed__", False):
        return

    def first_batch(self):
        batch = original(self)
        if batch == "DUMMY" or len(batch) > 0:
            return batch
        for indices in self.frozen_batches[1:]:
            batch = self.collate_fn([self.dataset[i] for i in indices])
            if len(batch) > 0:
                return batch
        return "DUMMY"

    first_batch.__dphubert_fixed__ = True
    iterators.EpochBatchIterator.first_batch = property(first_batch)


def _config_errors_name_the_key() -> None:
    # fairseq-hydra-train merges the registered dataclass of each config section (model, task, criterion, ...)
    # with the command line in merge_with_parent; a value of the wrong type there (e.g. model.prune_units=conv,
    # a string for a list) ends in omegaconf's multi-line ValidationError about "AnyNode". Say which key, what
    # it got and how to spell it.
    original = dataclass_utils.merge_with_parent
    if getattr(original, "__dphubert_fixed__", False):
        return

    @functools.wraps(original)
    def merge_with_parent(dc, cfg, remove_missing=False):
        try:
            return original(dc, cfg, remove_missing)
        except ValidationError as err:
            section = cfg._key() if OmegaConf.is_config(cfg) else None
            key = ".".join(str(k) for k in (section, err.full_key) if k)
            field = getattr(dc, "__dataclass_fields__", {}).get(str(err.full_key).split(".")[0])
            value = cfg.get(err.full_key) if OmegaConf.is_config(cfg) and err.full_key in cfg else None
            if field is not None and "List" in str(field.type) and isinstance(value, (str, int, float)):
                raise ValueError(
                    f"{key}: got {value!r}, a single value, but it takes a list; write {key}=[{value}] "
                    f"(several: {key}=[a,b])"
                ) from None
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{key or dc.__name__}: {reason}") from None

    merge_with_parent.__dphubert_fixed__ = True
    dataclass_utils.merge_with_parent = merge_with_parent


def install() -> None:
    _hubert_ctc_autoregressive()
    _amp_optimizer_unscales_once()
    _atomic_checkpoint_copies()
    _resume_from_an_intact_checkpoint()
    _dummy_batch_from_a_non_empty_batch()
    _config_errors_name_the_key()
