"""Phoneme recognition as SUPERB's PR: a linear CTC probe on a frozen model's frame-level hidden states.

Each frame's feature is the softmax-weighted sum of all the model's layers h_0..h_L (learned weights, each layer
standardised with the training frames' statistics), one Linear maps it to the phonemes and CTC's blank; it is
trained with CTC on the training sentences and decoded greedily on the held-out ones, scored by the phone
error rate (edit distance over reference length, summed over the sentences). The baseline is the same probe
on MFCCs with deltas at the models' frame rate. Features are extracted once; the probe trains on them.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torchaudio

from dphubert_fairseq import DPHuBERTModel
from fairseq_runs.speech import SAMPLE_RATE

from .phonemes import UNSEEN, Inventory, SentencePhonemes

#: the models' frame hop: the teacher's convolutions stride 320 samples at 16 kHz
FRAME_MS = 20.0


@torch.inference_mode()
def frame_layers(model: DPHuBERTModel, clips: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Each clip's hidden states h_0..h_L frame by frame: ``(T, L + 1, D)`` float32 arrays."""
    out = []
    for clip in clips:
        states = model.hidden_states(torch.from_numpy(clip).unsqueeze(0))
        out.append(torch.stack([s[0] for s in states], dim=1).numpy())
    return out


def frame_mfcc(clips: Sequence[np.ndarray], cmvn: bool = True) -> List[np.ndarray]:
    """Each clip's Kaldi MFCCs (13) with deltas and delta-deltas, 25 ms windows every ``FRAME_MS`` (as many
    frames as the models give): ``(T, 1, 39)`` float32 arrays. ``cmvn``: each clip's coefficients normalised
    to zero mean and unit variance over its frames, the usual front end."""
    out = []
    for clip in clips:
        wave = torch.from_numpy(clip).float().unsqueeze(0)
        mfcc = torchaudio.compliance.kaldi.mfcc(
            wave, sample_frequency=SAMPLE_RATE, frame_shift=FRAME_MS, use_energy=False
        ).T  # (13, T)
        if cmvn:
            mfcc = (mfcc - mfcc.mean(1, keepdim=True)) / (mfcc.std(1, keepdim=True) + 1e-5)
        deltas = torchaudio.functional.compute_deltas(mfcc)
        features = torch.cat([mfcc, deltas, torchaudio.functional.compute_deltas(deltas)])
        out.append(features.T.unsqueeze(1).contiguous().numpy())
    return out


def greedy_decode(log_probs: torch.Tensor, blank: int = 0) -> List[int]:
    """CTC's best path of ``log_probs`` ``(T, C)``: each frame's most likely class, repeats merged, blanks
    removed."""
    best = log_probs.argmax(-1).tolist()
    return [c for i, c in enumerate(best) if c != blank and (i == 0 or c != best[i - 1])]


def edit_distance(hypothesis: Sequence[int], reference: Sequence[int]) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions that make ``reference``."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]


def phone_error_rate(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Summed edit distances over summed reference lengths."""
    errors = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    return errors / max(1, sum(len(r) for r in references))


def phoneme_probe(
    features_train: Sequence[np.ndarray],
    targets_train: Sequence[Sequence[str]],
    features_test: Sequence[np.ndarray],
    targets_test: Sequence[Sequence[str]],
    seed: int = 0,
    groups: Optional[Sequence[str]] = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 0.1,
) -> Dict[str, object]:
    """Train the linear CTC probe on ``features_train`` (per utterance ``(T, L, D)``, e.g. ``frame_layers``)
    and their phonemes, and score it on the test utterances.

    The inventory is the training targets' phonemes (see ``phonemes``); ``steps`` Adam updates on batches
    of ``batch_size`` utterances drawn with ``seed``, the learning rate decaying linearly from ``lr`` to 0.
    A linear CTC probe learns slowly: on the comparison's default corpus (320 training sentences) its
    training loss is still falling at 1000 steps with ``lr`` 0.1 and far from its floor at 2000 steps with
    ``lr`` 0.01 or 0.03, where the layer weights also stay on the first layers; the defaults take under
    a minute on one CPU thread for the 12-layer teacher. Returns ``per`` (the phone error rate over every test
    utterance), ``per_<group>`` for each distinct value of ``groups`` (one per test utterance), the learned
    ``layer_weights``, the inventory's size, the test phonemes outside it (``unseen``, each an error) and
    the last training batches' mean CTC loss."""
    inventory = Inventory.of(targets_train)
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(f) for f in features_train]
    frames = torch.cat([torch.from_numpy(f).float() for f in features_train])  # (frames, L, D)
    mean, std = frames.mean(0), frames.std(0) + 1e-5  # (L, D): per layer and channel
    # every training frame standardised, layer last, one contiguous block: an utterance is a slice of it and
    # mixing its layers is one matrix-vector product, with no batch-sized copy of all layers per step
    frames = ((frames - mean) / std).transpose(1, 2).contiguous()  # (frames, D, L)
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    train = [frames[a:b] for a, b in zip(starts, starts[1:])]
    test = [((torch.from_numpy(f).float() - mean) / std).transpose(1, 2).contiguous() for f in features_test]
    labels = [torch.tensor(inventory.encode(t)) for t in targets_train]
    references = [inventory.encode(t) for t in targets_test]

    dim, layers = frames.shape[1:]
    layer_logits = torch.zeros(layers, requires_grad=True)
    linear = torch.nn.Linear(dim, len(inventory) + 1)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.Adam([layer_logits, *linear.parameters()], lr=lr)
    # the learning rate decays linearly to 0: the last steps settle instead of jittering around a minimum
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

    def log_probs(utterances: Sequence[torch.Tensor]) -> torch.Tensor:
        """The utterances' ``(T, D, L)`` features to their frames' ``(frames, C)`` log-probabilities, one
        utterance after another."""
        weights = layer_logits.softmax(0)
        mixed = torch.cat([x.reshape(-1, layers).mv(weights) for x in utterances]).view(-1, dim)
        return linear(mixed).log_softmax(-1)

    def padded(utterances: Sequence[torch.Tensor]) -> torch.Tensor:
        """``log_probs`` as CTC takes them, ``(T, B, C)``, zeros past each utterance's end. One gather: padding
        by copying each utterance into place would copy the whole batch's gradient once per utterance."""
        sizes = torch.tensor([len(x) for x in utterances])
        offsets = torch.cumsum(sizes, 0) - sizes
        time = torch.arange(int(sizes.max())).unsqueeze(1)  # (T, 1)
        rows = torch.where(time < sizes, offsets + time, int(sizes.sum()))  # past the end: the zero row
        out = log_probs(utterances)
        return torch.cat([out, out.new_zeros(1, out.shape[1])])[rows]

    order = torch.empty(0, dtype=torch.long)
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:  # a fresh pass over the training utterances, in a seeded order
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        batch, order = order[:batch_size].tolist(), order[batch_size:]
        loss = torch.nn.functional.ctc_loss(
            padded([train[i] for i in batch]),
            torch.cat([labels[i] for i in batch]),
            torch.tensor([lengths[i] for i in batch]),
            torch.tensor([len(labels[i]) for i in batch]),
            zero_infinity=True,
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())

    with torch.no_grad():
        hypotheses = [greedy_decode(p) for p in log_probs(test).split([len(x) for x in test])]
    result: Dict[str, object] = {"per": phone_error_rate(hypotheses, references)}
    if groups is not None:
        for group in sorted(set(groups)):
            chosen = [i for i, g in enumerate(groups) if g == group]
            result[f"per_{group}"] = phone_error_rate(
                [hypotheses[i] for i in chosen], [references[i] for i in chosen]
            )
    tail = losses[-max(1, steps // 10) :]
    result.update(
        layer_weights=layer_logits.softmax(0).tolist(),
        phonemes=len(inventory),
        unseen=sum(r.count(UNSEEN) for r in references),
        train_items=len(train),
        test_items=len(test),
        train_loss=sum(tail) / len(tail),
    )
    return result


def phoneme_recognition(
    features_train: Sequence[np.ndarray],
    features_held_out: Sequence[np.ndarray],
    targets: SentencePhonemes,
    seed: int = 0,
    steps: int = 2000,
) -> Dict[str, object]:
    """``phoneme_probe`` on the corpus's sentences: ``features_train`` of ``corpus.train_sentence_audio``,
    ``features_held_out`` of ``corpus.held_out``, ``targets`` from ``phonemes.sentence_phonemes(corpus)``;
    ``per_train_voices`` and ``per_held_out_voices`` besides ``per``."""
    return phoneme_probe(
        features_train,
        targets.train,
        features_held_out,
        targets.held_out,
        seed,
        targets.held_out_groups,
        steps=steps,
    )
