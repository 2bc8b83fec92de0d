"""The ``dphubert`` fairseq model: a HuBERT / wav2vec2 encoder with per-layer sizes and hard-concrete gates.

One class serves the gated student during training and the pruned model after export: the export only changes
the config (smaller sizes, no gates) and the weights.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.wav2vec2 import MASKING_DISTRIBUTION_CHOICES
from fairseq.modules import GradMultiply
from omegaconf import OmegaConf

from .. import macs
from ..conv_spec import parse_conv_layers
from ..errors import ConfigError
from ..param_count import UnitSizes, config_params, static_sizes
from . import gather_policy
from .encoder import PrunableTransformerEncoder
from .feature_norm import FeatureLayerNorm
from .hard_concrete import INIT_DROP_RATE, GateSet, HardConcrete
from .inactive_units import update_active_sets
from .prunable_conv import ConvFeatureExtractor
from .time_masking import TimeChannelMasking

PRUNABLE_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")
EXTRACTOR_MODES = ChoiceEnum(["default", "layer_norm"])
FRAME_PADDING_STYLES = ChoiceEnum(["hubert", "wav2vec2"])


def _per_layer(value: int, help: str, layers: int = 12):
    """A per-layer list field; the default is the HuBERT Base shape."""
    return field(default_factory=lambda: [value] * layers, metadata={"help": help})


@dataclass
class DPHuBERTConfig(FairseqDataclass):
    # --- CNN feature extractor ---
    extractor_mode: EXTRACTOR_MODES = field(
        default="default",
        metadata={
            "help": "'default': one GroupNorm in the first conv block (HuBERT / wav2vec2 Base); "
            "'layer_norm': a LayerNorm over channels in every conv block (Large models)"
        },
    )
    conv_feature_layers: str = field(
        default="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        metadata={
            "help": "conv layers as fairseq writes them, a Python list of (channels, kernel, stride); "
            "the channels of each layer are its own size after pruning"
        },
    )
    conv_bias: bool = field(default=False, metadata={"help": "conv layers have a bias"})
    # --- transformer ---
    encoder_layers: int = field(default=12, metadata={"help": "number of transformer layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer dimension D"})
    attention_head_dim: int = field(default=64, metadata={"help": "dimension of one attention head"})
    encoder_attention_heads: List[int] = _per_layer(
        12, "attention heads of each layer (0 keeps only the out_proj bias)"
    )
    encoder_ffn_embed_dims: List[int] = _per_layer(
        3072, "FFN intermediate size of each layer (0 keeps only the fc2 bias)"
    )
    use_attention: List[int] = _per_layer(1, "per layer, 1 if the attention block is present, 0 if removed")
    use_ffn: List[int] = _per_layer(1, "per layer, 1 if the FFN block is present, 0 if removed")
    layer_norm_first: bool = field(
        default=False, metadata={"help": "pre-LayerNorm layers (Large models) instead of post-LayerNorm"}
    )
    activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="gelu", metadata={"help": "activation of the FFN blocks"}
    )
    conv_pos: int = field(
        default=128,
        metadata={
            "help": "kernel size of the positional convolution (of each of its layers, with depth > 1)"
        },
    )
    conv_pos_depth: int = field(
        default=1,
        metadata={
            "help": "layers of the positional convolution: 1 (HuBERT, wav2vec2, WavLM) or data2vec's stack of "
            "convs with a LayerNorm and GELU each (data2vec audio: 5)"
        },
    )
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of the positional convolution"})
    conv_pos_batch_norm: bool = field(
        default=False, metadata={"help": "positional convolution with BatchNorm instead of weight norm"}
    )
    relative_position_buckets: int = field(
        default=0,
        metadata={
            "help": "WavLM: buckets of the relative position bias table (320 in WavLM); 0: no relative "
            "position bias (HuBERT, wav2vec2)"
        },
    )
    relative_position_max_distance: int = field(
        default=800,
        metadata={"help": "WavLM: distance (frames) from which all distances share the last bucket"},
    )
    relative_position_heads: int = field(
        default=0,
        metadata={
            "help": "WavLM: the teacher's heads per layer, the bias table's columns; each attention reads the "
            "columns of the heads it kept (its head_index buffer)"
        },
    )
    gru_rel_pos: bool = field(
        default=True,
        metadata={
            "help": "WavLM: each attention scales the bias per head and frame by a gate that reads its input "
            "(WavLM's gru_rel_pos)"
        },
    )
    post_extract_proj: bool = field(
        default=True,
        metadata={"help": "a Linear maps the CNN channels to D (fairseq adds it when they differ)"},
    )
    # --- regularisation ---
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout after the feature projection"})
    feature_grad_mult: float = field(
        default=1.0,
        metadata={
            "help": "gradient multiplier of the CNN; 0 freezes it (its parameters do not require gradients, "
            "and 'conv' cannot be in prune_units)"
        },
    )
    # --- input conventions, copied from the teacher ---
    frame_padding: FRAME_PADDING_STYLES = field(
        default="hubert",
        metadata={
            "help": "how the frame padding mask is derived from the sample one: 'hubert' "
            "(HubertModel.forward_padding_mask) or 'wav2vec2' (conv output lengths)"
        },
    )
    crop_seq_to_multiple: int = field(
        default=1, metadata={"help": "crop the frames to a multiple of this (wav2vec2's option)"}
    )
    normalize: bool = field(
        default=False, metadata={"help": "the model expects zero-mean unit-variance waveforms"}
    )
    sample_rate: int = field(default=16000, metadata={"help": "sample rate the model expects"})
    teacher_params: int = field(
        default=0,
        metadata={"help": "set when the student is made: counted parameters of its teacher (for reports)"},
    )
    teacher_macs: int = field(
        default=0,
        metadata={
            "help": "set when the student is made: its teacher's MACs on one macs.NOMINAL_SECONDS utterance "
            "(for reports)"
        },
    )
    teacher_identity: str = field(
        default="",
        metadata={
            "help": "set when the student is made: its teacher's model class and a SHA-256 of its weights "
            "(teacher.teacher_identity); stage 2 refuses a different teacher"
        },
    )
    # --- fine-tuning only (stock wav2vec_ctc / hubert_ctc set these; distillation keeps them off) ---
    mask_prob: float = field(
        default=0.0, metadata={"help": "probability of starting a masked span of frames"}
    )
    mask_length: int = field(default=10, metadata={"help": "length of a masked span of frames"})
    mask_selection: MASKING_DISTRIBUTION_CHOICES = field(
        default="static", metadata={"help": "how span lengths are drawn (fairseq's compute_mask_indices)"}
    )
    mask_other: float = field(default=0.0, metadata={"help": "secondary span-length argument"})
    no_mask_overlap: bool = field(default=False, metadata={"help": "masked spans may not overlap"})
    mask_min_space: int = field(
        default=1, metadata={"help": "frames between spans when they may not overlap"}
    )
    mask_channel_prob: float = field(
        default=0.0, metadata={"help": "probability of starting a masked span of channels"}
    )
    mask_channel_length: int = field(default=10, metadata={"help": "length of a masked span of channels"})
    mask_channel_selection: MASKING_DISTRIBUTION_CHOICES = field(
        default="static", metadata={"help": "how channel span lengths are drawn"}
    )
    mask_channel_other: float = field(
        default=0.0, metadata={"help": "secondary channel span-length argument"}
    )
    no_mask_channel_overlap: bool = field(default=False, metadata={"help": "channel spans may not overlap"})
    mask_channel_min_space: int = field(
        default=1, metadata={"help": "channels between non-overlapping spans"}
    )
    encoder_layerdrop: float = field(
        default=0.0,
        metadata={
            "help": "probability of skipping a layer in training (fine-tuning); distillation takes it from this "
            "config only, never from the teacher or task.student_path, and refuses it above 0 unless "
            "distributed_training.find_unused_parameters=true"
        },
    )
    # --- pruning ---
    prune_units: List[str] = field(
        default_factory=list,
        metadata={"help": "structures that get hard-concrete gates: any of " + ", ".join(PRUNABLE_UNITS)},
    )
    gate_init_importance: float = field(
        default=0.0,
        metadata={
            "help": "stage 1: spread of the initial gate logits by the teacher's unit importance, in logit "
            "units. Each head's, FFN unit's and conv channel's logit is the reference's initial value plus this "
            "times its standardised log weight norm within its layer (unit_importance.py), so that heavier "
            "units start more open; 0 (default): the reference's constant initialisation"
        },
    )
    conv_gate_init_drop_rate: float = field(
        default=INIT_DROP_RATE["conv"],
        metadata={
            "help": "stage 1: initial drop rate of the CNN's channel gates, in (0, 1): their logits start at "
            "log((1 - m) / m). Default: the reference's 0.01 (4.6 logit units from the boundary, where a "
            "short run never closes a channel); configs/compute/macs.yaml sets 0.5 (on it) and latency.yaml "
            "0.2 (1.4 units), so that a compute target can take its MACs from the CNN (docs/compute.md)"
        },
    )
    feature_norm_removed_channels: int = field(
        default=0,
        metadata={
            "help": "set by export: CNN output channels removed, kept as zeros in the feature LayerNorm"
        },
    )
    feature_norm_channel_scale: bool = field(
        default=False,
        metadata={"help": "set by export: the feature LayerNorm scales its input by the last gate's values"},
    )


def pad_waveforms(wavs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[(L_i,)]`` -> the ``(B, L)`` batch right-padded with zeros and its ``(B, L)`` sample padding mask
    (True = padding), ``L = max L_i``, on the waveforms' device: the model's ``(source, padding_mask)``."""
    lengths = torch.tensor([wav.numel() for wav in wavs], device=wavs[0].device)
    source = nn.utils.rnn.pad_sequence(list(wavs), batch_first=True)
    padding_mask = torch.arange(source.size(1), device=source.device).unsqueeze(0) >= lengths.unsqueeze(1)
    return source, padding_mask


def hubert_frame_padding(padding_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """HuBERT's rule (``HubertModel.forward_padding_mask``): a frame is padding when all samples of its equal
    share of the input are. ``(B, L) -> (B, T)``."""
    # the samples past the last whole share are left out; sliced unconditionally, not "if any", so that a
    # traced graph (ONNX export) is right for every length
    kept = padding_mask[:, : num_frames * (padding_mask.size(1) // num_frames)]
    return kept.reshape(padding_mask.size(0), num_frames, -1).all(-1)


def wav2vec2_frame_padding(
    padding_mask: torch.Tensor, num_frames: int, output_lengths: Callable[[torch.Tensor], torch.Tensor]
) -> Optional[torch.Tensor]:
    """wav2vec2's rule (``Wav2Vec2Model.forward``): frames past the conv output length of the unpadded input
    are padding; None when nothing is padded (the same hidden states as an all-False mask, which is what a
    graph traced on a padded batch computes then). ``(B, L) -> (B, T)``."""
    if not padding_mask.any():
        return None
    lengths = output_lengths((~padding_mask).long().sum(-1))
    frames = torch.arange(num_frames, device=padding_mask.device)
    return frames.unsqueeze(0) >= lengths.unsqueeze(1)


def as_config(cfg) -> DPHuBERTConfig:
    """A fresh ``DPHuBERTConfig`` from a dataclass or an OmegaConf node (what fairseq passes to build_model)."""
    if isinstance(cfg, DPHuBERTConfig):
        return copy.deepcopy(cfg)
    values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    names = {f.name for f in dataclasses.fields(DPHuBERTConfig)}
    return DPHuBERTConfig(**{k: v for k, v in values.items() if k in names})


def validate_prune_units(units) -> None:
    """Raise ``ConfigError`` when ``units`` names a structure the model cannot gate."""
    unknown = set(units) - set(PRUNABLE_UNITS)
    if unknown:
        raise ConfigError(
            f"model.prune_units: unknown unit(s) {sorted(unknown)}; choose from {', '.join(PRUNABLE_UNITS)}"
        )


def validate_config(cfg) -> None:
    """Raise ``ConfigError`` naming the key when the per-layer lists do not describe one architecture or
    ``prune_units`` names an unknown structure."""
    for key in ("encoder_attention_heads", "encoder_ffn_embed_dims", "use_attention", "use_ffn"):
        if len(getattr(cfg, key)) != cfg.encoder_layers:
            raise ConfigError(
                f"model.{key} has {len(getattr(cfg, key))} entries but model.encoder_layers is "
                f"{cfg.encoder_layers}"
            )
    validate_prune_units(cfg.prune_units)
    if not cfg.post_extract_proj:
        channels = parse_conv_layers(cfg.conv_feature_layers)[-1][0]
        if channels != cfg.encoder_embed_dim:
            raise ConfigError(
                f"model.post_extract_proj is false, so the CNN's last layer feeds the encoder directly, but it has "
                f"{channels} channels and model.encoder_embed_dim is {cfg.encoder_embed_dim}"
            )
    if not cfg.gate_init_importance >= 0:
        raise ConfigError(f"model.gate_init_importance must be >= 0, got {cfg.gate_init_importance}")
    if not 0 < cfg.conv_gate_init_drop_rate < 1:
        raise ConfigError(
            f"model.conv_gate_init_drop_rate must be in (0, 1), got {cfg.conv_gate_init_drop_rate}"
        )
    if cfg.feature_grad_mult == 0 and "conv" in cfg.prune_units:
        raise ConfigError(
            "model.prune_units: 'conv' prunes the CNN, but model.feature_grad_mult=0 freezes it (its channel "
            "gates could never learn); leave 'conv' out of model.prune_units or set model.feature_grad_mult > 0"
        )
    if cfg.relative_position_buckets > 0:
        heads = cfg.relative_position_heads
        if heads < 1 or cfg.encoder_embed_dim % heads:
            raise ConfigError(
                f"model.relative_position_heads is {heads}; it must be the teacher's head count, which divides "
                f"model.encoder_embed_dim ({cfg.encoder_embed_dim})"
            )
        wider = [h for h in cfg.encoder_attention_heads if h > heads]
        if wider:
            raise ConfigError(
                f"model.encoder_attention_heads has {wider[0]} heads in a layer, more than the "
                f"{heads} of model.relative_position_heads"
            )


class ExtractedFeatures(tuple):
    """``(x, padding_mask)``, as ``HubertModel.extract_features`` returns it (stock ``hubert_ctc`` unpacks it),
    that also answers ``["x"]``, ``["padding_mask"]`` and ``["layer_results"]`` like the dict of
    ``Wav2Vec2Model.extract_features`` (stock ``wav2vec_ctc`` indexes it)."""

    def __new__(
        cls, x: torch.Tensor, padding_mask: Optional[torch.Tensor], layer_results: List[torch.Tensor]
    ):
        obj = super().__new__(cls, (x, padding_mask))
        obj.layer_results = layer_results
        return obj

    def __getitem__(self, key):
        if isinstance(key, str):
            if key == "layer_results":
                return self.layer_results
            try:
                return tuple.__getitem__(self, ("x", "padding_mask").index(key))
            except ValueError:
                raise KeyError(key) from None
        return tuple.__getitem__(self, key)


def _autocast_state(device: torch.device) -> Optional[Tuple[str, torch.dtype]]:
    """(device type, dtype) of the autocast in effect on ``device``, or None."""
    kind = device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return kind, torch.get_autocast_dtype(kind)
    return None


@register_model("dphubert", dataclass=DPHuBERTConfig)
class DPHuBERTModel(BaseFairseqModel):
    """``source (B, L)`` waveform and ``padding_mask (B, L)`` (True = padding) -> hidden states ``(B, T, D)``."""

    def __init__(self, cfg: DPHuBERTConfig) -> None:
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        units = frozenset(cfg.prune_units)
        conv_layers = parse_conv_layers(cfg.conv_feature_layers)
        gated = ["conv" in units] * len(conv_layers)
        if not cfg.post_extract_proj:
            gated[-1] = False  # the CNN's last channels are the encoder's dimension: nothing to prune into
        self.feature_extractor = ConvFeatureExtractor(
            conv_layers, cfg.extractor_mode, cfg.conv_bias, gated, cfg.conv_gate_init_drop_rate
        )
        if cfg.feature_grad_mult == 0:
            # frozen, not merely run without gradient: a parameter that gets no gradient at an update is one that
            # DDP without find_unused_parameters refuses, and the optimizer need not hold it
            self.feature_extractor.requires_grad_(False)
        channels = conv_layers[-1][0]
        self.layer_norm = FeatureLayerNorm(
            channels, cfg.feature_norm_removed_channels, cfg.feature_norm_channel_scale
        )
        self.post_extract_proj = (
            nn.Linear(self.layer_norm.out_features, cfg.encoder_embed_dim) if cfg.post_extract_proj else None
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.masking = TimeChannelMasking(cfg, cfg.encoder_embed_dim)
        self.encoder = PrunableTransformerEncoder(cfg, units)
        self.gate_set = GateSet(list(self.gates().values()))
        #: ((B, L), autocast) of the last training batch, and the break-evens measured so far (gather_policy)
        self._last_batch: Optional[tuple] = None
        self._break_even: Dict[object, gather_policy.BreakEven] = {}

    @classmethod
    def build_model(cls, cfg: DPHuBERTConfig, task=None) -> "DPHuBERTModel":
        return cls(cfg)

    @property
    def encoder_embed_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    # ----- forward -----

    def frame_padding_mask(
        self, padding_mask: Optional[torch.Tensor], num_frames: int
    ) -> Optional[torch.Tensor]:
        """Sample-level ``(B, L)`` padding mask -> frame-level ``(B, T)``, as the teacher's fairseq model does."""
        if padding_mask is None:
            return None
        if self.cfg.frame_padding == "hubert":
            return hubert_frame_padding(padding_mask, num_frames)
        return wav2vec2_frame_padding(padding_mask, num_frames, self.feature_extractor.output_lengths)

    def forward(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, mask: bool = False
    ) -> Dict[str, object]:
        """Returns ``hidden_states`` ``[h_0, ..., h_L]`` (each ``(B, T, D)``), ``x`` (the encoder's output,
        ``(B, T, D)``) and ``padding_mask`` (``(B, T)`` or None). ``mask``: apply fine-tuning masking (training
        only, with ``mask_prob`` / ``mask_channel_prob`` set); h_0 is the input before masking."""
        if self.training:  # what gather_policy times its probes on
            self._last_batch = (tuple(source.shape[:2]), _autocast_state(source.device))
        with self.gate_set.drawn():  # one sample for all gates, drawn in one vectorised pass
            return self._forward(source, padding_mask, mask)

    def _forward(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor], mask: bool
    ) -> Dict[str, object]:
        if self.cfg.feature_grad_mult > 0:
            features = self.feature_extractor(source)
            if self.cfg.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.cfg.feature_grad_mult)
        else:
            with torch.no_grad():
                features = self.feature_extractor(source)
        features = self.layer_norm(features.transpose(1, 2))
        padding_mask = self.frame_padding_mask(padding_mask, features.size(1))
        if (
            self.cfg.crop_seq_to_multiple > 1
        ):  # sliced unconditionally: a traced graph is right for any length
            keep = features.size(1) - features.size(1) % self.cfg.crop_seq_to_multiple
            features = features[:, :keep]
            padding_mask = padding_mask[:, :keep] if padding_mask is not None else None
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        h0 = self.dropout_input(features)
        layer_outputs, final = self.encoder(self.masking(h0, padding_mask) if mask else h0, padding_mask)
        return {"hidden_states": [h0] + layer_outputs, "x": final, "padding_mask": padding_mask}

    def hidden_states(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> List[torch.Tensor]:
        """``[h_0, ..., h_L]``: h_0 is the feature projection's output (the encoder's input, before the
        positional conv), h_i the output of transformer layer i; each ``(B, T, D)``."""
        return self.forward(source, padding_mask)["hidden_states"]

    def extract_features(
        self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, mask: bool = False, **unused
    ) -> "ExtractedFeatures":
        """The encoder's output for fine-tuning with stock fairseq: ``x`` ``(B, T, D)`` and the frame
        ``padding_mask``, readable both as HubertModel's tuple and as Wav2Vec2Model's dict (see
        ``ExtractedFeatures``). ``mask`` applies the fine-tuning masking (see ``TimeChannelMasking``)."""
        out = self.forward(source, padding_mask, mask=mask)
        return ExtractedFeatures(out["x"], out["padding_mask"], out["hidden_states"])

    def remove_pretraining_modules(self, *unused, **unused_kw) -> None:
        """Nothing to remove: the model has no pretraining heads."""

    # ----- gates and sizes -----

    def gates(self) -> Dict[str, HardConcrete]:
        """Every gate of the model, by its module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HardConcrete)}

    def unit_sizes(self, mode: str = "expected", logit_shift: Optional[torch.Tensor] = None) -> UnitSizes:
        """Size of each prunable structure.

        ``mode``: 'static' (the config's sizes), 'expected' (expected open gates, differentiable tensors),
        'eval' (gates open in the deterministic eval masks, ints), 'eval_counts' (the same counts as float32
        tensors, computed from the expected counts without a host sync, for training logs) or 'active' (units
        not yet inactive, ``inactive_units``: what the forward pass computes with, ints, no host sync).
        ``logit_shift`` (with 'expected' / 'eval_counts'): the sizes if every gate logit were shifted by it.
        """
        modes = ("static", "expected", "eval", "eval_counts", "active")
        if mode not in modes:
            raise ValueError(f"mode must be one of {', '.join(modes)}, got {mode!r}")
        if mode == "static":
            return static_sizes(self.cfg)
        if mode in ("expected", "eval_counts") and len(self.gate_set):
            count = self.gate_set.expected_open if mode == "expected" else self.gate_set.eval_open
            counts = dict(zip(self.gate_set.gates, count(logit_shift).unbind()))

        def size(gate: Optional[HardConcrete], static: int):
            if gate is None:
                return static
            if mode == "active":
                return gate.num_active
            if mode != "eval":
                return counts[gate]
            return int((gate.deterministic_mask() > 0).sum())

        def keep(gate: Optional[HardConcrete], present: bool):
            if not present or gate is None:
                return int(present)
            if mode == "active":
                return gate.num_active
            if mode != "eval":
                return counts[gate]  # one gate: the expected count is the keep probability
            return int(gate.deterministic_mask()[0] > 0)

        heads, ffn_dims, att_keep, ffn_keep = [], [], [], []
        for layer, h, f in zip(
            self.encoder.layers, self.cfg.encoder_attention_heads, self.cfg.encoder_ffn_embed_dims
        ):
            attn, ffn = layer.self_attn, layer.ffn
            heads.append(size(attn.head_gate, h) if attn is not None else h)
            att_keep.append(keep(attn.layer_gate if attn is not None else None, attn is not None))
            ffn_dims.append(size(ffn.unit_gate, f) if ffn is not None else f)
            ffn_keep.append(keep(ffn.layer_gate if ffn is not None else None, ffn is not None))
        return UnitSizes(
            conv_channels=[size(b.gate, b.out_channels) for b in self.feature_extractor.blocks],
            heads=heads,
            ffn_dims=ffn_dims,
            attention_keep=att_keep,
            ffn_keep=ffn_keep,
        )

    def update_active_sets(self, threshold: float, checks: int) -> int:
        """One check of ``inactive_units.update_active_sets`` on every gate; returns the units it made inactive."""
        return update_active_sets(self.gate_set.gates, threshold, checks)

    def choose_gathering(self, mode: str = "measure", batch_shape: Optional[Tuple[int, int]] = None) -> None:
        """Decide for every gate with inactive units whether its block leaves them out or computes them masked
        (``gather_policy.choose``): 'gather', 'mask', or 'measure' on this device, on blocks of the last
        training batch's shape (``batch_shape`` ``(B, L)`` instead, or one nominal utterance)."""
        shape, autocast = self._last_batch or ((1, macs.nominal_samples(self.cfg)), None)
        shape = tuple(batch_shape) if batch_shape is not None else shape

        def probes() -> List[gather_policy.Probe]:
            return gather_policy.model_probes(self, shape, autocast)

        gather_policy.choose(self.gate_set.gates, mode, probes, self._break_even)

    def break_evens(self) -> Dict[object, float]:
        """The active fraction below which each kind of block gathers, as measured so far (``choose_gathering``)."""
        return {key: b.below for key, b in self._break_even.items()}

    def active_fractions(self) -> Dict[str, float]:
        """Fraction of the gated heads, FFN units and conv channels still active (no host sync); a structure
        without gates is left out."""
        fractions = {}
        blocks = [
            ("heads", [layer.self_attn for layer in self.encoder.layers], "head_gate", "num_heads"),
            ("ffn_units", [layer.ffn for layer in self.encoder.layers], "unit_gate", "ffn_dim"),
        ]
        for name, modules, gate_name, size_name in blocks:
            active = total = 0
            for module in modules:
                gate = getattr(module, gate_name, None) if module is not None else None
                if gate is not None:
                    total += gate.n
                    active += 0 if module.skipped else gate.num_active
            if total:
                fractions[name] = active / total
        conv = [b.gate for b in self.feature_extractor.blocks if b.gate is not None]
        if conv:
            fractions["conv_channels"] = sum(g.num_active for g in conv) / sum(g.n for g in conv)
        return fractions

    def active_macs(self, num_samples: Optional[int] = None) -> int:
        """MACs the forward pass computes now, leaving inactive units out (``inactive_units``), on one utterance
        of ``num_samples`` samples (default ``macs.NOMINAL_SECONDS``): the student's current compute."""
        sizes = self.unit_sizes("active")
        computed = [
            b.out_channels if b.norm_kind == "layer" else c
            for b, c in zip(self.feature_extractor.blocks, sizes.conv_channels)
        ]
        num_samples = num_samples if num_samples is not None else macs.nominal_samples(self.cfg)
        return macs.count_macs(
            self.cfg, num_samples, sizes, computed, projection_inputs=self.layer_norm.out_features
        ).total

    def num_params(self) -> int:
        """Counted parameters (``param_count`` convention) of this architecture."""
        return config_params(self.cfg)

    def size(self, metric: macs.Metric = "params") -> Union[int, float]:
        """This architecture's size in ``metric`` (``macs.size``): counted parameters, MACs of one
        ``macs.NOMINAL_SECONDS`` utterance, or a latency table's predicted seconds."""
        return macs.architecture_size(self.cfg, metric)

    def expected_size(self, metric: macs.Metric = "params") -> torch.Tensor:
        """Differentiable expected size in ``metric`` under the gates (float32 scalar), with the exact-fold
        extras an export will have (``eval_count_config``): with every gate saturated, the size of the model
        the export writes; ``size()`` when no gate is active."""
        n = macs.size(self.eval_count_config(), self.unit_sizes("expected"), metric)
        if not torch.is_tensor(n):
            n = torch.tensor(float(n))
        return n

    def expected_params(self) -> torch.Tensor:
        """``expected_size("params")``."""
        return self.expected_size("params")

    def eval_count_config(self) -> DPHuBERTConfig:
        """The config with the exact-fold extras an export of this model will have: the feature LayerNorm's
        channel scale when the last conv layer is gated, and the removed-channels column, counted whenever the
        last conv layer is gated (``D`` parameters more than the export has while no channel is removed)."""
        last_gated = self.feature_extractor.blocks[-1].gate is not None
        cfg = as_config(self.cfg)
        cfg.feature_norm_channel_scale = self.layer_norm.channel_scale is not None or last_gated
        cfg.feature_norm_removed_channels = self.layer_norm.removed_channels + int(last_gated)
        return cfg

    def eval_mask_size(
        self,
        metric: macs.Metric = "params",
        sync_free: bool = False,
        logit_shift: Optional[torch.Tensor] = None,
    ) -> Union[int, float, torch.Tensor]:
        """The size in ``metric`` of what ``pruning.prune(self)`` will give: kept units of the eval masks, plus
        the exact-fold extras.

        An int read off the masks; with ``sync_free`` a float32 scalar tensor computed from the same counts
        without reading anything back to the host (for the training log and ``target_projection``).
        ``logit_shift`` (implies ``sync_free``): the size if every gate logit were shifted by it."""
        if sync_free or logit_shift is not None:
            return macs.size(self.eval_count_config(), self.unit_sizes("eval_counts", logit_shift), metric)
        sizes = self.unit_sizes("eval")
        cfg = self.eval_count_config()
        cfg.feature_norm_removed_channels = (
            self.layer_norm.removed_channels + self.feature_extractor.out_channels - sizes.conv_channels[-1]
        )
        return macs.real_size(cfg, sizes, metric)

    def eval_mask_params(
        self, sync_free: bool = False, logit_shift: Optional[torch.Tensor] = None
    ) -> Union[int, torch.Tensor]:
        """``eval_mask_size("params", ...)``."""
        return self.eval_mask_size("params", sync_free, logit_shift)
