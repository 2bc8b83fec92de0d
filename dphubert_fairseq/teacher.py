"""Teachers: native fairseq HuBERT / wav2vec2 and WavLM checkpoints as released. Loading, their architecture
as a ``DPHuBERTConfig``, their weights under the ``dphubert`` model's names, and their hidden states exactly
as the distillation uses them.

fairseq has no WavLM: a WavLM teacher is loaded as an ungated ``dphubert`` model with WavLM's relative
position bias (``models/prunable_wavlm_attention.py``), whose parity with WavLM's own code is tested.
"""

import hashlib
import importlib
import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq import checkpoint_utils, utils
from fairseq.models import MODEL_REGISTRY
from fairseq.models.hubert.hubert import HubertModel
from fairseq.models.wav2vec.wav2vec2 import (
    ConformerEncoder,
    TransformerEncoder,
    TransformerSentenceEncoderLayer,
    Wav2Vec2Model,
)

from .checkpoint_kind import (
    DATA2VEC_AUDIO,
    SUPPORTED_TEXT,
    WAVLM,
    checkpoint_model_name,
    read_teacher_checkpoint,
)
from .conv_spec import format_conv_layers, parse_conv_layers
from .errors import CheckpointError, UnsupportedTeacherError
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel, as_config, wav2vec2_frame_padding
from .param_count import config_params

# fairseq / WavLM state-dict name -> dphubert name; names matching no rule keep theirs, and those the dphubert
# model lacks are the teacher's pretraining-only parts (final_proj, label_embs_concat, quantizer, ...)
_RENAMES = [
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.conv.\2",
    ),
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.norm.\2",
    ),
    (
        re.compile(r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$"),
        r"feature_extractor.blocks.\1.norm.\2",
    ),
    (re.compile(r"^encoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.ffn.\2.\3"),
    (re.compile(r"^mask_emb$"), "masking.mask_emb"),
    # WavLM keeps its bias table in layer 0's attention; the dphubert encoder holds it for every layer
    (
        re.compile(r"^encoder\.layers\.0\.self_attn\.relative_attention_bias\.weight$"),
        "encoder.relative_attention_bias.weight",
    ),
]


def dphubert_state(teacher_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A fairseq HuBERT / wav2vec2 or a WavLM state dict under the dphubert model's names."""
    out = {}
    for name, value in teacher_state.items():
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                name = pattern.sub(replacement, name)
                break
        out[name] = value
    return out


def is_data2vec_audio(model: nn.Module) -> bool:
    """Whether ``model`` is fairseq's data2vec audio model (never true before ``import_data2vec`` registered
    it, so nothing imports fairseq's examples needlessly)."""
    registered = MODEL_REGISTRY.get("data2vec_audio")
    return registered is not None and isinstance(model, registered)


def is_native_teacher(model: nn.Module) -> bool:
    """Whether ``model`` is a fairseq model the plugin copies: HuBERT, wav2vec2, data2vec audio."""
    return isinstance(model, (HubertModel, Wav2Vec2Model)) or is_data2vec_audio(model)


def import_data2vec() -> None:
    """Register fairseq's data2vec audio model. fairseq ships it as an example, meant to be loaded with
    ``--user-dir examples/data2vec``, which also imports the example's image task and with it torchvision;
    the audio model's own module needs neither (and costs seconds to import, so only data2vec checkpoints
    do)."""
    importlib.import_module("fairseq.examples.data2vec.models.data2vec_audio")


def _activation_name(fn) -> str:
    for name in utils.get_available_activation_fns():
        if name != "linear" and utils.get_activation_fn(name) is fn:
            return name
    raise UnsupportedTeacherError(f"unknown activation function {fn!r}")


def config_from_fairseq(model: nn.Module, task_cfg=None) -> DPHuBERTConfig:
    """The architecture of a fairseq HubertModel / Wav2Vec2Model as a ``DPHuBERTConfig`` (no gates); of an
    ungated ``dphubert`` model (a loaded WavLM teacher), its own config.

    Read from the modules themselves, so it works however the model was built; the input conventions
    (normalisation, sample rate) come from the task config when given.
    """
    if isinstance(model, DPHuBERTModel):  # a WavLM teacher, or any ungated dphubert model
        if model.gates():
            raise UnsupportedTeacherError("a gated dphubert model is a student in training, not a teacher")
        return as_config(model.cfg)
    if not is_native_teacher(model):
        raise UnsupportedTeacherError(f"model type {type(model).__name__} is not supported; {SUPPORTED_TEXT}")
    if getattr(model, "input_quantizer", None) is not None:
        raise UnsupportedTeacherError(f"wav2vec2 with quantize_input is not supported; {SUPPORTED_TEXT}")
    encoder = model.encoder
    if type(encoder) is not TransformerEncoder or isinstance(encoder, ConformerEncoder):
        raise UnsupportedTeacherError(f"encoder {type(encoder).__name__} is not supported; {SUPPORTED_TEXT}")
    layers = list(encoder.layers)
    for layer in layers:
        if type(layer) is not TransformerSentenceEncoderLayer:
            raise UnsupportedTeacherError(
                f"layer type {type(layer).__name__} is not supported; {SUPPORTED_TEXT}"
            )
    pos_conv = encoder.pos_conv
    convs = [m for m in pos_conv.modules() if isinstance(m, nn.Conv1d)]
    if len(convs) > 1 and not is_data2vec_audio(model):
        raise UnsupportedTeacherError(
            f"a positional convolution of depth {len(convs)} outside data2vec is not supported; {SUPPORTED_TEXT}"
        )

    blocks = list(model.feature_extractor.conv_layers)
    conv_layers = [(b[0].out_channels, b[0].kernel_size[0], b[0].stride[0]) for b in blocks]
    layer_norm_extractor = any(isinstance(m, nn.LayerNorm) for b in blocks for m in b.modules())
    embed_dim = encoder.embedding_dim
    heads = layers[0].self_attn.num_heads
    return DPHuBERTConfig(
        _name="dphubert",
        extractor_mode="layer_norm" if layer_norm_extractor else "default",
        conv_feature_layers=format_conv_layers(conv_layers),
        conv_bias=blocks[0][0].bias is not None,
        encoder_layers=len(layers),
        encoder_embed_dim=embed_dim,
        attention_head_dim=embed_dim // heads,
        encoder_attention_heads=[layer.self_attn.num_heads for layer in layers],
        encoder_ffn_embed_dims=[layer.fc1.out_features for layer in layers],
        use_attention=[1] * len(layers),
        use_ffn=[1] * len(layers),
        layer_norm_first=encoder.layer_norm_first,
        activation_fn=_activation_name(layers[0].activation_fn),
        conv_pos=convs[0].kernel_size[0],
        conv_pos_groups=convs[0].groups,
        conv_pos_depth=len(convs),
        conv_pos_batch_norm=isinstance(pos_conv[0], nn.BatchNorm1d),
        post_extract_proj=model.post_extract_proj is not None,
        dropout=encoder.dropout,
        attention_dropout=layers[0].self_attn.dropout_module.p,
        activation_dropout=layers[0].dropout2.p,
        dropout_input=model.dropout_input.p,
        feature_grad_mult=1.0,
        frame_padding="hubert" if isinstance(model, HubertModel) else "wav2vec2",
        crop_seq_to_multiple=getattr(model, "crop_seq_to_multiple", 1),
        normalize=bool(getattr(task_cfg, "normalize", False)) if task_cfg is not None else False,
        sample_rate=int(getattr(task_cfg, "sample_rate", 16000)) if task_cfg is not None else 16000,
    )


#: WavLM's documented config defaults, for keys a checkpoint's config leaves out.
WAVLM_DEFAULTS: Dict[str, Any] = {
    "extractor_mode": "default",
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "normalize": False,
}


def config_from_wavlm(wavlm_cfg: Dict[str, Any]) -> DPHuBERTConfig:
    """The architecture of a WavLM checkpoint's config (a flat dict, as WavLM's release writes it) as a
    ``DPHuBERTConfig`` (no gates)."""
    c = dict(WAVLM_DEFAULTS, **{k: v for k, v in wavlm_cfg.items() if v is not None})
    if c["activation_fn"] not in utils.get_available_activation_fns() or c["activation_fn"] == "glu":
        raise UnsupportedTeacherError(
            f"WavLM with activation_fn {c['activation_fn']!r} is not supported; {SUPPORTED_TEXT}"
        )
    layers, dim, heads = (
        int(c["encoder_layers"]),
        int(c["encoder_embed_dim"]),
        int(c["encoder_attention_heads"]),
    )
    channels = parse_conv_layers(c["conv_feature_layers"])[-1][0]
    relative = bool(c["relative_position_embedding"])
    return DPHuBERTConfig(
        _name="dphubert",
        extractor_mode=c["extractor_mode"],
        conv_feature_layers=format_conv_layers(parse_conv_layers(c["conv_feature_layers"])),
        conv_bias=bool(c["conv_bias"]),
        encoder_layers=layers,
        encoder_embed_dim=dim,
        attention_head_dim=dim // heads,
        encoder_attention_heads=[heads] * layers,
        encoder_ffn_embed_dims=[int(c["encoder_ffn_embed_dim"])] * layers,
        use_attention=[1] * layers,
        use_ffn=[1] * layers,
        layer_norm_first=bool(c["layer_norm_first"]),
        activation_fn=c["activation_fn"],
        conv_pos=int(c["conv_pos"]),
        conv_pos_groups=int(c["conv_pos_groups"]),
        relative_position_buckets=int(c["num_buckets"]) if relative else 0,
        relative_position_max_distance=int(c["max_distance"]),
        relative_position_heads=heads if relative else 0,
        gru_rel_pos=bool(c["gru_rel_pos"]),
        post_extract_proj=channels != dim,
        dropout=float(c["dropout"]),
        attention_dropout=float(c["attention_dropout"]),
        activation_dropout=float(c["activation_dropout"]),
        dropout_input=float(c["dropout_input"]),
        feature_grad_mult=1.0,
        frame_padding="hubert",  # WavLM derives frame padding as HuBERT does
        normalize=bool(c["normalize"]),
        sample_rate=16000,
    )


def wavlm_teacher(state: Dict[str, Any]) -> Tuple[DPHuBERTModel, DPHuBERTConfig]:
    """An ungated ``dphubert`` model computing what the WavLM checkpoint ``state`` (loaded) computes."""
    config = config_from_wavlm(state["cfg"])
    model = DPHuBERTModel(config)
    weights = dphubert_state(state["model"])
    own = model.state_dict()
    for i in range(config.encoder_layers):  # WavLM's rescale_init variant has no k_proj bias: it is zero
        name = f"encoder.layers.{i}.self_attn.k_proj.bias"
        weights.setdefault(name, torch.zeros_like(own[name]))
    # names outside the encoder's modules are pretraining-only parts (final_proj, label embeddings, ...)
    modules = {name.split(".")[0] for name in own}
    unexpected = [k for k in weights if k not in own and k.split(".")[0] in modules]
    missing = [k for k in own if k not in weights and not k.endswith("head_index")]
    misshapen = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if unexpected or missing or misshapen:
        if unexpected or missing:
            what = f"unexpected weights {unexpected[:3]}" if unexpected else f"missing weights {missing[:3]}"
        else:
            name = misshapen[0]
            what = f"{name} has shape {tuple(weights[name].shape)}, the config needs {tuple(own[name].shape)}"
        raise UnsupportedTeacherError(f"not the WavLM its config describes: {what}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return model, config


def load_teacher_and_config(path: str) -> Tuple[nn.Module, DPHuBERTConfig]:
    """Load a teacher checkpoint (native fairseq HuBERT / wav2vec2, or WavLM as released): the model in eval
    mode and its architecture."""
    path = str(path)
    state = read_teacher_checkpoint(path)
    if checkpoint_model_name(state) == DATA2VEC_AUDIO:
        import_data2vec()
        # fairseq's loader sets the update count before loading, which makes data2vec build its EMA copy of
        # the encoder and then require it in the file; a teacher needs neither, and a file saved without it
        # would fail on a bare assertion
        state["model"].pop("_ema", None)
        state["optimizer_history"][-1].pop("num_updates", None)
    if checkpoint_model_name(state) == WAVLM:
        try:
            model, config = wavlm_teacher(state)
        except (UnsupportedTeacherError, ValueError, KeyError, SyntaxError) as err:
            raise CheckpointError(f"{path}: WavLM checkpoint: {err}") from None
        return model.eval(), config
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
    if is_data2vec_audio(model):
        model.remove_pretraining_modules()  # final_proj teaches nothing
    try:
        config = config_from_fairseq(model, cfg.task)
    except UnsupportedTeacherError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model.eval(), config


def count_params(model: nn.Module) -> int:
    """Counted parameters (``param_count`` convention) of a ``dphubert`` model or a fairseq HubertModel /
    Wav2Vec2Model."""
    if hasattr(model, "num_params"):
        return model.num_params()
    return config_params(config_from_fairseq(model))


def teacher_identity(model: nn.Module) -> str:
    """``"HubertModel sha256:<hex>"``: the model's class and a SHA-256 of its state dict (every entry's name,
    dtype, shape and bytes, in order). Two loads of one checkpoint give the same identity; a different
    architecture or any changed weight gives another."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return f"{type(model).__name__} sha256:{digest.hexdigest()}"


def load_teacher(path: str) -> nn.Module:
    """The native fairseq model of a HuBERT / wav2vec2 checkpoint, in eval mode."""
    return load_teacher_and_config(path)[0]


def teacher_hidden_states(
    teacher: nn.Module,
    source: torch.Tensor,
    padding_mask: Optional[torch.Tensor] = None,
    num_layers: Optional[int] = None,
) -> List[torch.Tensor]:
    """``[h_0, ..., h_L]`` of a fairseq HubertModel / Wav2Vec2Model (or a dphubert model), each ``(B, T, D)``.

    Runs fairseq's own modules: the front end as ``forward`` does (conv features, LayerNorm, frame padding
    mask, projection, input dropout: that is h_0), then ``encoder`` whose per-layer results are h_1..h_L.
    ``num_layers``: stop after that many transformer layers (``[h_0, ..., h_num_layers]``), as fairseq's
    encoder does for its ``layer`` argument; the distillation never needs layers above its last target.
    """
    if isinstance(teacher, DPHuBERTModel):
        states = teacher.hidden_states(source, padding_mask)
        return states if num_layers is None else states[: num_layers + 1]
    if not is_native_teacher(teacher):
        raise TypeError(f"unsupported teacher {type(teacher).__name__}; {SUPPORTED_TEXT}")
    features = teacher.feature_extractor(source).transpose(1, 2)
    features = teacher.layer_norm(features)
    if padding_mask is not None:
        if isinstance(teacher, HubertModel):
            padding_mask = teacher.forward_padding_mask(features, padding_mask)
        else:
            padding_mask = wav2vec2_frame_padding(
                padding_mask, features.size(1), teacher._get_feat_extract_output_lengths
            )
    drop = features.size(1) % getattr(teacher, "crop_seq_to_multiple", 1)
    if drop:
        features = features[:, :-drop]
        padding_mask = padding_mask[:, :-drop] if padding_mask is not None else None
    if teacher.post_extract_proj is not None:
        features = teacher.post_extract_proj(features)
    h0 = teacher.dropout_input(features)
    total = len(teacher.encoder.layers)
    num_layers = total if num_layers is None else min(num_layers, total)
    if num_layers == 0:
        return [h0]
    # the encoder zeroes padded frames of its input in place; h_0 is the tensor before that
    _, layer_results = teacher.encoder(
        h0.clone() if padding_mask is not None else h0,
        padding_mask,
        layer=None if num_layers == total else num_layers - 1,
    )
    if len(layer_results) != num_layers:
        raise RuntimeError("teacher layers were dropped (layerdrop): run the teacher in eval mode")
    return [h0] + [result[0].transpose(0, 1) for result in layer_results]
