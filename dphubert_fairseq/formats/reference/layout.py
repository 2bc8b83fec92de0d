"""The reference implementation's file layout (the paper's, torchaudio-based): the config keys its builder
takes, the state-dict names and shapes a config makes, and the config facts that reading and writing share.

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
"""

from typing import Any, Dict, List, Tuple

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
