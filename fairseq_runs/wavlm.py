"""WavLM checkpoints made by WavLM's own code (s3prl's copy, installed with the plugin's "superb" extra), in
the layout WavLM's authors release: ``{"cfg": the config as a flat dict, "model": the state dict}``. Weights
are random: these are teachers for tests and examples of the mechanics, not trained models."""

import logging
from typing import Any, Dict

import torch

from . import Shape


def wavlm_config(
    shape: Shape, large_shape: bool = False, num_buckets: int = 320, max_distance: int = 800
) -> Dict[str, Any]:
    """WavLM's config for an encoder of ``shape``: Base / Base+ (post-LayerNorm, one GroupNorm in the CNN) or,
    with ``large_shape``, Large (pre-LayerNorm, LayerNorm in every conv block, conv bias, normalised input);
    gated relative position bias with ``num_buckets`` buckets up to ``max_distance`` (WavLM's: 320, 800)."""
    return {
        "encoder_layers": shape.layers,
        "encoder_embed_dim": shape.dim,
        "encoder_ffn_embed_dim": shape.ffn,
        "encoder_attention_heads": shape.heads,
        "conv_feature_layers": shape.conv,
        "conv_pos": shape.conv_pos,
        "conv_pos_groups": shape.conv_pos_groups,
        "relative_position_embedding": True,
        "num_buckets": num_buckets,
        "max_distance": max_distance,
        "gru_rel_pos": True,
        "extractor_mode": "layer_norm" if large_shape else "default",
        "layer_norm_first": large_shape,
        "conv_bias": large_shape,
        "normalize": large_shape,
    }


def build_wavlm(cfg: Dict[str, Any], seed: int = 0, perturb: float = 0.1) -> torch.nn.Module:
    """WavLM's own model for ``cfg``, its initial weights each perturbed by ``perturb`` times seeded normal
    noise (so that LayerNorms, biases and the bias gates' ``grep_a`` are not at their 1 / 0 starting values),
    in eval mode."""
    # s3prl's package import pulls in matplotlib (through tensorboard), which logs at DEBUG under the root
    # level fairseq's imports leave; WavLM logs its whole config at INFO
    for name in ("matplotlib", "s3prl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig
    except ImportError as err:
        raise ImportError(
            f"WavLM's code (s3prl) is needed to make a WavLM checkpoint: pip install -e '.[superb]' ({err})"
        ) from None
    torch.manual_seed(seed)
    model = WavLM(WavLMConfig(cfg))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * perturb)
    return model.eval()


def write_wavlm_checkpoint(path: str, cfg: Dict[str, Any], seed: int = 0) -> str:
    """``build_wavlm(cfg, seed)`` saved as WavLM's authors save their checkpoints. Returns ``path``."""
    model = build_wavlm(cfg, seed)
    torch.save({"cfg": dict(model.cfg.__dict__), "model": model.state_dict()}, path)
    return path
