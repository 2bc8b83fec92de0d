"""Reading the reference implementation's files: the checks of a file's config and state dict, and the
ungated ``dphubert`` model that computes what the file computes (``model_from_reference``), with notes on
what an import leaves out or reinterprets.

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
"""

import logging
import os
from typing import Any, Dict, List, Optional, Union

import torch

from ...conv_spec import format_conv_layers, parse_conv_layers
from ...errors import CheckpointError
from ...models.dphubert import DPHuBERTConfig, DPHuBERTModel
from ...safe_loading import read_torch_file
from .layout import (
    _FE,
    _PROJ,
    _TR,
    EXTRACTOR_MODES,
    HUBERT_ATTENTION_KEYS,
    PRUNE_FLAGS,
    WAVLM_ATTENTION_KEYS,
    _key_order,
    conv_layers_of,
    is_wavlm_config,
    layer_heads,
    reference_layout,
)

#: the package's name, as when the format was one module, so that logging set up for it still applies
logger = logging.getLogger("dphubert_fairseq.formats.reference")


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
