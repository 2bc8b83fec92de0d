"""The comparison's phoneme recognition probe (``examples/comparison/phonemes.py`` and ``ctc_probe.py``):
espeak-ng's phoneme targets, the edit distance and the greedy CTC decoding, the probe's phone error rate on
features that determine the phonemes (near 0) and on labels that do not belong to the features (near chance),
and the frame alignment of the MFCC baseline with a model's frames."""

import shutil

import numpy as np
import pytest
import torch

import dphubert_fairseq as dp
from examples.comparison import ctc_probe, phonemes, students

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


def test_edit_distance_and_phone_error_rate_on_known_pairs():
    assert ctc_probe.edit_distance(list("sitting"), list("kitten")) == 3
    assert ctc_probe.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert ctc_probe.edit_distance([], [1, 2]) == 2
    assert ctc_probe.edit_distance([1, 2], []) == 2
    assert ctc_probe.edit_distance([1, 2, 3], [3, 2, 1]) == 2
    assert ctc_probe.edit_distance([1, 3], [1, 2, 3]) == 1
    # summed over the utterances, not averaged per utterance
    assert ctc_probe.phone_error_rate([[1], [5, 6, 7]], [[1, 2, 3], [5]]) == pytest.approx(4 / 4)
    assert ctc_probe.phone_error_rate([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 0.0


def test_greedy_decode_merges_repeats_and_drops_blanks():
    path = [0, 1, 1, 0, 1, 2, 2, 2, 0, 0, 3]
    log_probs = torch.nn.functional.one_hot(torch.tensor(path), 4).float().log_softmax(-1)
    assert ctc_probe.greedy_decode(log_probs) == [1, 1, 2, 3]
    assert ctc_probe.greedy_decode(log_probs[:1]) == []


def test_mnemonics_parse_into_phonemes_without_stress_links_or_pauses():
    sep = "\u200c"
    line = (
        sep.join(["D", "I2", ";"]) + " " + sep.join(["'oU", "l", "d"]) + " " + sep.join(["n", ",i@3", "_:"])
    )
    assert phonemes.parse_mnemonics(line) == ["D", "I2", "oU", "l", "d", "n", "i@3"]


def test_inventory_is_the_training_phonemes_and_marks_unseen_ones():
    inventory = phonemes.Inventory.of([["b", "a", "t"], ["a", "@"]])
    assert inventory.symbols == ["@", "a", "b", "t"] and len(inventory) == 4
    assert inventory.encode(["t", "a", "x", "@"]) == [4, 2, phonemes.UNSEEN, 1]


@needs_espeak
def test_espeak_phonemes_of_a_known_sentence():
    # espeak-ng 1.51's en-us and en-029 phonemes: the voice's accent picks them (3 against a#, D against d)
    said = phonemes.transcribe(
        [
            ("My sister hid the silver key at noon.", "en-us+m1"),
            ("yes", "en-gb+f2"),
            ("My sister hid the silver key at noon.", "en-029+m4"),
        ]
    )
    assert said[0] == "m aI s I s t 3 h I d D @2 s I l v 3 k i: a t n u: n".split()
    assert said[1] == ["j", "E", "s"]
    assert said[2] == "m aI s I s t a# h I d d @2 s I l v a# k i: a t n u: n".split()
    # one process per voice gives what one process per sentence gives
    assert phonemes.transcribe([("My sister hid the silver key at noon.", "en-029+m4")])[0] == said[2]


def synthetic_utterances(count: int, seed: int, symbols: int = 20, layers: int = 3):
    """Utterances whose layer 1 is the one-hot code of the frame's phoneme (each said for 2 to 4 frames, a
    silent frame between words, never a phoneme twice in a row: with no frame between them the features
    could not tell two from one) and whose other layers are noise: ``(T, layers, symbols + 1)`` features
    and the phoneme sequences."""
    rng = np.random.default_rng(seed)
    features, targets = [], []
    for _ in range(count):
        sequence, length = [int(rng.integers(symbols))], rng.integers(4, 11)
        while len(sequence) < length:
            sequence.append(int((sequence[-1] + rng.integers(1, symbols)) % symbols))
        codes = []
        for k, p in enumerate(sequence):
            codes += [p + 1] * int(rng.integers(2, 5)) + ([0] if k % 3 == 2 else [])
        frames = rng.normal(size=(len(codes), layers, symbols + 1)).astype(np.float32)
        frames[:, 1] = np.eye(symbols + 1, dtype=np.float32)[codes]
        features.append(frames)
        targets.append([f"p{p}" for p in sequence])
    return features, targets


def test_probe_reads_phonemes_off_features_that_carry_them():
    features, targets = synthetic_utterances(80, seed=0)
    groups = ["a", "b"] * 10
    result = ctc_probe.phoneme_probe(
        features[:60], targets[:60], features[60:], targets[60:], seed=0, groups=groups, steps=200
    )
    assert result["per"] < 0.05 and result["per_a"] < 0.05 and result["per_b"] < 0.05
    assert max(result["layer_weights"]) == result["layer_weights"][1]  # the layer that carries them
    assert result["phonemes"] == 20 and result["unseen"] == 0
    again = ctc_probe.phoneme_probe(
        features[:60], targets[:60], features[60:], targets[60:], seed=0, groups=groups, steps=200
    )
    assert again == result  # seeded and deterministic


def test_probe_is_near_chance_when_labels_do_not_belong_to_the_features():
    features, targets = synthetic_utterances(80, seed=1)
    shuffled = [targets[i] for i in np.random.default_rng(0).permutation(60)]
    result = ctc_probe.phoneme_probe(features[:60], shuffled, features[60:], targets[60:], seed=0, steps=200)
    assert result["per"] > 0.7


def test_mfcc_frames_line_up_with_the_models_frames(tiny_teachers):
    model = students.teacher_as_student(dp.load_teacher(tiny_teachers["hubert_base"]))
    clips = [np.random.default_rng(0).normal(size=n).astype(np.float32) * 0.1 for n in (8000, 12345, 16000)]
    layers, mfcc = ctc_probe.frame_layers(model, clips), ctc_probe.frame_mfcc(clips)
    for states, coefficients in zip(layers, mfcc):
        assert states.shape[1:] == (model.cfg.encoder_layers + 1, model.cfg.encoder_embed_dim)
        assert coefficients.shape[1:] == (1, 39) and len(coefficients) == len(states)
