"""The ``dphubert_distill`` task: audio-only manifests, a frozen native fairseq teacher, the student built
from it (stage 1) or from an exported stage-1 model (stage 2)."""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask
from omegaconf import II, MISSING, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..checkpoint_io import load_model_and_extra_state
from ..conv_spec import receptive_field
from ..data.finite_audio import FiniteAudioDataset
from ..data.length_filter import drop_long_utterances
from ..data.manifest_check import check_manifest_on_workers
from ..errors import CheckpointError, ConfigError
from ..macs import architecture_size
from ..models.dphubert import DPHuBERTConfig, DPHuBERTModel, as_config
from ..param_count import config_params
from ..safe_loading import check_checkpoint_file
from ..student import load_weights
from ..teacher import load_teacher_and_config, teacher_hidden_states, teacher_identity
from ..unit_importance import init_gates_from_importance

logger = logging.getLogger(__name__)

# model-config keys the student takes from its teacher (or from the stage-1 model); the others (dropouts,
# feature_grad_mult, prune_units) are the student's own training settings
_ARCHITECTURE_KEYS = [
    "extractor_mode",
    "conv_feature_layers",
    "conv_bias",
    "encoder_layers",
    "encoder_embed_dim",
    "attention_head_dim",
    "encoder_attention_heads",
    "encoder_ffn_embed_dims",
    "use_attention",
    "use_ffn",
    "layer_norm_first",
    "activation_fn",
    "conv_pos",
    "conv_pos_groups",
    "conv_pos_batch_norm",
    "conv_pos_depth",
    "relative_position_buckets",
    "relative_position_max_distance",
    "relative_position_heads",
    "gru_rel_pos",
    "post_extract_proj",
    "frame_padding",
    "crop_seq_to_multiple",
    "normalize",
    "sample_rate",
    "feature_norm_removed_channels",
    "feature_norm_channel_scale",
    "teacher_params",
    "teacher_macs",
    "teacher_identity",
]
_TRAINING_KEYS = [
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "dropout_input",
    "feature_grad_mult",
    # never from the teacher or the stage-1 export (the reference format records 0.05): the reference distils
    # without layerdrop, and a skipped layer's parameters leave the graph, which c10d DDP refuses
    "encoder_layerdrop",
    "gate_init_importance",
    "conv_gate_init_drop_rate",
]
LONG_UTTERANCES = ChoiceEnum(["drop", "crop"])


def autocast_enabled(device: torch.device) -> bool:
    """Whether the current code runs inside ``torch.autocast`` for ``device``'s type (fairseq's ``common.amp``
    wraps each training step in CUDA autocast)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4 takes no device type and answers for CUDA
        return device.type == "cuda" and torch.is_autocast_enabled()


@dataclass
class DPHuBERTDistillConfig(AudioPretrainingConfig):
    teacher_path: str = field(
        default=MISSING,
        metadata={
            "help": "checkpoint of the frozen teacher: native fairseq HuBERT / wav2vec2 / data2vec audio, or WavLM "
            "as released"
        },
    )
    student_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "stage 2: the exported stage-1 model (dphubert-export output) to distil further without "
            "pruning; unset for stage 1, where the student is a gated copy of the teacher"
        },
    )
    long_utterances: LONG_UTTERANCES = field(
        default="drop",
        metadata={
            "help": "utterances longer than task.max_sample_size: 'drop' leaves them out (the reference recipe; "
            "the log says how many and how much audio), 'crop' keeps them and trains on a random "
            "max_sample_size window of each (fairseq's audio_pretraining behaviour)"
        },
    )
    check_audio_files: bool = field(
        default=True,
        metadata={
            "help": "before training, open every manifest entry's header: the file exists and is readable, "
            "its sample rate is task.sample_rate, its frame count is not zero and equals the manifest's "
            "sample count; false only checks that the files exist"
        },
    )
    check_audio_content: bool = field(
        default=False,
        metadata={
            "help": "before training, also read every manifest entry completely and refuse a file holding a "
            "NaN or inf sample, naming its manifest line (implies check_audio_files). Costs one full read of "
            "every file stored as floating-point samples (float WAV, MP3, Ogg: disk-bound, 230 MB per hour "
            "of 16 kHz float32 audio); files of integer samples (PCM WAV, FLAC) cannot hold NaN/inf and are "
            "not read. Without it, batches are still checked as they are built: such items are left out of "
            "training and validation, and their files logged as warnings"
        },
    )
    find_unused_parameters: bool = field(
        default=II("distributed_training.find_unused_parameters"),
        metadata={
            "help": "taken from distributed_training.find_unused_parameters: model.encoder_layerdrop > 0 skips "
            "whole layers, whose parameters then get no gradient, which DDP allows only with it"
        },
    )


@register_task("dphubert_distill", dataclass=DPHuBERTDistillConfig)
class DPHuBERTDistillTask(AudioPretrainingTask):
    """Distillation data and teacher. The teacher is held here: outside the model, the criterion, the
    optimizer, DDP and checkpoints; it runs in eval mode under no_grad, in the student's precision."""

    cfg: DPHuBERTDistillConfig

    def __init__(self, cfg: DPHuBERTDistillConfig) -> None:
        super().__init__(cfg)
        self._teacher: Optional[nn.Module] = None
        self._teacher_config: Optional[DPHuBERTConfig] = None
        #: distillation projections carried over from the stage-1 export (stage 2), for the criterion
        self.initial_projections: Optional[Dict[str, torch.Tensor]] = None
        #: the stage-1 run's criterion.distill_layers / prediction_heads / prediction_head as its export
        #: recorded them (stage 2; an export made before prediction_head existed records None: linear)
        self.initial_distill_layers: Optional[str] = None
        self.initial_prediction_heads: Optional[bool] = None
        self.initial_prediction_head: Optional[str] = None
        #: model.prune_units of the student built here, for the criterion's checks
        self.student_prune_units: Optional[List[str]] = None
        self._teacher_identity: Optional[str] = None
        self._criterion: Optional[nn.Module] = None

    @classmethod
    def setup_task(cls, cfg: DPHuBERTDistillConfig, **kwargs) -> "DPHuBERTDistillTask":
        if kwargs.get("from_checkpoint"):
            return cls(cfg)  # loading a trained student: no teacher needed
        if not cfg.teacher_path or cfg.teacher_path == MISSING:
            raise ConfigError("task.teacher_path: not set; give the teacher's fairseq checkpoint")
        try:
            check_checkpoint_file(cfg.teacher_path)
            if cfg.student_path:
                check_checkpoint_file(cfg.student_path)
        except CheckpointError as err:
            is_student = bool(cfg.student_path) and str(err).startswith(cfg.student_path)
            raise CheckpointError(f"task.{'student_path' if is_student else 'teacher_path'}: {err}") from None
        task = cls(cfg)
        task._load_teacher()  # fail on a bad teacher before any data or model is built
        return task

    # ----- teacher -----

    def _load_teacher(self) -> None:
        teacher, config = load_teacher_and_config(self.cfg.teacher_path)
        for p in teacher.parameters():
            p.requires_grad_(False)
        if bool(self.cfg.normalize) != config.normalize:
            raise ConfigError(
                f"task.normalize={self.cfg.normalize} but the teacher {self.cfg.teacher_path} was trained with "
                f"normalize={config.normalize}; set task.normalize={str(config.normalize).lower()}"
            )
        if int(self.cfg.sample_rate) != config.sample_rate:
            raise ConfigError(
                f"task.sample_rate={self.cfg.sample_rate} but the teacher {self.cfg.teacher_path} expects "
                f"{config.sample_rate} Hz; set task.sample_rate={config.sample_rate} and resample the data"
            )
        self._teacher, self._teacher_config = teacher, config
        logger.info("teacher %s: %d counted parameters", self.cfg.teacher_path, config_params(config))

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._load_teacher()
        return self._teacher

    @property
    def teacher_identity(self) -> str:
        """The teacher's model class and weights digest (``teacher.teacher_identity``), computed once."""
        if self._teacher_identity is None:
            self._teacher_identity = teacher_identity(self.teacher)
        return self._teacher_identity

    @property
    def teacher_config(self) -> DPHuBERTConfig:
        if self._teacher_config is None:
            self._load_teacher()
        return self._teacher_config

    # no_grad rather than inference_mode: the teacher's states are loss targets, and inference tensors cannot
    # be saved for the backward pass (L1 saves its target); cloning them would cost more than it saves
    @torch.no_grad()
    def teacher_hidden_states(
        self, net_input: Dict[str, torch.Tensor], dtype: torch.dtype, num_layers: Optional[int] = None
    ) -> List[torch.Tensor]:
        """The teacher's ``[h_0, ..., h_num_layers]`` (default: all layers) for a batch, on the batch's device.

        Under automatic mixed precision (``common.amp``: the step runs inside autocast) the teacher keeps float32
        weights, autocast runs its matmuls in half precision, and the states come back as float32, as in the
        reference. Otherwise the teacher runs in ``dtype``, the student's (fp16 / bf16 under ``common.fp16`` /
        ``common.bf16``, whose trainer casts the student's weights), and so do the states."""
        source = net_input["source"]
        amp = autocast_enabled(source.device)
        if amp:
            dtype = torch.float32
        teacher = self.teacher
        reference = next(teacher.parameters())
        if reference.device != source.device or reference.dtype != dtype:
            teacher.to(device=source.device, dtype=dtype)
        teacher.eval()
        states = teacher_hidden_states(teacher, source.to(dtype), net_input.get("padding_mask"), num_layers)
        return [h.float() for h in states] if amp else states

    # ----- data -----

    def load_dataset(self, split: str, task_cfg=None, **kwargs) -> None:
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        count = check_manifest_on_workers(
            manifest,
            int(self.cfg.sample_rate),
            read_headers=self.cfg.check_audio_files,
            read_content=self.cfg.check_audio_content,
        )
        logger.info("%s: %d utterances checked", manifest, count)
        super().load_dataset(split, task_cfg, **kwargs)
        if self.cfg.long_utterances == "drop" and self.cfg.max_sample_size:
            left_out = drop_long_utterances(self.datasets[split], int(self.cfg.max_sample_size))
            logger.info(
                "%s: left out %d utterances longer than task.max_sample_size=%d samples (%.1f s of audio); "
                "%d remain",
                manifest,
                left_out.count,
                self.cfg.max_sample_size,
                left_out.seconds(int(self.cfg.sample_rate)),
                len(self.datasets[split]),
            )
            if len(self.datasets[split]) == 0:
                raise ConfigError(
                    f"{manifest}: no utterance is between task.min_sample_size={self.cfg.min_sample_size} and "
                    f"task.max_sample_size={self.cfg.max_sample_size} samples; change them, or set "
                    "task.long_utterances=crop"
                )
        self._check_lengths(manifest, self.datasets[split])
        # after the length filter, which edits the FileAudioDataset itself
        self.datasets[split] = FiniteAudioDataset(self.datasets[split], manifest)

    def _check_lengths(self, manifest: str, dataset) -> None:
        """Refuse, before training, a split that ``task.min_sample_size`` left empty (fairseq would stop later
        with an error naming neither) or that keeps an utterance shorter than the teacher's CNN makes one
        frame of (a batch is cropped to its shortest utterance, and the teacher would then fail mid-run)."""
        sizes = dataset.sizes
        if len(sizes) == 0:
            raise ConfigError(
                f"{manifest}: no utterance is at least task.min_sample_size={self.cfg.min_sample_size} samples "
                "long; lower it"
            )
        shortest = receptive_field(self.teacher_config.conv_feature_layers)
        if int(sizes.min()) < shortest:
            raise ConfigError(
                f"{manifest}: {int((sizes < shortest).sum())} utterance(s) shorter than {shortest} samples, the "
                f"teacher's CNN's receptive field (the shortest {int(sizes.min())}), are kept by "
                f"task.min_sample_size={self.cfg.min_sample_size}; set it to at least {shortest}"
            )

    # ----- model -----

    def build_model(self, cfg, from_checkpoint: bool = False) -> DPHuBERTModel:
        """Stage 1: a gated copy of the teacher; stage 2: the exported stage-1 model. The architecture is
        written back into ``cfg`` so that the checkpoints fairseq saves describe the student exactly."""
        if from_checkpoint:
            return DPHuBERTModel(as_config(cfg))
        if cfg._name != "dphubert":
            raise ConfigError(
                f"model._name: the dphubert_distill task trains a 'dphubert' model, not {cfg._name!r}"
            )
        if self.cfg.student_path:
            if list(cfg.prune_units):
                raise ConfigError(
                    "model.prune_units: stage 2 (task.student_path set) distils without pruning; set it to []"
                )
            source, extra_state = load_model_and_extra_state(self.cfg.student_path)
            if source.gates():
                raise CheckpointError(
                    f"task.student_path: {self.cfg.student_path} still has gates; export it first (dphubert-export)"
                )
            self.initial_projections = extra_state.get("distill_projections")
            self.initial_distill_layers = extra_state.get("distill_layers")
            self.initial_prediction_heads = extra_state.get("prediction_heads")
            self.initial_prediction_head = extra_state.get("prediction_head")
            student_cfg = as_config(source.cfg)
            self._check_same_teacher(student_cfg.teacher_identity)
            if student_cfg.encoder_embed_dim != self.teacher_config.encoder_embed_dim:
                raise ConfigError(
                    f"task.student_path: the student's dimension {student_cfg.encoder_embed_dim} differs from "
                    f"the teacher's {self.teacher_config.encoder_embed_dim}"
                )
        else:
            source = self.teacher
            student_cfg = as_config(self.teacher_config)
        student_cfg.teacher_params = student_cfg.teacher_params or config_params(self.teacher_config)
        student_cfg.teacher_macs = student_cfg.teacher_macs or architecture_size(self.teacher_config, "macs")
        student_cfg.teacher_identity = student_cfg.teacher_identity or self.teacher_identity
        self.student_prune_units = list(cfg.prune_units)
        for key in _TRAINING_KEYS:
            setattr(student_cfg, key, getattr(cfg, key))
        student_cfg.prune_units = list(cfg.prune_units)
        self._check_layerdrop(student_cfg.encoder_layerdrop)
        model = load_weights(DPHuBERTModel(student_cfg), source)
        if student_cfg.gate_init_importance > 0:
            init_gates_from_importance(model, student_cfg.gate_init_importance)
        with open_dict(cfg):
            for key in _ARCHITECTURE_KEYS:
                value = getattr(student_cfg, key)
                cfg[key] = list(value) if isinstance(value, list) else value
        return model

    def _check_layerdrop(self, layerdrop: float) -> None:
        """Layerdrop leaves skipped layers' parameters without a gradient: refused unless DDP looks for them."""
        if layerdrop <= 0:
            return
        try:
            allowed = bool(self.cfg.find_unused_parameters)
        except OmegaConfBaseException:  # a task config built outside a full fairseq config
            allowed = False
        if not allowed:
            raise ConfigError(
                f"model.encoder_layerdrop={layerdrop} skips whole layers, whose parameters then get no gradient, "
                "which multi-GPU training (ddp_backend c10d) refuses unless "
                "distributed_training.find_unused_parameters=true; set model.encoder_layerdrop=0 (the reference "
                "distils without layerdrop) or distributed_training.find_unused_parameters=true"
            )

    def _check_same_teacher(self, recorded: str) -> None:
        """Stage 2 distils from the teacher of stage 1, whose identity the stage-1 export recorded."""
        if not recorded:
            logger.warning(
                "task.student_path: %s records no teacher identity (exported by an older version); cannot check "
                "that task.teacher_path is the stage-1 teacher",
                self.cfg.student_path,
            )
            return
        if recorded != self.teacher_identity:
            raise ConfigError(
                f"task.teacher_path: {self.cfg.teacher_path} is not the teacher stage 1 distilled from: the "
                f"stage-1 model {self.cfg.student_path} records {recorded}, this teacher is "
                f"{self.teacher_identity}; give stage 2 the stage-1 teacher"
            )

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        self._criterion = criterion  # for optimizer_step, which fairseq calls without it
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def optimizer_step(self, optimizer, model, update_num) -> None:
        super().optimizer_step(optimizer, model, update_num)
        # under AMP the loss scaler skips the step when the gradients overflowed, and fairseq retries the batch
        # with the same update_num: what runs once per update (the landing, the inactive-unit checks, the
        # end-of-run report) runs once per step taken (fairseq_patches/amp_optimizer.py says which)
        if getattr(optimizer, "last_step_taken", True) and hasattr(self._criterion, "after_optimizer_step"):
            self._criterion.after_optimizer_step(model, update_num, optimizer)
