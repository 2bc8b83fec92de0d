"""The ``dphubert_distill`` criterion: layer-to-layer distillation plus the L0 Lagrangian."""

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..latency import LatencyTable, load_table
from ..macs import METRICS, Metric, architecture_size
from ..models import gather_policy, inactive_units
from .distill_loss import PREDICTION_HEADS, DistillationProjections, layer_loss, parse_layer_groups
from .lagrangian import SparsityLagrangian, target_sparsity
from .target_projection import missed_target, project_to_target, shift_master_copies

TARGET_METRICS = ChoiceEnum([*METRICS, "latency"])
#: the logged values that validation averages over frames rather than batches, each also logged times its
#: batch's frames under its name + FRAMES_SUFFIX
FRAME_WEIGHTED = ("loss", "distill_loss")
FRAMES_SUFFIX = "_x_frames"
logger = logging.getLogger(__name__)
#: per size metric: the logged keys of its expected and its eval-mask sparsity
LOG_KEYS = {
    "params": ("expected_sparsity", "eval_sparsity"),
    "macs": ("expected_macs_sparsity", "eval_macs_sparsity"),
    "latency": ("expected_latency_sparsity", "eval_latency_sparsity"),
}
#: how a log line names the sparsity of each target_metric
SPARSITY_NAMES = {"params": "sparsity", "macs": "MACs sparsity", "latency": "latency sparsity"}


@dataclass
class DPHuBERTDistillCriterionConfig(FairseqDataclass):
    distill_layers: str = field(
        default="0;4,8,12",
        metadata={
            "help": "teacher layers to distil, ';' between groups that get their own projection, ',' inside a "
            "group (shared projection); layer 0 is the feature projection's output"
        },
    )
    l1_weight: float = field(default=1.0, metadata={"help": "weight of the mean L1 distance"})
    cos_weight: float = field(
        default=1.0, metadata={"help": "weight of the (negated) mean cosine similarity"}
    )
    mse_weight: float = field(default=0.0, metadata={"help": "weight of the mean squared error"})
    prediction_heads: bool = field(
        default=False,
        metadata={
            "help": "DistilHuBERT-style: one head per target layer, all on the student's last layer, instead "
            "of layer-to-layer projections"
        },
    )
    prediction_head: ChoiceEnum(PREDICTION_HEADS) = field(
        default="linear",
        metadata={
            "help": "with prediction_heads: what a head is; 'linear', a linear layer started at the identity; "
            "'distilhubert', DistilHuBERT's (linear, GELU, linear at torch's default initialisation), the "
            "baseline the paper compares against"
        },
    )
    lagrangian: bool = field(
        default=True,
        metadata={"help": "add the L0 Lagrangian (stage 1); false for plain distillation (stage 2)"},
    )
    target_sparsity: float = field(
        default=0.75,
        metadata={
            "help": "final target of 1 - expected size / the teacher's, the size counted in target_metric"
        },
    )
    target_metric: TARGET_METRICS = field(
        default="params",
        metadata={
            "help": "what target_sparsity counts: 'params' (the paper's: counted parameters), 'macs' "
            "(multiply-accumulates of one 10 s utterance, macs.NOMINAL_SECONDS: the cost of running the "
            "model, the CNN front end included) or 'latency' (the forward time latency_table predicts on the "
            "device it was measured on); the parameter and MACs sparsities are logged whichever it is (in "
            "training while the Lagrangian is on, at every validation), the latency sparsity too whenever "
            "latency_table is set"
        },
    )
    latency_table: Optional[str] = field(
        default=None,
        metadata={
            "help": "a cost table written by dphubert-profile for this teacher's shape (per-unit seconds of "
            "each block on one device, latency.py); needed by target_metric=latency"
        },
    )
    sparsity_warmup_updates: Optional[int] = field(
        default=None,
        metadata={
            "help": "updates over which the target ramps linearly from 0; unset: a tenth of "
            "optimization.max_update (the recipe's 5k of 50k)"
        },
    )
    target_projection_start: float = field(
        default=0.9,
        metadata={
            "help": "fraction of optimization.max_update after which every update ends by shifting all gate "
            "logits by one common offset so that the eval-mask size (what the export keeps) is the target "
            "(from the end of the sparsity ramp if that comes later); the run then lands on the target "
            "whatever its length, which must be set (optimization.max_update; without it there is no "
            "landing, and the criterion warns). 1.0: the Lagrangian alone, as the reference. See "
            "criterions/target_projection.py"
        },
    )
    skip_inactive_units: bool = field(
        default=True,
        metadata={
            "help": "stage 1 gets cheaper as the model shrinks: a unit whose probability of being non-zero stayed "
            "below inactive_threshold at inactive_checks consecutive checks is closed for good and left out of "
            "the forward and backward passes (models/inactive_units.py); false computes every unit to the end "
            "(the reference)"
        },
    )
    inactive_threshold: float = field(
        default=inactive_units.THRESHOLD,
        metadata={
            "help": "a unit counts as closed at a check when P(gate > 0) is below this; 0.02 sits above where "
            "closed gates float after the ramp (P about 0.01), so closed units are left out in a run of any "
            "length (1e-4 leaves none out: closed gates never sink that far)"
        },
    )
    inactive_checks: int = field(
        default=3,
        metadata={"help": "consecutive checks below inactive_threshold after which a unit is inactive"},
    )
    inactive_check_interval: int = field(
        default=100, metadata={"help": "updates between two checks for inactive units"}
    )
    inactive_compute: ChoiceEnum(gather_policy.MODES) = field(
        default="measure",
        metadata={
            "help": "how a block computes the units its gate is 0 for at an update (inactive units, and every "
            "unit whose hard-concrete sample is 0 then: the same result and gradients either way): 'gather' "
            "leaves them out (index-selects the other rows and columns), 'mask' computes every unit with those "
            "masked (the reference), 'measure' times both once per kind of block on this device, on the first "
            "training batch's shape, and gathers below the fraction of units computed where that pays; on a "
            "GPU, where a block timed alone does not predict an update, 'measure' masks "
            "(models/gather_policy.py)"
        },
    )
    max_update: Optional[int] = field(
        default=II("optimization.max_update"),
        metadata={
            "help": "the run's length, taken from optimization.max_update: the target's default ramp is a "
            "tenth of it, a ramp beyond it is refused, and the landing phase starts at "
            "target_projection_start of it"
        },
    )


@register_criterion("dphubert_distill", dataclass=DPHuBERTDistillCriterionConfig)
class DPHuBERTDistillCriterion(FairseqCriterion):
    """``loss = distill + lambda1 (s - t) + lambda2 (s - t)^2`` with ``s = 1 - E[params] / teacher params``.

    Holds the distillation projections (learning rate of the weights) and the Lagrange multipliers (their
    own group, gradient ascent). The loss is a mean: ``sample_size`` is 1.
    """

    def __init__(self, cfg: DPHuBERTDistillCriterionConfig, task) -> None:
        super().__init__(task)
        self.cfg = cfg
        if not 0.0 <= cfg.target_sparsity < 1.0:
            raise ConfigError(f"criterion.target_sparsity must be in [0, 1), got {cfg.target_sparsity}")
        groups = parse_layer_groups(cfg.distill_layers)
        _check_stage1_layers(task, cfg, groups)
        teacher_cfg = task.teacher_config
        for layer in (layer for group in groups for layer in group):
            if not 0 <= layer <= teacher_cfg.encoder_layers:
                raise ConfigError(
                    f"criterion.distill_layers: layer {layer} does not exist (the teacher has "
                    f"{teacher_cfg.encoder_layers} layers; 0 is the projection output)"
                )
        if cfg.lagrangian and cfg.target_sparsity > 0 and getattr(task, "student_prune_units", None) == []:
            raise ConfigError(
                f"criterion.lagrangian: model.prune_units=[] gives the student no gates, so nothing can be pruned "
                f"towards criterion.target_sparsity={cfg.target_sparsity}; give model.prune_units (e.g. "
                "[conv,head,interm]), or set criterion.lagrangian=false for plain distillation (stage 2)"
            )
        self.projections = DistillationProjections(
            groups, teacher_cfg.encoder_embed_dim, cfg.prediction_heads, str(cfg.prediction_head)
        )
        initial = getattr(task, "initial_projections", None)
        if initial:
            try:
                self.projections.load_state_dict(initial)
            except RuntimeError:
                raise ConfigError(
                    "criterion.distill_layers / prediction_heads / prediction_head differ from the stage-1 run "
                    "whose projections "
                    "task.student_path carries; use the same settings"
                ) from None
        total = _run_length(cfg)
        self.run_length = total
        self.sparsity_warmup = _sparsity_warmup(cfg, total)
        if not 0.0 <= cfg.target_projection_start <= 1.0:
            raise ConfigError(
                f"criterion.target_projection_start must be in [0, 1], got {cfg.target_projection_start}"
            )
        self.lagrangian = SparsityLagrangian() if cfg.lagrangian else None
        self.projection_from = (
            math.ceil(cfg.target_projection_start * total)
            if cfg.lagrangian and total and cfg.target_projection_start < 1.0
            else None
        )
        self.projection_offset: Optional[torch.Tensor] = None
        if cfg.lagrangian and cfg.target_projection_start < 1.0 and not total:
            logger.warning(
                "optimization.max_update is not set: criterion.target_projection_start=%g cannot place the "
                "landing on the target, so the run relies on the Lagrangian alone and its end is not checked "
                "against the target; set optimization.max_update",
                cfg.target_projection_start,
            )
        #: the sizes the run logs: "params", "macs", and "latency" (a LatencyTable) with criterion.latency_table
        self.size_metrics: Dict[str, Metric] = {metric: metric for metric in METRICS}
        if cfg.target_metric == "latency" or cfg.latency_table:
            table = load_table(cfg.latency_table)
            table.check_shape(teacher_cfg, f"criterion.latency_table={cfg.latency_table}")
            self.size_metrics["latency"] = table
        self.teacher_size = {name: _teacher_size(task, m) for name, m in self.size_metrics.items()}
        if cfg.target_metric == "latency" and cfg.lagrangian:
            _check_latency_target(cfg, self.size_metrics["latency"])
        self.teacher_params = self.teacher_size["params"]
        self.num_updates = 0
        _check_inactive_settings(cfg)
        self._active_log: Optional[tuple] = None  # (gate versions, logged values) of the last active-set log
        #: whether the model's blocks were told how to compute their zero units (``inactive_compute``)
        self._gathering_chosen = False

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def after_optimizer_step(self, model, update_num: int, optimizer=None) -> None:
        """Called by the task after each optimizer step (``optimizer``: fairseq's, whose master copy of the
        gates the landing shifts too): in the final phase, project the gates onto the target size
        (``target_projection``)."""
        landing = (
            self.projection_from is not None
            and update_num + 1 >= self.projection_from
            # still ramping: nothing to land on yet
            and target_sparsity(self.cfg.target_sparsity, self.sparsity_warmup, update_num)
            >= self.cfg.target_sparsity
        )
        if landing:
            metric = self.cfg.target_metric
            target_size = (1.0 - self.cfg.target_sparsity) * self.teacher_size[metric]
            self.projection_offset = project_to_target(unwrap(model), target_size, self.size_metrics[metric])
            if optimizer is not None:
                shift_master_copies(optimizer, unwrap(model))
        if not self._gathering_chosen:  # the first update of this process: every worker at once
            unwrap(model).choose_gathering(self.cfg.inactive_compute)
            self._gathering_chosen = True
        if self.cfg.skip_inactive_units and (update_num + 1) % self.cfg.inactive_check_interval == 0:
            inner = unwrap(model)
            closed = inner.update_active_sets(self.cfg.inactive_threshold, self.cfg.inactive_checks)
            inner.choose_gathering(self.cfg.inactive_compute)
            if closed:
                fractions = ", ".join(f"{k} {v:.3f}" for k, v in inner.active_fractions().items())
                logger.info(
                    "update %d: %d more units inactive (P(gate > 0) < %g at %d checks); active: %s",
                    update_num + 1,
                    closed,
                    self.cfg.inactive_threshold,
                    self.cfg.inactive_checks,
                    fractions,
                )
        if self.lagrangian is not None and self.run_length and update_num + 1 == self.run_length:
            self._report_landing(unwrap(model))

    def _report_landing(self, model) -> None:
        """At the last update of stage 1: the size the export will keep against the target, loudly if missed."""
        metric = self.cfg.target_metric
        reached = 1.0 - model.eval_mask_size(self.size_metrics[metric]) / self.teacher_size[metric]
        warning = missed_target(reached, self.cfg.target_sparsity, metric)
        if warning:
            logger.warning(warning)
        else:
            logger.info(
                "stage 1 ends at %s %.4f (criterion.target_sparsity=%.4f)",
                SPARSITY_NAMES[metric],
                reached,
                self.cfg.target_sparsity,
            )

    def current_target(self) -> float:
        return target_sparsity(self.cfg.target_sparsity, self.sparsity_warmup, self.num_updates)

    def forward(self, model, sample, reduce: bool = True):
        net_input = sample["net_input"]
        out = model(**net_input)
        student_states: List[torch.Tensor] = out["hidden_states"]
        teacher_states = self.task.teacher_hidden_states(
            net_input, dtype=student_states[0].dtype, num_layers=max(self.projections.targets)
        )
        padding = out["padding_mask"]
        valid = None if padding is None else ~padding
        predictions = self.projections(student_states)
        distill = sum(
            layer_loss(
                pred,
                teacher_states[layer],
                valid,
                self.cfg.l1_weight,
                self.cfg.cos_weight,
                self.cfg.mse_weight,
            )
            for pred, layer in zip(predictions, self.projections.targets)
        ) / len(predictions)
        # + 0 that depends on the encoder's output: a pre-LN student ends with a LayerNorm that distillation
        # does not read, and DDP without find_unused_parameters needs every parameter in the graph
        loss = distill + out["x"][..., :0].sum()
        # logged values stay tensors: an .item() here would make the host wait for the GPU before it can
        # queue the backward pass; fairseq's metrics convert them when it aggregates the logs
        # every value has the same kind (tensor or number) on every rank, whatever its batch: fairseq's
        # all_reduce_dict packs tensors and numbers into two buffers, which must have one length on all ranks
        batch, frames = student_states[0].shape[:2]
        log: Dict[str, object] = {
            "loss": loss.detach(),
            "distill_loss": distill.detach(),
            "ntokens": valid.sum()
            if valid is not None
            else torch.full((), batch * frames, dtype=torch.long, device=loss.device),
            "nsentences": batch,
            "sample_size": 1,
            "count": 1,
        }
        if self.lagrangian is not None:
            inner = unwrap(model)
            expected = {name: inner.expected_size(m) for name, m in self.size_metrics.items()}
            sparsity = {name: 1.0 - expected[name] / self.teacher_size[name] for name in self.size_metrics}
            target = self.current_target()
            loss = loss + self.lagrangian(sparsity[self.cfg.target_metric], target)
            log.update({LOG_KEYS[name][0]: value.detach() for name, value in sparsity.items()})
            log.update(
                loss=loss.detach(),
                target_sparsity=target,
                lambda1=self.lagrangian.lambda1.detach().clone(),  # a copy: the optimizer steps them in place
                lambda2=self.lagrangian.lambda2.detach().clone(),
                expected_params=expected["params"].detach(),
            )
            if self.projection_offset is not None:
                log["projection_offset"] = self.projection_offset.detach().clone()
            if model.training:  # what an export would keep now (validation logs it from the masks themselves)
                for name, metric in self.size_metrics.items():
                    kept = inner.eval_mask_size(metric, sync_free=True)
                    log[LOG_KEYS[name][1]] = 1.0 - kept / self.teacher_size[name]
        if model.training and unwrap(model).gate_set.gates:
            log.update(self._active_units_log(unwrap(model)))
        if not model.training:
            self._log_eval_masks(model, log)
            # validation's loss is the mean over every frame of the split, whatever its batching and number of
            # workers: each batch's mean weighted by its frames (not in training, where the weight would make
            # fairseq's meters wait for the device at every update)
            for key in FRAME_WEIGHTED:
                log[key + FRAMES_SUFFIX] = log[key] * log["ntokens"]
        return loss, 1, log

    def _active_units_log(self, model) -> Dict[str, float]:
        """The fractions of gated heads / FFN units / conv channels still active and the MACs the student
        computes now (``active_macs``, per ``macs.NOMINAL_SECONDS`` of audio, also as a fraction of the
        teacher's); recomputed only when an active set changed."""
        versions = tuple(g.version for g in model.gate_set.gates)
        if self._active_log is None or self._active_log[0] != versions:
            values = {f"active_{name}": value for name, value in model.active_fractions().items()}
            current = model.active_macs()
            values["active_gmacs"] = current / 1e9
            values["active_macs_ratio"] = current / self.teacher_size["macs"]
            self._active_log = (versions, values)
        return dict(self._active_log[1])

    def _log_eval_masks(self, model, log: Dict[str, float]) -> None:
        """At validation: the sparsity and sizes the eval masks imply (what an export would keep)."""
        inner = unwrap(model)
        params = inner.eval_mask_params()
        sizes = inner.unit_sizes("eval")
        log.update(
            {
                LOG_KEYS[name][1]: 1.0 - inner.eval_mask_size(metric) / self.teacher_size[name]
                for name, metric in self.size_metrics.items()
            }
        )
        log.update(
            eval_params=params,
            kept_conv_channels=sum(sizes.conv_channels),
            kept_heads=sum(h * k for h, k in zip(sizes.heads, sizes.attention_keep)),
            kept_ffn_units=sum(f * k for f, k in zip(sizes.ffn_dims, sizes.ffn_keep)),
        )

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        count = sum(log.get("count", 0) for log in logging_outputs) or 1
        keys = logging_outputs[0] if logging_outputs else []
        frames = sum(log.get("ntokens", 0) for log in logging_outputs)
        for key in keys:
            if key in ("count", "sample_size") or key.endswith(FRAMES_SUFFIX):
                continue
            if key + FRAMES_SUFFIX in keys:  # validation: weighted by frames across batches and workers
                weighted = sum(log.get(key + FRAMES_SUFFIX, 0) for log in logging_outputs)
                metrics.log_scalar(key, weighted / frames, frames, round=5)
                continue
            total = sum(log.get(key, 0) for log in logging_outputs)
            if key in ("ntokens", "nsentences"):
                metrics.log_scalar(key, total, round=0)
                continue
            value = total / count
            rounding = 0 if key in ("expected_params", "eval_params") or key.startswith("kept_") else 5
            rounding = 3 if key == "active_gmacs" else rounding
            metrics.log_scalar(key, value, count, round=rounding)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _check_inactive_settings(cfg: DPHuBERTDistillCriterionConfig) -> None:
    if not 0.0 < cfg.inactive_threshold < 1.0:
        raise ConfigError(f"criterion.inactive_threshold must be in (0, 1), got {cfg.inactive_threshold}")
    for key in ("inactive_checks", "inactive_check_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"criterion.{key} must be at least 1, got {getattr(cfg, key)}")


def _check_stage1_layers(task, cfg: DPHuBERTDistillCriterionConfig, groups: List[List[int]]) -> None:
    """Stage 2 carries the stage-1 projections over: its layers must be those of stage 1, or projections trained
    for one layer would map onto another wherever the shapes agree."""
    recorded = getattr(task, "initial_distill_layers", None)
    if recorded is not None and parse_layer_groups(recorded) != groups:
        raise ConfigError(
            f"criterion.distill_layers={cfg.distill_layers!r} differs from the stage-1 run's {recorded!r}, whose "
            "projections task.student_path carries; use the stage-1 value"
        )
    heads = getattr(task, "initial_prediction_heads", None)
    if heads is not None and bool(heads) != bool(cfg.prediction_heads):
        raise ConfigError(
            f"criterion.prediction_heads={cfg.prediction_heads} differs from the stage-1 run's {heads}, whose "
            "projections task.student_path carries; use the stage-1 value"
        )
    head = getattr(task, "initial_prediction_head", None)
    if heads is not None and (head or "linear") != str(cfg.prediction_head):
        raise ConfigError(
            f"criterion.prediction_head={cfg.prediction_head} differs from the stage-1 run's {head or 'linear'}, "
            "whose heads task.student_path carries; use the stage-1 value"
        )


def unwrap(model):
    """The ``dphubert`` model inside fairseq's distributed wrappers."""
    while not hasattr(model, "unit_sizes") and hasattr(model, "module"):
        model = model.module
    return model


def _run_length(cfg) -> Optional[int]:
    """``optimization.max_update`` as the criterion's config sees it; None where it cannot be resolved (a
    config built outside a full fairseq config) or is 0 (no limit)."""
    try:
        value = cfg.max_update
    except OmegaConfBaseException:  # an interpolation without the rest of the config
        return None
    if isinstance(value, str) or not value:
        return None
    return int(value)


def _sparsity_warmup(cfg, total: Optional[int]) -> int:
    """The target's ramp in updates: ``criterion.sparsity_warmup_updates``, or a tenth of the run."""
    ramp = cfg.sparsity_warmup_updates
    if not cfg.lagrangian:
        return ramp or 0
    if ramp is None:
        if not total:
            raise ConfigError(
                "criterion.sparsity_warmup_updates: unset, and optimization.max_update is not set either (a "
                "tenth of the run is the default); set one of them"
            )
        return total // 10
    if total and ramp > total:
        raise ConfigError(
            f"criterion.sparsity_warmup_updates={ramp} is beyond optimization.max_update={total}: the target "
            f"would never be reached; unset it for a tenth of the run ({total // 10}), as the recipe"
        )
    return ramp


def _check_latency_target(cfg: DPHuBERTDistillCriterionConfig, table: LatencyTable) -> None:
    """A latency sparsity is against the teacher checkpoint's measured time, and the student with every unit
    kept (``predicted_teacher``) may already run faster than that checkpoint's own model: such a student
    starts above 0, and a target below where it starts cannot be landed on. Refuse it."""
    start = 1.0 - table.predicted_teacher() / table.teacher_seconds()
    logger.info(
        "latency sparsity of the student with every unit kept: %.4f (%s predicts %.4f s against the teacher "
        "checkpoint's %.4f s)",
        start,
        cfg.latency_table,
        table.predicted_teacher(),
        table.teacher_seconds(),
    )
    if cfg.target_sparsity <= start:
        raise ConfigError(
            f"criterion.target_sparsity={cfg.target_sparsity} is met before any pruning: "
            f"criterion.latency_table={cfg.latency_table} predicts the student with every unit kept at latency "
            f"sparsity {start:.4f} ({table.predicted_teacher():.4f} s against the teacher's "
            f"{table.teacher_seconds():.4f} s); ask for more than {start:.4f}"
        )


def _teacher_size(task, metric: Metric) -> float:
    """The teacher's size in ``metric`` (``macs.size``), the denominator of every sparsity."""
    n = (
        metric.teacher_seconds()
        if isinstance(metric, LatencyTable)
        else architecture_size(task.teacher_config, metric)
    )
    if n <= 0:
        what = "predicted seconds (criterion.latency_table)" if isinstance(metric, LatencyTable) else metric
        raise ConfigError(f"the teacher has no {what} to count")
    return n
