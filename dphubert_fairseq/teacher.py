"""Native fairseq teachers (HuBERT, wav2vec2): loading, their architecture as a ``DPHuBERTConfig``, and their
hidden states exactly as the distillation uses them."""

import hashlib
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq import checkpoint_utils, utils
from fairseq.models.hubert.hubert import HubertModel
from fairseq.models.wav2vec.wav2vec2 import (
    ConformerEncoder,
    TransformerEncoder,
    TransformerSentenceEncoderLayer,
    Wav2Vec2Model,
)

from .checkpoint_kind import SUPPORTED_TEXT, read_teacher_checkpoint
from .conv_spec import format_conv_layers
from .errors import CheckpointError, UnsupportedTeacherError
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel, wav2vec2_frame_padding
from .param_count import config_params


def _activation_name(fn) -> str:
    for name in utils.get_available_activation_fns():
        if name != "linear" and utils.get_activation_fn(name) is fn:
            return name
    raise UnsupportedTeacherError(f"unknown activation function {fn!r}")


def config_from_fairseq(model: nn.Module, task_cfg=None) -> DPHuBERTConfig:
    """The architecture of a fairseq HubertModel / Wav2Vec2Model as a ``DPHuBERTConfig`` (no gates).

    Read from the modules themselves, so it works however the model was built; the input conventions
    (normalisation, sample rate) come from the task config when given.
    """
    if not isinstance(model, (HubertModel, Wav2Vec2Model)):
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
    if len(convs) != 1:
        raise UnsupportedTeacherError(
            f"a positional convolution of depth {len(convs)} is not supported; {SUPPORTED_TEXT}"
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


def load_teacher_and_config(path: str) -> Tuple[nn.Module, DPHuBERTConfig]:
    """Load a native fairseq HuBERT / wav2vec2 checkpoint: the model in eval mode and its architecture."""
    path = str(path)
    state = read_teacher_checkpoint(path)
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0]
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
    if not isinstance(teacher, (HubertModel, Wav2Vec2Model)):
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
