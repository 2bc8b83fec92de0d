"""The reference implementation's release format, both ways: the ``{"state_dict", "config"}`` files that
pyf98/DPHuBERT (torchaudio-based) writes for its pruned models, read into an ungated ``dphubert`` model and
written from one.

What a file holds (the reference's ``wav2vec2/model.py`` builder ``wav2vec2_model(**config)``, its
``wav2vec2/components.py`` modules and ``prune.py``, which writes the released files):

- ``config``: the builder's keyword arguments. HuBERT / wav2vec2 style: ``encoder_num_heads`` (heads per
  layer) and ``encoder_head_dim``; WavLM style (chosen by the presence of ``encoder_remaining_heads``):
  ``encoder_total_num_heads``, ``encoder_remaining_heads`` (the teacher indices of each layer's kept heads),
  ``encoder_num_buckets``, ``encoder_max_distance``, and the head width is ``embed_dim // total heads``.
  ``extractor_conv_layer_config`` lists the kept channels. A pruned file has its five ``*_prune_*`` flags
  False; True means a training snapshot with hard-concrete parameters.
- ``state_dict``, under these names (``L`` layers, ``D`` model width, ``C`` last conv channels)::

    feature_extractor.dummy_weight                            (C,)
    feature_extractor.conv_layers.{i}.conv.weight / .bias     (bias with extractor_conv_bias)
    feature_extractor.conv_layers.{i}.layer_norm.weight/.bias GroupNorm of block 0 ('group_norm') or a
                                                              LayerNorm over channels in every block
    encoder.feature_projection.layer_norm.weight / .bias      (C,)
    encoder.feature_projection.projection.weight / .bias      (D, C)
    encoder.transformer.pos_conv_embed.conv.weight_g / .weight_v / .bias   (old-style weight norm, dim 2)
    encoder.transformer.layer_norm.weight / .bias
    encoder.transformer.layers.{i}.attention.{k,v,q}_proj.weight / .bias   when the layer uses attention
    encoder.transformer.layers.{i}.attention.out_proj.weight / .bias
    encoder.transformer.layers.{i}.layer_norm.weight / .bias               always (also with blocks removed)
    encoder.transformer.layers.{i}.feed_forward.intermediate_dense / .output_dense   when it uses the FFN
    encoder.transformer.layers.{i}.final_layer_norm.weight / .bias         always
    aux.weight / .bias                                        with aux_num_out (a fine-tuning head)

  WavLM style adds, per attention, ``gru_rel_pos_const`` ``(1, total heads, 1, 1)`` and ``gru_rel_pos_linear``
  (``Linear(head_dim, 8)``), and in layer 0's attention only ``rel_attn_embed.weight``
  ``(num_buckets, total heads)``. Layer 0 computes the bias and hands it on; without an attention block in
  layer 0 no layer gets a relative position bias.

How it computes (``extract_features``): the waveform is layer-normalised per utterance over its valid samples
when ``normalize_waveform``; the last conv block's output ``(B, T, C)`` is multiplied by ``dummy_weight`` (the
soft values of the last conv gate, saved by the reference's pruning) and then LayerNorm-ed over its ``C``
channels and projected; padded frames (from the lengths, by the conv output-length formula) are zeroed and
masked with an additive -10000. The hidden states are ``[projection output, layer 1, ..., layer L]``; for
pre-LN models the last one is not passed through the encoder LayerNorm. A removed attention block
(``use_attention`` False) adds nothing; post-LN layers still apply both LayerNorms. 0 heads or 0 FFN units
with the block in use leave its output bias, as in ours.

Mapping to the ``dphubert`` model: ``dummy_weight`` is ``FeatureLayerNorm.channel_scale`` (both scale the
channels before the LayerNorm: exact), the length-based frame masks are our ``frame_padding='wav2vec2'``,
``normalize_waveform`` is our ``normalize`` (our model expects the task to normalise its input, the reference
model does it itself: the same computation), WavLM's table is ``encoder.relative_attention_bias`` and the
gates ``grep_linear`` / ``grep_a`` with the kept heads' teacher indices in ``head_index``. On import, channels
of the last conv layer with ``dummy_weight`` 0 (what ``layout='exact'`` writes) become our feature LayerNorm's
removed channels again, so that a round trip gives back the same architecture and size.

What the format cannot hold exactly, and what ``reference_from_model`` does about it:

- our feature LayerNorm after a pruned CNN keeps the removed channels as zeros in its statistics and carries
  their share through an extra projection input. ``layout='exact'`` writes them back as real channels of the
  last conv layer with zero weights and ``dummy_weight`` 0 (zeros in the LayerNorm's statistics, as in the
  gated model); one of them, with gamma 1, feeds the extra projection column. Exact, at the price of zero
  parameters. ``layout='compact'`` drops them, as the reference's own pruning does: fewer parameters, not
  exact; the deviation is measured and reported. In a 'layer_norm' extractor the zero channels also enter
  the last conv block's LayerNorm, so there neither layout is exact (both are measured);
- WavLM: a bias table used by layers whose layer 0 has no attention block is written with an empty
  (0-head, zero-output) attention block in layer 0, which holds the table; ``gru_rel_pos=False`` is written
  as gates that are exactly 1 (zero linear, ``gru_rel_pos_const`` -2);
- conventions that change no weight are reported as notes: HuBERT-style frame padding (the reference masks
  frames by conv output length, which differs at the last frame or two of padded utterances), input
  normalisation inside the model.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..checkpoint_io import atomic_torch_save
from ..conv_spec import format_conv_layers, parse_conv_layers
from ..errors import CheckpointError, ConfigError, DPHuBERTError
from ..models.dphubert import DPHuBERTConfig, DPHuBERTModel
from ..pruning import max_hidden_state_deviation, probe_input
from ..safe_loading import read_torch_file

logger = logging.getLogger(__name__)

Shape = Tuple[int, ...]

#: The reference builder's keyword arguments without a default, in its order (both styles), and each
#: style's own attention keys, which go where ``ATTENTION`` stands.
ATTENTION = "<attention>"
REQUIRED_KEYS = (
    "extractor_mode",
    "extractor_conv_layer_config",
    "extractor_conv_bias",
    "encoder_embed_dim",
    "encoder_projection_dropout",
    "encoder_pos_conv_kernel",
    "encoder_pos_conv_groups",
    "encoder_num_layers",
    "encoder_use_attention",
    "encoder_use_feed_forward",
    ATTENTION,
    "encoder_attention_dropout",
    "encoder_ff_interm_features",
    "encoder_ff_interm_dropout",
    "encoder_dropout",
    "encoder_layer_norm_first",
    "encoder_layer_drop",
    "aux_num_out",
    "normalize_waveform",
)
HUBERT_ATTENTION_KEYS = ("encoder_num_heads", "encoder_head_dim")
WAVLM_ATTENTION_KEYS = (
    "encoder_total_num_heads",
    "encoder_remaining_heads",
    "encoder_num_buckets",
    "encoder_max_distance",
)
#: The builder's pruning switches (default False); a released, pruned model has them all False.
PRUNE_FLAGS = (
    "extractor_prune_conv_channels",
    "encoder_prune_attention_heads",
    "encoder_prune_attention_layer",
    "encoder_prune_feed_forward_intermediate",
    "encoder_prune_feed_forward_layer",
)
#: reference ``extractor_mode`` -> ours
EXTRACTOR_MODES = {"group_norm": "default", "layer_norm": "layer_norm"}
#: the builder's CNN when ``extractor_conv_layer_config`` is None
DEFAULT_CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
#: ``reference_from_model`` layouts for CNN channels our feature LayerNorm keeps as phantom zeros
LAYOUTS = ("exact", "compact")
#: WavLM's gate constant that, with a zero gate linear, makes every gate exactly 1: 0.5 * (0.5 * c - 1) + 2
NEUTRAL_GATE_CONST = -2.0

_FE = "feature_extractor."
_PROJ = "encoder.feature_projection."
_TR = "encoder.transformer."


def _key_order(wavlm: bool) -> List[str]:
    out: List[str] = []
    for key in REQUIRED_KEYS:
        out.extend((WAVLM_ATTENTION_KEYS if wavlm else HUBERT_ATTENTION_KEYS) if key == ATTENTION else [key])
    return out + list(PRUNE_FLAGS)


def is_wavlm_config(config: Dict[str, Any]) -> bool:
    """WavLM style, by the rule of the reference's ``wav2vec2_model`` wrapper."""
    return "encoder_remaining_heads" in config


# ----- the layout of a config -----


def conv_layers_of(config: Dict[str, Any]) -> List[Tuple[int, int, int]]:
    layers = config["extractor_conv_layer_config"]
    return list(DEFAULT_CONV_LAYERS) if layers is None else [tuple(int(v) for v in layer) for layer in layers]


def layer_heads(config: Dict[str, Any], i: int) -> Tuple[int, int]:
    """(kept heads, head width) of layer i's attention."""
    if is_wavlm_config(config):
        total = int(config["encoder_total_num_heads"][i])
        return len(config["encoder_remaining_heads"][i]), int(config["encoder_embed_dim"]) // total
    return int(config["encoder_num_heads"][i]), int(config["encoder_head_dim"])


def reference_layout(config: Dict[str, Any]) -> Dict[str, Shape]:
    """Every state-dict name the reference builder makes for a (checked) ``config``, with its shape, in the
    order of its ``state_dict()``: what a file must hold for the builder's ``load_state_dict(strict=True)``.
    """
    out: Dict[str, Shape] = {}
    conv = conv_layers_of(config)
    out[_FE + "dummy_weight"] = (conv[-1][0],)
    in_channels = 1
    for i, (channels, kernel, _) in enumerate(conv):
        prefix = f"{_FE}conv_layers.{i}."
        if config["extractor_mode"] == "layer_norm" or i == 0:
            out[prefix + "layer_norm.weight"] = out[prefix + "layer_norm.bias"] = (channels,)
        out[prefix + "conv.weight"] = (channels, in_channels, kernel)
        if config["extractor_conv_bias"]:
            out[prefix + "conv.bias"] = (channels,)
        in_channels = channels
    dim = int(config["encoder_embed_dim"])
    out[_PROJ + "layer_norm.weight"] = out[_PROJ + "layer_norm.bias"] = (in_channels,)
    out[_PROJ + "projection.weight"] = (dim, in_channels)
    out[_PROJ + "projection.bias"] = (dim,)
    kernel, groups = int(config["encoder_pos_conv_kernel"]), int(config["encoder_pos_conv_groups"])
    out[_TR + "pos_conv_embed.conv.bias"] = (dim,)
    out[_TR + "pos_conv_embed.conv.weight_g"] = (1, 1, kernel)
    out[_TR + "pos_conv_embed.conv.weight_v"] = (dim, dim // groups, kernel)
    out[_TR + "layer_norm.weight"] = out[_TR + "layer_norm.bias"] = (dim,)
    wavlm = is_wavlm_config(config)
    for i in range(int(config["encoder_num_layers"])):
        prefix = f"{_TR}layers.{i}."
        if config["encoder_use_attention"][i]:
            heads, head_dim = layer_heads(config, i)
            attn = prefix + "attention."
            if wavlm:
                out[attn + "gru_rel_pos_const"] = (1, int(config["encoder_total_num_heads"][i]), 1, 1)
            for name in ("k_proj", "v_proj", "q_proj"):
                out[attn + name + ".weight"] = (heads * head_dim, dim)
                out[attn + name + ".bias"] = (heads * head_dim,)
            out[attn + "out_proj.weight"] = (dim, heads * head_dim)
            out[attn + "out_proj.bias"] = (dim,)
            if wavlm:
                if i == 0:
                    total = int(config["encoder_total_num_heads"][0])
                    out[attn + "rel_attn_embed.weight"] = (int(config["encoder_num_buckets"]), total)
                out[attn + "gru_rel_pos_linear.weight"] = (8, head_dim)
                out[attn + "gru_rel_pos_linear.bias"] = (8,)
        out[prefix + "layer_norm.weight"] = out[prefix + "layer_norm.bias"] = (dim,)
        if config["encoder_use_feed_forward"][i]:
            units = int(config["encoder_ff_interm_features"][i])
            out[prefix + "feed_forward.intermediate_dense.weight"] = (units, dim)
            out[prefix + "feed_forward.intermediate_dense.bias"] = (units,)
            out[prefix + "feed_forward.output_dense.weight"] = (dim, units)
            out[prefix + "feed_forward.output_dense.bias"] = (dim,)
        out[prefix + "final_layer_norm.weight"] = out[prefix + "final_layer_norm.bias"] = (dim,)
    if config["aux_num_out"] is not None:
        out["aux.weight"] = (int(config["aux_num_out"]), dim)
        out["aux.bias"] = (int(config["aux_num_out"]),)
    return out


# ----- reading -----


def _fail(name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{name}: {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_reference_config(config: Any, name: str) -> None:
    """Raise a one-line ``CheckpointError`` naming ``name`` and the config key when ``config`` is not a
    pruned reference config this package can express."""
    if not isinstance(config, dict):
        raise _fail(
            name, f"'config' is a {type(config).__name__}, not the reference builder's keyword arguments"
        )
    wavlm = is_wavlm_config(config)
    known = _key_order(wavlm)
    for key in config:
        if key not in known:
            other = HUBERT_ATTENTION_KEYS if wavlm else WAVLM_ATTENTION_KEYS
            why = " (a key of the other attention style)" if key in other else ""
            raise _fail(
                name, f"config has the unknown key {key!r}{why}; the reference builder takes no such argument"
            )
    for key in known:
        if key not in config and key not in PRUNE_FLAGS:
            raise _fail(name, f"config has no {key!r} (a required argument of the reference builder)")
    for flag in PRUNE_FLAGS:
        if config.get(flag):
            raise _fail(
                name,
                f"config[{flag!r}] is True: an unpruned training snapshot with hard-concrete parameters; "
                "prune it with the reference's prune.py first (a pruned file has every *_prune_* flag False)",
            )
    if config["extractor_mode"] not in EXTRACTOR_MODES:
        raise _fail(
            name,
            f"config['extractor_mode'] is {config['extractor_mode']!r}; expected one of "
            f"{sorted(EXTRACTOR_MODES)}",
        )
    conv = config["extractor_conv_layer_config"]
    if conv is not None and (
        not isinstance(conv, (list, tuple))
        or not conv
        or any(
            not isinstance(c, (list, tuple)) or len(c) != 3 or not all(_is_int(v) and v > 0 for v in c)
            for c in conv
        )
    ):
        raise _fail(name, "config['extractor_conv_layer_config'] is not a list of (channels, kernel, stride)")
    for key in (
        "encoder_embed_dim",
        "encoder_num_layers",
        "encoder_pos_conv_kernel",
        "encoder_pos_conv_groups",
    ):
        if not _is_int(config[key]) or config[key] < 1:
            raise _fail(name, f"config[{key!r}] is {config[key]!r}, not a positive integer")
    layers = config["encoder_num_layers"]
    per_layer = ["encoder_use_attention", "encoder_use_feed_forward", "encoder_ff_interm_features"]
    per_layer += ["encoder_total_num_heads", "encoder_remaining_heads"] if wavlm else ["encoder_num_heads"]
    for key in per_layer:
        value = config[key]
        if not isinstance(value, (list, tuple)) or len(value) != layers:
            count = f"has {len(value)} entries" if isinstance(value, (list, tuple)) else "is not a list"
            raise _fail(name, f"config[{key!r}] {count}; encoder_num_layers is {layers}")
    for key, use in (
        ("encoder_ff_interm_features", "encoder_use_feed_forward"),
        ("encoder_num_heads", "encoder_use_attention"),
    ):
        for i, (size, used) in enumerate(zip(config.get(key, []), config[use])):
            if used and (not _is_int(size) or size < 0):
                raise _fail(name, f"config[{key!r}][{i}] is {size!r}, not a size (an integer >= 0)")
    if wavlm:
        _check_wavlm_config(config, name)
    elif not _is_int(config["encoder_head_dim"]) or config["encoder_head_dim"] < 1:
        raise _fail(
            name, f"config['encoder_head_dim'] is {config['encoder_head_dim']!r}, not a positive integer"
        )


def _check_wavlm_config(config: Dict[str, Any], name: str) -> None:
    dim = config["encoder_embed_dim"]
    totals = config["encoder_total_num_heads"]
    used = [i for i, use in enumerate(config["encoder_use_attention"]) if use]
    if not totals or any(not _is_int(t) or t < 1 or dim % t for t in totals):
        raise _fail(
            name, f"config['encoder_total_num_heads'] is {totals!r}: each must divide encoder_embed_dim {dim}"
        )
    if len(set(int(totals[i]) for i in used)) > 1:
        # layer 0's bias has its total heads; a layer with another total could not read it
        raise _fail(
            name, f"config['encoder_total_num_heads'] differs between layers ({totals}); not expressible"
        )
    for i in used:
        heads = config["encoder_remaining_heads"][i]
        if not isinstance(heads, (list, tuple)) or any(
            not _is_int(h) or not 0 <= h < totals[i] for h in heads
        ):
            raise _fail(
                name,
                f"config['encoder_remaining_heads'][{i}] is {heads!r}, not head indices below {totals[i]}",
            )
        if len(set(heads)) != len(heads):
            raise _fail(name, f"config['encoder_remaining_heads'][{i}] repeats a head ({heads!r})")
    for key in ("encoder_num_buckets", "encoder_max_distance"):
        if not _is_int(config[key]) or config[key] < 1:
            raise _fail(name, f"config[{key!r}] is {config[key]!r}, not a positive integer")


def check_reference_state(state: Any, config: Dict[str, Any], name: str) -> None:
    """Raise a one-line ``CheckpointError`` naming the first missing, unexpected or misshapen tensor."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise _fail(name, f"'state_dict' is a {type(state).__name__}, not a state dict")
    layout = reference_layout(config)
    for key, shape in layout.items():
        if key not in state:
            more = sum(1 for k in layout if k not in state) - 1
            extra = f" (and {more} more)" if more else ""
            raise _fail(
                name,
                f"state_dict has no {key!r}{extra}, which its config needs; a truncated or mismatched file",
            )
        value = state[key]
        if not torch.is_tensor(value):
            raise _fail(name, f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise _fail(name, f"state_dict[{key!r}] has shape {tuple(value.shape)}; its config needs {shape}")
    for key in state:
        if key not in layout:
            hint = ""
            if "hard_concrete" in key:
                hint = (
                    " (hard-concrete parameters: an unpruned training snapshot; prune it with the "
                    "reference's prune.py)"
                )
            raise _fail(name, f"state_dict has the unexpected entry {key!r} for its config{hint}")


def read_reference(obj_or_path: Union[str, "os.PathLike[str]", Dict[str, Any]], name: Optional[str] = None):
    """``(file dict, name)``: a reference-format file loaded (weights-only) or a dict already loaded, checked
    (layout, config, every tensor's name and shape). ``name`` labels the errors (default: the path)."""
    if isinstance(obj_or_path, (str, os.PathLike)):
        name = name or str(obj_or_path)
        obj = read_torch_file(str(obj_or_path))
    else:
        name = name or "reference dict"
        obj = obj_or_path
    if not isinstance(obj, dict):
        raise _fail(
            name, f"holds a {type(obj).__name__}, not a reference-format dict {{'state_dict', 'config'}}"
        )
    if "state_dict" not in obj or "config" not in obj:
        if "model" in obj and ("cfg" in obj or "args" in obj):
            raise _fail(
                name,
                "is a fairseq checkpoint, not a reference-format file {'state_dict', 'config'}; load it with "
                "dphubert_fairseq.load_model (a dphubert one) or use it as a teacher",
            )
        missing = "state_dict" if "state_dict" not in obj else "config"
        raise _fail(
            name,
            f"has no {missing!r} entry: not a reference-format file {{'state_dict', 'config'}} "
            f"(top-level keys: {sorted(map(str, obj))[:6]})",
        )
    check_reference_config(obj["config"], name)
    check_reference_state(obj["state_dict"], obj["config"], name)
    return obj, name


def config_from_reference(
    config: Dict[str, Any], dummy_weight: Optional[torch.Tensor] = None
) -> DPHuBERTConfig:
    """Our ungated ``DPHuBERTConfig`` for a checked reference config. ``dummy_weight``: the file's; a scale
    that is not all ones becomes our feature LayerNorm's ``channel_scale``."""
    wavlm = is_wavlm_config(config)
    layers = int(config["encoder_num_layers"])
    use_attention = [int(bool(u)) for u in config["encoder_use_attention"]]
    use_ffn = [int(bool(u)) for u in config["encoder_use_feed_forward"]]
    heads = [layer_heads(config, i)[0] if use_attention[i] else 0 for i in range(layers)]
    used = [i for i in range(layers) if use_attention[i]]
    ffn = [int(f) if use_ffn[i] else 0 for i, f in enumerate(config["encoder_ff_interm_features"])]
    dim = int(config["encoder_embed_dim"])
    cfg = DPHuBERTConfig(
        _name="dphubert",
        extractor_mode=EXTRACTOR_MODES[config["extractor_mode"]],
        conv_feature_layers=format_conv_layers(conv_layers_of(config)),
        conv_bias=bool(config["extractor_conv_bias"]),
        encoder_layers=layers,
        encoder_embed_dim=dim,
        attention_head_dim=layer_heads(config, used[0] if used else 0)[1],
        encoder_attention_heads=heads,
        encoder_ffn_embed_dims=ffn,
        use_attention=use_attention,
        use_ffn=use_ffn,
        layer_norm_first=bool(config["encoder_layer_norm_first"]),
        activation_fn="gelu",
        conv_pos=int(config["encoder_pos_conv_kernel"]),
        conv_pos_groups=int(config["encoder_pos_conv_groups"]),
        conv_pos_batch_norm=False,
        post_extract_proj=True,
        dropout=float(config["encoder_dropout"]),
        attention_dropout=float(config["encoder_attention_dropout"]),
        activation_dropout=float(config["encoder_ff_interm_dropout"]),
        dropout_input=float(config["encoder_projection_dropout"]),
        encoder_layerdrop=float(config["encoder_layer_drop"]),
        frame_padding="wav2vec2",  # the reference masks frames past the conv output length of each input
        normalize=bool(config["normalize_waveform"]),
        feature_norm_channel_scale=dummy_weight is not None and not bool((dummy_weight == 1).all()),
    )
    if wavlm and use_attention[0]:  # the bias table lives in layer 0; without it no layer has a bias
        cfg.relative_position_buckets = int(config["encoder_num_buckets"])
        cfg.relative_position_max_distance = int(config["encoder_max_distance"])
        cfg.relative_position_heads = int(config["encoder_total_num_heads"][0])
        cfg.gru_rel_pos = True  # the reference's WavLM attention always gates its bias
    return cfg


def _ours_from_reference(state: Dict[str, torch.Tensor], config: Dict[str, Any], cfg: DPHuBERTConfig):
    """The reference state dict under our names: what our model of ``cfg`` holds, less its
    ``masking.mask_emb``."""
    ours: Dict[str, torch.Tensor] = {}
    for i in range(len(conv_layers_of(config))):
        src, dst = f"{_FE}conv_layers.{i}.", f"feature_extractor.blocks.{i}."
        for part in ("conv.weight", "conv.bias"):
            if src + part in state:
                ours[dst + part] = state[src + part]
        for part in ("weight", "bias"):
            if src + "layer_norm." + part in state:
                ours[dst + "norm." + part] = state[src + "layer_norm." + part]
    ours["layer_norm.weight"] = state[_PROJ + "layer_norm.weight"]
    ours["layer_norm.bias"] = state[_PROJ + "layer_norm.bias"]
    if cfg.feature_norm_channel_scale:
        ours["layer_norm.channel_scale"] = state[_FE + "dummy_weight"]
    ours["post_extract_proj.weight"] = state[_PROJ + "projection.weight"]
    ours["post_extract_proj.bias"] = state[_PROJ + "projection.bias"]
    for part in ("weight_g", "weight_v", "bias"):
        ours["encoder.pos_conv.0." + part] = state[_TR + "pos_conv_embed.conv." + part]
    ours["encoder.layer_norm.weight"] = state[_TR + "layer_norm.weight"]
    ours["encoder.layer_norm.bias"] = state[_TR + "layer_norm.bias"]
    wavlm_bias = cfg.relative_position_buckets > 0
    if wavlm_bias:
        ours["encoder.relative_attention_bias.weight"] = state[
            _TR + "layers.0.attention.rel_attn_embed.weight"
        ]
    for i in range(cfg.encoder_layers):
        src, dst = f"{_TR}layers.{i}.", f"encoder.layers.{i}."
        if cfg.use_attention[i]:
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                for part in ("weight", "bias"):
                    ours[f"{dst}self_attn.{name}.{part}"] = state[f"{src}attention.{name}.{part}"]
            if wavlm_bias:
                kept = torch.tensor([int(h) for h in config["encoder_remaining_heads"][i]], dtype=torch.long)
                ours[dst + "self_attn.head_index"] = kept
                ours[dst + "self_attn.grep_a"] = state[src + "attention.gru_rel_pos_const"][:, kept]
                for part in ("weight", "bias"):
                    ours[f"{dst}self_attn.grep_linear.{part}"] = state[
                        f"{src}attention.gru_rel_pos_linear.{part}"
                    ]
        if cfg.use_ffn[i]:
            for theirs, mine in (("intermediate_dense", "fc1"), ("output_dense", "fc2")):
                for part in ("weight", "bias"):
                    ours[f"{dst}ffn.{mine}.{part}"] = state[f"{src}feed_forward.{theirs}.{part}"]
        # a pre-LN layer's LayerNorm goes with its block (ours drops it; the reference keeps it, unused)
        if cfg.use_attention[i] or not cfg.layer_norm_first:
            ours[dst + "self_attn_layer_norm.weight"] = state[src + "layer_norm.weight"]
            ours[dst + "self_attn_layer_norm.bias"] = state[src + "layer_norm.bias"]
        if cfg.use_ffn[i] or not cfg.layer_norm_first:
            ours[dst + "final_layer_norm.weight"] = state[src + "final_layer_norm.weight"]
            ours[dst + "final_layer_norm.bias"] = state[src + "final_layer_norm.bias"]
    return ours


def _fold_zero_scaled_channels(cfg: DPHuBERTConfig, ours: Dict[str, torch.Tensor]) -> int:
    """Turn channels of the last conv layer whose ``dummy_weight`` is 0 (what ``layout='exact'`` writes for
    removed channels) back into our feature LayerNorm's removed channels: they are exact zeros in its
    statistics either way, and their normalised values ``-mean/std * gamma + beta`` reach the projection
    through its extra column and its bias. Not where the last conv block has a LayerNorm over channels (they
    take part in its statistics). Changes ``cfg`` and ``ours`` in place; returns the channels folded."""
    scale = ours.get("layer_norm.channel_scale")
    conv = parse_conv_layers(cfg.conv_feature_layers)
    last = len(conv) - 1
    if scale is None or cfg.extractor_mode == "layer_norm":
        return 0
    zero = scale == 0
    if not zero.any() or zero.all():
        return 0
    kept, removed = torch.nonzero(~zero).squeeze(-1), torch.nonzero(zero).squeeze(-1)
    prefix = f"feature_extractor.blocks.{last}."
    for key in ("conv.weight", "conv.bias", "norm.weight", "norm.bias"):
        if prefix + key in ours:
            ours[prefix + key] = ours[prefix + key][kept]
    gamma, beta = ours["layer_norm.weight"], ours["layer_norm.bias"]
    weight, bias = ours["post_extract_proj.weight"], ours["post_extract_proj.bias"]
    ours["post_extract_proj.weight"] = torch.cat(
        [weight[:, kept], (weight[:, removed] @ gamma[removed]).unsqueeze(1)], dim=1
    )
    ours["post_extract_proj.bias"] = bias + weight[:, removed] @ beta[removed]
    ours["layer_norm.weight"], ours["layer_norm.bias"] = gamma[kept], beta[kept]
    ours["layer_norm.channel_scale"] = scale[kept]
    if bool((scale[kept] == 1).all()):
        del ours["layer_norm.channel_scale"]
    cfg.feature_norm_channel_scale = "layer_norm.channel_scale" in ours
    cfg.feature_norm_removed_channels = int(removed.numel())
    conv[last] = (int(kept.numel()),) + tuple(conv[last][1:])
    cfg.conv_feature_layers = format_conv_layers(conv)
    return int(removed.numel())


def import_notes(config: Dict[str, Any], obj: Dict[str, Any]) -> List[str]:
    """What an import leaves out or reinterprets, one line each (also logged)."""
    notes = []
    if config["aux_num_out"] is not None:
        notes.append(
            f"ignored the aux layer (aux.weight / aux.bias, a fine-tuning head with {config['aux_num_out']} "
            "outputs): the dphubert model has no output head"
        )
    if "distill_linear_projs" in obj:
        notes.append("ignored distill_linear_projs (the reference's distillation projections)")
    others = sorted(str(k) for k in obj if k not in ("state_dict", "config", "distill_linear_projs"))
    if others:
        notes.append(f"ignored the top-level entries {others}")
    if config["normalize_waveform"]:
        notes.append(
            "normalize_waveform: the model expects per-utterance normalised waveforms (cfg.normalize; "
            "fairseq's task normalises them), where the reference model normalises inside"
        )
    if is_wavlm_config(config) and not config["encoder_use_attention"][0]:
        notes.append(
            "WavLM file without an attention block in layer 0: the reference gives no layer a relative "
            "position bias then, so the model has none (its gate parameters are unused and left out)"
        )
    return notes


def model_from_reference(
    obj_or_path: Union[str, "os.PathLike[str]", Dict[str, Any]],
    name: Optional[str] = None,
    fold_zero_channels: bool = True,
) -> DPHuBERTModel:
    """An ungated ``dphubert`` model (eval mode, float32, CPU) computing the hidden states of a
    reference-format file (a path, or the dict ``torch.load`` gives). ``name`` labels errors for a dict.

    Refuses (one-line ``CheckpointError`` naming the file and the key) what it cannot express: training
    snapshots (a ``*_prune_*`` flag True), an unknown ``extractor_mode`` or config key, missing, unexpected or
    misshapen tensors. The aux head and ``distill_linear_projs`` are left out (logged); the model's
    ``reference_notes`` lists what was left out or reinterpreted. ``fold_zero_channels``: channels of the last
    conv layer with ``dummy_weight`` 0 become our feature LayerNorm's removed channels (the same hidden
    states, fewer parameters; see ``_fold_zero_scaled_channels``); off, the model mirrors the file channel for
    channel."""
    obj, name = read_reference(obj_or_path, name)
    config, state = obj["config"], obj["state_dict"]
    cfg = config_from_reference(config, state[_FE + "dummy_weight"])
    ours = _ours_from_reference(state, config, cfg)
    folded = _fold_zero_scaled_channels(cfg, ours) if fold_zero_channels else 0
    model = DPHuBERTModel(cfg)
    own = model.state_dict()
    unfilled = [k for k in own if k not in ours]
    if unfilled != ["masking.mask_emb"]:  # a bug in the mapping, not in the file
        raise RuntimeError(f"reference import left {unfilled} unset")
    # fine-tuning's mask embedding has no counterpart: a fixed draw of fairseq's initialisation (U[0, 1))
    ours["masking.mask_emb"] = torch.rand(
        own["masking.mask_emb"].shape, generator=torch.Generator().manual_seed(0)
    )
    model.load_state_dict(ours, strict=True)
    model.eval()
    model.reference_notes = import_notes(config, obj)
    if folded:
        model.reference_notes.append(
            f"{folded} CNN output channels with dummy_weight 0 (zeros for the feature LayerNorm) are kept as "
            "its removed channels, as a pruned dphubert model holds them"
        )
    for note in model.reference_notes:
        logger.info("%s: %s", name, note)
    return model


# ----- writing -----


@dataclass
class ReferenceExportReport:
    """What ``reference_from_model`` did: whether the file computes the model's hidden states exactly, how
    closely it did on the probe input (the file run as the reference runs it), the zero parameters the file
    holds only to express the model exactly, and convention notes that change no weight."""

    layout: str
    exact: bool
    inexact_parts: List[str]
    max_abs_deviation: Optional[float]
    probe: str
    filler_params: int
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """The report for people, one line each."""
        deviation = "not measured" if self.max_abs_deviation is None else f"{self.max_abs_deviation:.3g}"
        if self.exact:
            head = (
                f"reference format ({self.layout}): exact (max abs deviation of hidden states on the probe "
                f"{deviation})"
            )
        else:
            head = (
                f"reference format ({self.layout}): NOT exact: {'; '.join(self.inexact_parts)}; max abs "
                f"deviation of hidden states on the probe {deviation}"
            )
        out = [head]
        if self.filler_params:
            out.append(
                f"the file holds {self.filler_params:,} parameters only to express the model (zeros, ones)"
            )
        return out + [f"note: {note}" for note in self.notes]


def _check_writable(model: DPHuBERTModel) -> None:
    cfg = model.cfg
    if model.gates():
        raise DPHuBERTError(
            "the model still has hard-concrete gates: write its pruned form (dphubert_fairseq.prune, or "
            "dphubert-export) in the reference format"
        )
    problems = [
        (
            cfg.activation_fn != "gelu",
            f"model.activation_fn is {cfg.activation_fn!r}; the reference's FFN uses gelu",
        ),
        (
            cfg.conv_pos_batch_norm,
            "model.conv_pos_batch_norm: the reference's positional conv has weight norm",
        ),
        (
            cfg.conv_pos_depth != 1,
            "model.conv_pos_depth: the reference's positional embedding is one weight-normalised conv",
        ),
        (cfg.crop_seq_to_multiple != 1, "model.crop_seq_to_multiple: the reference never crops frames"),
        (
            cfg.relative_position_buckets > 0
            and cfg.attention_head_dim * cfg.relative_position_heads != cfg.encoder_embed_dim,
            "model.attention_head_dim: a WavLM-style reference file has heads of encoder_embed_dim // "
            "total heads",
        ),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"cannot write the reference format: {why}")


def reference_config(model: DPHuBERTModel, conv: Sequence[Tuple[int, int, int]]) -> Dict[str, Any]:
    """The reference builder's keyword arguments for ``model`` with CNN ``conv`` (HuBERT / wav2vec2 style;
    ``_wavlm_config`` turns them into WavLM's)."""
    cfg = model.cfg
    use_attention = [bool(u) for u in cfg.use_attention]
    use_ffn = [bool(u) for u in cfg.use_ffn]
    config = {
        "extractor_mode": "group_norm" if cfg.extractor_mode == "default" else "layer_norm",
        "extractor_conv_layer_config": [tuple(c) for c in conv],
        "extractor_conv_bias": bool(cfg.conv_bias),
        "encoder_embed_dim": int(cfg.encoder_embed_dim),
        "encoder_projection_dropout": float(cfg.dropout_input),
        "encoder_pos_conv_kernel": int(cfg.conv_pos),
        "encoder_pos_conv_groups": int(cfg.conv_pos_groups),
        "encoder_num_layers": int(cfg.encoder_layers),
        "encoder_use_attention": use_attention,
        "encoder_use_feed_forward": use_ffn,
        "encoder_num_heads": [int(h) if u else 0 for h, u in zip(cfg.encoder_attention_heads, use_attention)],
        "encoder_head_dim": int(cfg.attention_head_dim),
        "encoder_attention_dropout": float(cfg.attention_dropout),
        "encoder_ff_interm_features": [
            int(f) if u else 0 for f, u in zip(cfg.encoder_ffn_embed_dims, use_ffn)
        ],
        "encoder_ff_interm_dropout": float(cfg.activation_dropout),
        "encoder_dropout": float(cfg.dropout),
        "encoder_layer_norm_first": bool(cfg.layer_norm_first),
        "encoder_layer_drop": float(cfg.encoder_layerdrop),
        "aux_num_out": None,
        "normalize_waveform": bool(cfg.normalize),
    }
    config.update({flag: False for flag in PRUNE_FLAGS})
    return config


class _Writer:
    """Collects the file's tensors; counts those that hold no weight of the model (fillers)."""

    def __init__(self) -> None:
        self.state: Dict[str, torch.Tensor] = {}
        self.filler = 0

    def put(self, name: str, value: torch.Tensor, filler: int = 0) -> None:
        self.state[name] = value.detach().cpu().clone()
        self.filler += filler

    def fill(self, name: str, value: torch.Tensor) -> None:
        self.put(name, value, value.numel())


def _write_front_end(
    model: DPHuBERTModel, out: _Writer, layout: str
) -> Tuple[List[Tuple[int, int, int]], List[str]]:
    """CNN, dummy weight, feature LayerNorm, projection. Returns the CNN config and the inexact parts."""
    cfg, norm = model.cfg, model.layer_norm
    conv = [list(c) for c in parse_conv_layers(cfg.conv_feature_layers)]
    removed = norm.removed_channels
    phantom = removed if layout == "exact" else 0
    inexact: List[str] = []
    blocks = model.feature_extractor.blocks
    last = len(blocks) - 1
    dtype = norm.weight.dtype
    scale = norm.channel_scale if norm.channel_scale is not None else torch.ones_like(norm.weight)
    out.put(_FE + "dummy_weight", torch.cat([scale, scale.new_zeros(phantom)]), filler=phantom)
    for i, block in enumerate(blocks):
        prefix = f"{_FE}conv_layers.{i}."
        extra = phantom if i == last else 0
        if block.norm is not None:
            for part in ("weight", "bias"):
                value = getattr(block.norm, part)
                out.put(
                    prefix + "layer_norm." + part, torch.cat([value, value.new_zeros(extra)]), filler=extra
                )
        weight = block.conv.weight
        out.put(
            prefix + "conv.weight",
            torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]),
            extra * weight[0].numel(),
        )
        if block.conv.bias is not None:
            bias = block.conv.bias
            out.put(prefix + "conv.bias", torch.cat([bias, bias.new_zeros(extra)]), filler=extra)
        conv[i][0] += extra
    if phantom and blocks[last].norm_kind == "layer":
        inexact.append(
            f"feature_extractor.conv_layers.{last}: its LayerNorm normalises over the {phantom} zero "
            "channels that stand for the removed ones, too"
        )
    # the phantom channels are exact zeros in the feature LayerNorm; the first carries -mean/std (gamma 1) to
    # the extra projection column, the others output 0 (gamma 0, beta 0)
    gamma = torch.zeros(phantom, dtype=dtype)
    if phantom:
        gamma[0] = 1.0
    out.put(_PROJ + "layer_norm.weight", torch.cat([norm.weight, gamma.to(norm.weight)]), filler=phantom)
    out.put(_PROJ + "layer_norm.bias", torch.cat([norm.bias, norm.bias.new_zeros(phantom)]), filler=phantom)
    proj = model.post_extract_proj
    dim = cfg.encoder_embed_dim
    if proj is None:  # fairseq leaves it out when C == D; the reference always projects: the identity
        out.fill(_PROJ + "projection.weight", torch.eye(dim, dtype=dtype))
        out.fill(_PROJ + "projection.bias", torch.zeros(dim, dtype=dtype))
    else:
        weight = proj.weight[:, : norm.channels]
        if phantom:
            carrier = proj.weight[:, norm.channels :]
            weight = torch.cat([weight, carrier, carrier.new_zeros(dim, phantom - 1)], dim=1)
            out.filler += dim * (phantom - 1)
        out.put(_PROJ + "projection.weight", weight)
        out.put(_PROJ + "projection.bias", proj.bias)
    if removed and not phantom:
        inexact.append(
            f"feature LayerNorm: the model normalises over {norm.channels} kept and {removed} removed (zero) "
            f"CNN channels and feeds the removed ones' share to the projection; the file normalises over the "
            f"{norm.channels} kept ones only (layout 'compact')"
        )
    return [tuple(c) for c in conv], inexact


def _write_encoder(model: DPHuBERTModel, out: _Writer, config: Dict[str, Any]) -> List[str]:
    """Positional conv, encoder LayerNorm, layers (and WavLM's table and gates). Returns notes."""
    cfg, encoder = model.cfg, model.encoder
    notes: List[str] = []
    for part in ("bias", "weight_g", "weight_v"):
        out.put(_TR + "pos_conv_embed.conv." + part, getattr(encoder.pos_conv[0], part))
    out.put(_TR + "layer_norm.weight", encoder.layer_norm.weight)
    out.put(_TR + "layer_norm.bias", encoder.layer_norm.bias)
    table = encoder.relative_attention_bias
    wavlm = table is not None
    dim, like = cfg.encoder_embed_dim, encoder.layer_norm.weight
    if wavlm:
        notes += _wavlm_config(model, config)
    for i, layer in enumerate(encoder.layers):
        prefix = f"{_TR}layers.{i}."
        attn = layer.self_attn
        if attn is not None:
            a = prefix + "attention."
            if wavlm:
                _write_wavlm_gates(attn, a, out, cfg.relative_position_heads)
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                out.put(a + name + ".weight", getattr(attn, name).weight)
                out.put(a + name + ".bias", getattr(attn, name).bias)
            if wavlm and i == 0:
                out.put(a + "rel_attn_embed.weight", table.weight)
        elif wavlm and i == 0 and config["encoder_use_attention"][0]:
            _write_empty_wavlm_attention(prefix + "attention.", out, cfg, table.weight)
        for ours, theirs, present in (
            (layer.self_attn_layer_norm, "layer_norm", attn is not None),
            (layer.final_layer_norm, "final_layer_norm", layer.ffn is not None),
        ):
            if ours is not None:
                out.put(prefix + theirs + ".weight", ours.weight)
                out.put(prefix + theirs + ".bias", ours.bias)
            else:  # a pre-LN LayerNorm of a removed block: the reference keeps one, unused
                out.fill(prefix + theirs + ".weight", torch.ones(dim, dtype=like.dtype))
                out.fill(prefix + theirs + ".bias", torch.zeros(dim, dtype=like.dtype))
        if layer.ffn is not None:
            f = prefix + "feed_forward."
            out.put(f + "intermediate_dense.weight", layer.ffn.fc1.weight)
            out.put(f + "intermediate_dense.bias", layer.ffn.fc1.bias)
            out.put(f + "output_dense.weight", layer.ffn.fc2.weight)
            out.put(f + "output_dense.bias", layer.ffn.fc2.bias)
    return notes


def _wavlm_config(model: DPHuBERTModel, config: Dict[str, Any]) -> List[str]:
    """Turn ``config`` into the WavLM style (in place, in the builder's key order). Returns notes."""
    cfg = model.cfg
    total = int(cfg.relative_position_heads)
    layers = model.encoder.layers
    remaining = [
        [int(h) for h in layer.self_attn.head_index.tolist()] if layer.self_attn is not None else []
        for layer in layers
    ]
    use_attention = list(config["encoder_use_attention"])
    notes = []
    if not use_attention[0] and any(use_attention):
        use_attention[0] = True  # an empty attention block in layer 0 holds the table (see the module's doc)
        notes.append(
            "layer 0 has no attention block; the file gives it an empty one (0 heads, zero output) to hold "
            "the relative position table, which the reference keeps in layer 0"
        )
    if not any(use_attention):
        notes.append("no layer has an attention block: the relative position table is left out (unused)")
    if not cfg.gru_rel_pos:
        notes.append(
            "gru_rel_pos is off: the file's bias gates are set to be exactly 1 (zero linear, constant -2)"
        )
    items = []
    for key, value in config.items():
        if key == "encoder_num_heads":
            items += [
                ("encoder_total_num_heads", [total] * len(layers)),
                ("encoder_remaining_heads", remaining),
                ("encoder_num_buckets", int(cfg.relative_position_buckets)),
                ("encoder_max_distance", int(cfg.relative_position_max_distance)),
            ]
        elif key == "encoder_head_dim":
            continue
        elif key == "encoder_use_attention":
            items.append((key, use_attention))
        else:
            items.append((key, value))
    config.clear()
    config.update(items)
    return notes


def _write_wavlm_gates(attn, prefix: str, out: _Writer, total: int) -> None:
    """``gru_rel_pos_const`` over all teacher heads (the kept ones' ``grep_a`` at their indices) and the gate
    linear; without gates (``gru_rel_pos`` off), gates that are exactly 1."""
    head_dim = attn.embed_dim // total
    like = attn.out_proj.bias
    if attn.grep_linear is not None:
        const = torch.ones(1, total, 1, 1, dtype=like.dtype)
        const[:, attn.head_index.cpu()] = attn.grep_a.detach().cpu()
        out.put(prefix + "gru_rel_pos_const", const, filler=total - attn.num_heads)
        out.put(prefix + "gru_rel_pos_linear.weight", attn.grep_linear.weight)
        out.put(prefix + "gru_rel_pos_linear.bias", attn.grep_linear.bias)
    else:
        out.fill(
            prefix + "gru_rel_pos_const", torch.full((1, total, 1, 1), NEUTRAL_GATE_CONST, dtype=like.dtype)
        )
        out.fill(prefix + "gru_rel_pos_linear.weight", torch.zeros(8, head_dim, dtype=like.dtype))
        out.fill(prefix + "gru_rel_pos_linear.bias", torch.zeros(8, dtype=like.dtype))


def _write_empty_wavlm_attention(prefix: str, out: _Writer, cfg: DPHuBERTConfig, table: torch.Tensor) -> None:
    """Layer 0's stand-in attention: 0 heads, zero output bias, neutral gates, and the bias table."""
    dim, total = cfg.encoder_embed_dim, cfg.relative_position_heads
    dtype = table.dtype
    out.fill(prefix + "gru_rel_pos_const", torch.full((1, total, 1, 1), NEUTRAL_GATE_CONST, dtype=dtype))
    for name in ("k_proj", "v_proj", "q_proj"):
        out.put(prefix + name + ".weight", torch.zeros(0, dim, dtype=dtype))
        out.put(prefix + name + ".bias", torch.zeros(0, dtype=dtype))
    out.put(prefix + "out_proj.weight", torch.zeros(dim, 0, dtype=dtype))
    out.fill(prefix + "out_proj.bias", torch.zeros(dim, dtype=dtype))
    out.put(prefix + "rel_attn_embed.weight", table)
    out.fill(prefix + "gru_rel_pos_linear.weight", torch.zeros(8, dim // total, dtype=dtype))
    out.fill(prefix + "gru_rel_pos_linear.bias", torch.zeros(8, dtype=dtype))


def _convention_notes(model: DPHuBERTModel) -> List[str]:
    cfg = model.cfg
    notes = []
    if cfg.frame_padding == "hubert":
        notes.append(
            "frame padding: the model masks frames HuBERT's way, the reference by conv output length; on "
            "padded batches the last frame or two of a padded utterance can differ (unpadded input: no "
            "difference)"
        )
    if cfg.normalize:
        notes.append(
            "normalize_waveform is set: the reference model normalises each waveform itself; give it raw "
            "audio"
        )
    if cfg.sample_rate != 16000:
        notes.append(f"the model expects {cfg.sample_rate} Hz audio; the reference format does not record it")
    return notes


def _order_like(state: Dict[str, torch.Tensor], layout: Dict[str, Shape]) -> Dict[str, torch.Tensor]:
    """``state`` in the reference's ``state_dict()`` order, after checking that it matches ``layout``."""
    if set(state) != set(layout):
        raise RuntimeError(
            f"reference export: names differ from the builder's: missing "
            f"{sorted(set(layout) - set(state))[:3]}, extra {sorted(set(state) - set(layout))[:3]}"
        )
    for key, shape in layout.items():
        if tuple(state[key].shape) != shape:
            raise RuntimeError(
                f"reference export: {key} has shape {tuple(state[key].shape)}, the builder's {shape}"
            )
    return {key: state[key] for key in layout}


@torch.no_grad()
def reference_from_model(
    model: DPHuBERTModel,
    layout: str = "exact",
    verify: bool = True,
    probe: Optional[torch.Tensor] = None,
) -> Tuple[Dict[str, Any], ReferenceExportReport]:
    """``({"state_dict", "config"}, report)``: an ungated (pruned) ``dphubert`` model in the reference's
    format, which the reference builder loads with ``strict=True``.

    ``layout``: 'exact' (default) writes CNN channels our feature LayerNorm keeps as phantom zeros as
    zero-weight channels with ``dummy_weight`` 0; 'compact' drops them (the reference's own layout, not
    exact).
    With ``verify`` the file is run the reference's way (``model_from_reference``) on ``probe`` (default: the
    probe of ``pruning.prune``) and the max abs hidden-state deviation from ``model`` is measured.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    _check_writable(model)
    out = _Writer()
    conv, inexact = _write_front_end(model, out, layout)
    config = reference_config(model, conv)
    notes = _write_encoder(model, out, config) + _convention_notes(model)
    obj = {"state_dict": _order_like(out.state, reference_layout(config)), "config": config}
    deviation = None
    if verify:
        was_training = model.training
        model.eval()
        try:
            reference = next(model.parameters())
            # channel for channel, as the reference runs it (no folding of the zero channels back)
            written = model_from_reference(obj, name="the written file", fold_zero_channels=False)
            written = written.to(device=reference.device, dtype=reference.dtype)
            source = probe if probe is not None else probe_input(model)
            deviation = max_hidden_state_deviation(model, written, source)
        finally:
            model.train(was_training)
    report = ReferenceExportReport(
        layout=layout,
        exact=not inexact,
        inexact_parts=inexact,
        max_abs_deviation=deviation,
        probe="given input" if probe is not None else "2 x 1 s of seeded unit-variance noise",
        filler_params=out.filler,
        notes=notes,
    )
    for line in report.lines():
        (logger.warning if line.startswith("reference format") and not report.exact else logger.info)(
            "%s", line
        )
    return obj, report


def save_reference(obj: Dict[str, Any], path: str) -> str:
    """Write a reference-format dict with ``torch.save`` (atomically). Returns the path."""
    atomic_torch_save(obj, str(path))
    return str(path)
