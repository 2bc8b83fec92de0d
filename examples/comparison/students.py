"""The baseline students, built from the teacher and written as ``dphubert`` checkpoints that stage 2
(``configs/dphubert_final.yaml`` with ``task.student_path``) distils like any exported stage-1 model:

- ``distilhubert``: DistilHuBERT's recipe, the teacher's CNN and first transformer layers, FFN width set to
  reach a parameter count (prediction heads are the criterion's, ``criterion.prediction_heads``);
- ``uniform``: every layer kept, the same number of heads and of FFN units in every layer, the units of
  largest weight magnitude;
- ``random_structure``: a given (pruned) architecture with fresh random weights;
- ``largest_in_structure``: a given (pruned) architecture filled with the teacher's units of largest magnitude
  (the ablations of DPHuBERT's structure and of the weights its gates kept).

Units are selected by slicing the teacher's weights, so a selected unit computes exactly what it computed in
the teacher; their magnitude is ``dphubert_fairseq.unit_importance``'s.
"""

import copy
from typing import Dict, List, NamedTuple, Sequence

import torch

from dphubert_fairseq import DPHuBERTModel, prune, student_from_teacher
from dphubert_fairseq.models.dphubert import as_config
from dphubert_fairseq.param_count import config_params
from dphubert_fairseq.student import load_weights
from dphubert_fairseq.teacher import config_from_fairseq, teacher_identity
from dphubert_fairseq.unit_importance import ffn_scores, head_scores, unit_scores


def teacher_as_student(teacher: torch.nn.Module) -> DPHuBERTModel:
    """The teacher as an ungated ``dphubert`` model (same weights, same outputs), marked as its student."""
    cfg = config_from_fairseq(teacher)
    cfg.prune_units = []
    cfg.teacher_params = config_params(cfg)
    cfg.teacher_identity = teacher_identity(teacher)
    return load_weights(DPHuBERTModel(cfg), teacher).eval()


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in their original order."""
    return torch.sort(torch.topk(scores, k).indices).values


def select_units(
    model: DPHuBERTModel, layers: Sequence[int], heads: Sequence[int], ffn_dims: Sequence[int]
) -> DPHuBERTModel:
    """A new model with the transformer layers ``layers`` of ``model`` (in order), keeping in each the
    ``heads[i]`` heads and ``ffn_dims[i]`` FFN units of largest magnitude; everything else copied."""
    cfg = copy.deepcopy(as_config(model.cfg))
    d = cfg.attention_head_dim
    for name, sizes, have in (
        ("heads", heads, [cfg.encoder_attention_heads[i] for i in layers]),
        ("ffn_dims", ffn_dims, [cfg.encoder_ffn_embed_dims[i] for i in layers]),
    ):
        if any(not 1 <= k <= n for k, n in zip(sizes, have)):
            raise ValueError(f"{name} {list(sizes)}: each must be between 1 and the layer's {have}")
    cfg.encoder_layers = len(layers)
    cfg.encoder_attention_heads = list(heads)
    cfg.encoder_ffn_embed_dims = list(ffn_dims)
    cfg.use_attention = [cfg.use_attention[i] for i in layers]
    cfg.use_ffn = [cfg.use_ffn[i] for i in layers]
    source = model.state_dict()
    state = {k: v for k, v in source.items() if not k.startswith("encoder.layers.")}
    for new, old in enumerate(layers):
        layer = model.encoder.layers[old]
        head_idx = _top(head_scores(layer.self_attn), heads[new])
        rows = (head_idx[:, None] * d + torch.arange(d)).reshape(-1)
        units = _top(ffn_scores(layer.ffn), ffn_dims[new])
        for key, value in source.items():
            prefix = f"encoder.layers.{old}."
            if not key.startswith(prefix):
                continue
            part = key[len(prefix) :]
            if part.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                value = value[rows]
            elif part == "self_attn.out_proj.weight":
                value = value[:, rows]
            elif part.startswith("ffn.fc1."):
                value = value[units]
            elif part == "ffn.fc2.weight":
                value = value[:, units]
            state[f"encoder.layers.{new}.{part}"] = value.clone()
    out = DPHuBERTModel(cfg)
    out.load_state_dict(state, strict=True)
    return out.eval()


def _spread(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` near-equal integers (the first ones one larger)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sized(cfg, layers: int, heads: List[int], ffn_dims: List[int]) -> int:
    cfg = copy.deepcopy(cfg)
    cfg.encoder_layers = layers
    cfg.encoder_attention_heads, cfg.encoder_ffn_embed_dims = heads, ffn_dims
    cfg.use_attention, cfg.use_ffn = [1] * layers, [1] * layers
    return config_params(cfg)


def _ffn_total_for(cfg, layers: int, heads: List[int], target: int, limit: int) -> int:
    """The total FFN units (spread evenly over ``layers``) whose parameter count is closest to ``target``."""
    lo, hi = layers, layers * limit
    while lo < hi:  # smallest total reaching the target
        mid = (lo + hi) // 2
        if _sized(cfg, layers, heads, _spread(mid, layers)) < target:
            lo = mid + 1
        else:
            hi = mid
    best = min(
        (max(layers, lo - 1), lo),
        key=lambda n: abs(_sized(cfg, layers, heads, _spread(n, layers)) - target),
    )
    return best


class UniformCut(NamedTuple):
    """A uniform cut of an architecture: per layer the heads and FFN units kept, the CNN whole."""

    heads: List[int]
    ffn_dims: List[int]
    params: int


def uniform_cut(cfg, target_params: int) -> UniformCut:
    """Architecture ``cfg`` cut uniformly to ``target_params``: every layer kept with the same heads and FFN
    units (up to one unit), the CNN whole. The fraction ``f`` whose ``round(H f)`` heads (at least 1) and
    ``round(F f)`` FFN units per layer come closest to the count; the FFN units are then adjusted to make it up
    within one unit."""
    cfg = as_config(cfg)
    layers, full_heads = cfg.encoder_layers, cfg.encoder_attention_heads[0]
    full_ffn = cfg.encoder_ffn_embed_dims[0]
    fraction = min(
        (f / 1000 for f in range(1, 1001)),
        key=lambda f: abs(
            _sized(
                cfg, layers, [max(1, round(full_heads * f))] * layers, [max(1, round(full_ffn * f))] * layers
            )
            - target_params
        ),
    )
    heads = [max(1, round(full_heads * fraction))] * layers
    smallest = _sized(cfg, layers, [1] * layers, [1] * layers)
    if smallest > 1.01 * target_params:
        raise ValueError(
            f"every layer kept with one head and one FFN unit is already {smallest:,} parameters, more than the "
            f"{target_params:,} asked"
        )
    ffn = _spread(_ffn_total_for(cfg, layers, heads, target_params, full_ffn), layers)
    return UniformCut(heads, ffn, _sized(cfg, layers, heads, ffn))


def uniform_student(teacher_model: DPHuBERTModel, target_params: int) -> DPHuBERTModel:
    """The teacher cut uniformly to ``target_params`` (``uniform_cut``), keeping in each layer the heads and
    FFN units of largest magnitude."""
    cut = uniform_cut(teacher_model.cfg, target_params)
    return select_units(teacher_model, range(len(cut.heads)), cut.heads, cut.ffn_dims)


def distilhubert_student(teacher_model: DPHuBERTModel, target_params: int, layers: int = 2) -> DPHuBERTModel:
    """DistilHuBERT's student: the teacher's CNN and first ``layers`` layers with all their heads, FFN
    units (largest magnitude) chosen to reach ``target_params``."""
    cfg = as_config(teacher_model.cfg)
    heads = cfg.encoder_attention_heads[:layers]
    full_ffn = min(cfg.encoder_ffn_embed_dims[:layers])
    smallest, largest = (_sized(cfg, layers, heads, [n] * layers) for n in (1, full_ffn))
    if not (0.99 * target_params <= largest and smallest <= 1.01 * target_params):
        raise ValueError(
            f"a {layers}-layer student of this teacher has {smallest:,} to {largest:,} parameters; "
            f"{target_params:,} asked"
        )
    total = _ffn_total_for(cfg, layers, heads, target_params, full_ffn)
    return select_units(teacher_model, range(layers), heads, _spread(total, layers))


def random_structure(structure: DPHuBERTModel, seed: int) -> DPHuBERTModel:
    """The architecture of ``structure`` with fresh weights (each module's own initialisation, seeded)."""
    torch.manual_seed(seed)
    return DPHuBERTModel(copy.deepcopy(as_config(structure.cfg))).eval()


#: a gate logit that opens (closes) a hard-concrete gate for good: its eval mask is 1.0 (0.0) in float32
_SURE = 40.0


def largest_in_structure(teacher: torch.nn.Module, sizes: Dict[str, List[int]]) -> DPHuBERTModel:
    """The teacher (a loaded fairseq model) cut to ``sizes`` (``structure.sizes`` of a pruned model: per layer
    its heads and FFN units, per conv layer its channels), keeping in each layer the units of largest magnitude.
    Built as DPHuBERT's export builds its model: a gated copy of the teacher whose gates are set fully open on
    the kept units and fully closed on the others, folded by ``prune`` (which checks that it computes what the
    gated model computes)."""
    gated = student_from_teacher(teacher, prune_units=("conv", "head", "interm"))
    wanted = {
        **{f"feature_extractor.blocks.{i}.gate": n for i, n in enumerate(sizes["conv_channels"])},
        **{f"encoder.layers.{i}.self_attn.head_gate": n for i, n in enumerate(sizes["heads"])},
        **{f"encoder.layers.{i}.ffn.unit_gate": n for i, n in enumerate(sizes["ffn_units"])},
    }
    gates = gated.gates()
    with torch.no_grad():
        for name, scores in unit_scores(gated).items():
            if not 0 <= wanted[name] <= len(scores):
                raise ValueError(f"{name}: {wanted[name]} units asked of {len(scores)}")
            logits = torch.full_like(scores, -_SURE)
            logits[torch.topk(scores, wanted[name]).indices] = _SURE
            gates[name].log_alpha.copy_(logits)
    pruned = prune(gated)
    if not pruned.pruning_report.exact:
        raise RuntimeError(f"the cut is not exact: {pruned.pruning_report.inexact_parts}")
    return pruned
