"""What the comparison measures on held-out audio, for one model at a time:

- layer similarity: for each target layer of the teacher, the L1 distance and the cosine similarity between
  the teacher's hidden state and the student's prediction of it (the student's own distillation projection or
  prediction head applied to its hidden states, as in training);
- probes in the spirit of SUPERB: a linear classifier on the frozen model's hidden states, mean-pooled over
  time and combined by learned softmax weights over the layers; keyword spotting (trained on some voices,
  tested on unseen voices) and speaker identity (trained on some words, tested on the other words);
- size and cost: counted parameters, MACs of 10 s of audio (``dphubert_fairseq.macs``), CPU forward time.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from dphubert_fairseq import DPHuBERTModel
from dphubert_fairseq.criterions.distill_loss import DistillationProjections, parse_layer_groups
from dphubert_fairseq.macs import count_macs
from fairseq_runs.kmeans_labels import mfcc_with_deltas
from fairseq_runs.speech import SAMPLE_RATE
from fairseq_runs.timing import forward_seconds


def projections(extra_state: Dict, dim: int) -> Optional[DistillationProjections]:
    """The distillation projections an export carries (None for a model exported without them)."""
    state = extra_state.get("distill_projections")
    if not state:
        return None
    heads = bool(extra_state.get("prediction_heads"))
    head = extra_state.get("prediction_head") or "linear"
    out = DistillationProjections(parse_layer_groups(extra_state["distill_layers"]), dim, heads, head)
    out.load_state_dict(state)
    return out.eval()


@torch.inference_mode()
def layer_similarity(
    teacher: DPHuBERTModel,
    student: DPHuBERTModel,
    proj: Optional[DistillationProjections],
    clips: Sequence[np.ndarray],
    layers: Sequence[int],
) -> Dict[int, Dict[str, float]]:
    """``{layer: {"l1": ..., "cos": ...}}`` averaged over every frame of ``clips``; the student's prediction of
    teacher layer ``l`` is its projection's output (its own h_l when it has no projections)."""
    sums = {layer: np.zeros(2) for layer in layers}
    frames = 0
    for clip in clips:
        source = torch.from_numpy(clip).unsqueeze(0)
        target = teacher.hidden_states(source)
        states = student.hidden_states(source)
        if proj is not None:
            predicted = dict(zip(proj.targets, proj(states)))
        else:
            predicted = {layer: states[layer] for layer in layers}
        for layer in layers:
            p, t = predicted[layer][0], target[layer][0]
            sums[layer] += [
                (p - t).abs().mean(-1).sum().item(),
                torch.nn.functional.cosine_similarity(p, t, dim=-1).sum().item(),
            ]
        frames += target[0].size(1)
    return {layer: {"l1": s[0] / frames, "cos": s[1] / frames} for layer, s in sums.items()}


@torch.inference_mode()
def pooled_layers(model: DPHuBERTModel, clips: Sequence[np.ndarray]) -> np.ndarray:
    """``(N, L + 1, D)``: every hidden state h_0..h_L of each clip, averaged over its frames."""
    out = []
    for clip in clips:
        states = model.hidden_states(torch.from_numpy(clip).unsqueeze(0))
        out.append(torch.stack([s[0].mean(0) for s in states]).numpy())
    return np.stack(out)


def pooled_mfcc(clips: Sequence[np.ndarray]) -> np.ndarray:
    """``(N, 1, 39)``: MFCCs with deltas and delta-deltas averaged over each clip's frames (the baseline)."""
    return np.stack([mfcc_with_deltas(clip, SAMPLE_RATE).mean(0, keepdims=True) for clip in clips])


def linear_probe(
    features: np.ndarray,
    labels: Sequence[str],
    train: np.ndarray,
    seed: int = 0,
    steps: int = 400,
    weight_decay: float = 1e-3,
) -> Dict[str, object]:
    """Train a linear classifier on the learned softmax-weighted sum of the layers of ``features``
    ``(N, L, D)`` (each layer standardised with the training items' statistics) on the items where ``train``
    is true; returns the accuracy on the other items and the learned layer weights."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    x = torch.from_numpy(features).float()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-5
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    layer_logits = torch.zeros(x.size(1), requires_grad=True)
    linear = torch.nn.Linear(x.size(2), len(classes))
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.Adam([layer_logits, *linear.parameters()], lr=1e-2, weight_decay=weight_decay)
    mask = torch.from_numpy(np.asarray(train))
    for _ in range(steps):
        logits = linear((layer_logits.softmax(0)[None, :, None] * x[mask]).sum(1))
        loss = torch.nn.functional.cross_entropy(logits, y[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = linear((layer_logits.softmax(0)[None, :, None] * x[~mask]).sum(1)).argmax(-1)
    return {
        "accuracy": (predicted == y[~mask]).float().mean().item(),
        "layer_weights": layer_logits.softmax(0).tolist(),
        "train_items": int(mask.sum()),
        "test_items": int((~mask).sum()),
        "classes": len(classes),
    }


def size_and_cost(model: DPHuBERTModel, audio: torch.Tensor) -> Dict[str, float]:
    """Counted parameters, MACs of ``audio`` ``(1, L)`` and the median CPU forward time on it, in this
    process's thread setting."""
    return {
        "params": model.num_params(),
        "macs": count_macs(model.cfg, audio.size(1)).total,
        "cpu_seconds": forward_seconds(model, audio, lambda m, x: m.hidden_states(x)),
    }


def probe_splits(word_labels: List[Dict[str, object]], test_voices: Sequence[str], test_words: Sequence[str]):
    """The two probes' training masks: keywords trained on voices not in ``test_voices``; speakers trained on
    keywords not in ``test_words``."""
    kws = np.array([w["voice"] not in test_voices for w in word_labels])
    speaker = np.array([w["keyword"] not in test_words for w in word_labels])
    return kws, speaker


def teacher_quality(record: Dict[str, str], prior: Dict[str, float]) -> Dict[str, float]:
    """The teacher's validation record against the loss and accuracy of predicting the label prior.

    fairseq's HuBERT criterion logs its loss in bits per frame; ``loss_m_0`` / ``loss_u_0`` (the masked and
    unmasked parts, each divided by all frames), ``count_*`` and ``correct_*`` (accuracies) are means over the
    validation batches, so the per-part figures are close to, not exactly, the ratios of sums. The total
    (``loss_bits``, without the feature penalty) is exact."""
    masked, unmasked = float(record["valid_count_m_0"]), float(record["valid_count_u_0"])
    frames = masked + unmasked
    return {
        "loss_bits": float(record["valid_loss"]) - float(record.get("valid_loss_features_pen", 0.0)),
        "masked_bits": float(record["valid_loss_m_0"]) * frames / masked,
        "unmasked_bits": float(record["valid_loss_u_0"]) * frames / unmasked,
        "masked_accuracy": float(record["valid_correct_m_0"]),
        "unmasked_accuracy": float(record["valid_correct_u_0"]),
        "prior_bits": prior["bits"],
        "prior_accuracy": prior["accuracy"],
        "updates": int(record["valid_num_updates"]),
    }
