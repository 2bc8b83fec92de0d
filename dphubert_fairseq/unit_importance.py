"""How much each prunable unit weighs: the squared L2 norm of the weights that exist only for it (a head's
q/k/v rows and out_proj columns, an FFN unit's fc1 row and fc2 column, a conv channel's filter and the next
layer's input slice). Used to initialise the gates from the teacher (``model.gate_init_importance``, off by
default) and by the comparison's students, which keep units of largest magnitude.
"""

from typing import Dict, Optional

import torch
import torch.nn as nn

from .models.dphubert import DPHuBERTModel
from .models.prunable_attention import PrunableSelfAttention
from .models.prunable_ffn import PrunableFeedForward


def head_scores(attn: PrunableSelfAttention) -> torch.Tensor:
    """``(H,)``: each head's squared norm over its ``head_dim`` rows of q, k, v and columns of out_proj."""
    heads, d = attn.num_heads, attn.head_dim
    rows = sum(
        p.weight.detach().float().view(heads, d, -1).pow(2).sum((1, 2))
        for p in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    return rows + attn.out_proj.weight.detach().float().view(-1, heads, d).pow(2).sum((0, 2))


def ffn_scores(ffn: PrunableFeedForward) -> torch.Tensor:
    """``(F,)``: each intermediate unit's squared norm over its fc1 row and fc2 column."""
    return ffn.fc1.weight.detach().float().pow(2).sum(1) + ffn.fc2.weight.detach().float().pow(2).sum(0)


def conv_channel_scores(conv: nn.Conv1d, consumer: Optional[torch.Tensor]) -> torch.Tensor:
    """``(C,)``: each output channel's squared norm over its filter ``(C_in, K)`` and over the slice of
    ``consumer`` that reads it (the next conv's ``(C_out', C, K')`` weight or the feature projection's
    ``(D, C)``; None: nothing reads the channels in a way that is pruned with them)."""
    scores = conv.weight.detach().float().pow(2).flatten(1).sum(1)
    if consumer is not None:
        scores = scores + consumer.detach().float().transpose(0, 1).pow(2).flatten(1).sum(1)
    return scores


def unit_scores(model: DPHuBERTModel) -> Dict[str, torch.Tensor]:
    """The scores of the units behind each of ``model``'s multi-unit gates, by the gate's module path
    (``model.gates()``): conv channels, heads and FFN units; whole-layer gates have no rival to rank."""
    out: Dict[str, torch.Tensor] = {}
    blocks = model.feature_extractor.blocks
    for i, block in enumerate(blocks):
        if block.gate is not None:
            if i + 1 < len(blocks):
                consumer: Optional[torch.Tensor] = blocks[i + 1].conv.weight
            else:  # the last block is gated only when a feature projection follows it
                consumer = model.post_extract_proj.weight
            out[f"feature_extractor.blocks.{i}.gate"] = conv_channel_scores(block.conv, consumer)
    for i, layer in enumerate(model.encoder.layers):
        if getattr(layer.self_attn, "head_gate", None) is not None:
            out[f"encoder.layers.{i}.self_attn.head_gate"] = head_scores(layer.self_attn)
        if getattr(layer.ffn, "unit_gate", None) is not None:
            out[f"encoder.layers.{i}.ffn.unit_gate"] = ffn_scores(layer.ffn)
    return out


def standardised_log(scores: torch.Tensor) -> torch.Tensor:
    """``(n,)`` log-scores shifted and scaled to mean 0 and standard deviation 1 (all 0 when they are equal):
    the rank and spacing of the units within one layer, free of the layer's overall scale."""
    logs = scores.clamp_min(torch.finfo(torch.float32).tiny).log()
    std = logs.std(unbiased=False)
    return torch.zeros_like(logs) if std == 0 else (logs - logs.mean()) / std


@torch.no_grad()
def init_gates_from_importance(model: DPHuBERTModel, spread: float) -> None:
    """Add ``spread`` times each unit's ``standardised_log`` score to its gate logit, gate by gate: a layer's
    heavier units start more open, its lighter ones more closed, its mean logit stays the reference's initial
    value. ``spread`` 0 changes nothing."""
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    gates = model.gates()
    for name, scores in unit_scores(model).items():
        log_alpha = gates[name].log_alpha
        log_alpha.add_((spread * standardised_log(scores)).to(log_alpha))
