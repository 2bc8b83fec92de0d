"""The comparison's audio: sentences made from a small grammar (as many as asked, none repeated), spoken by
espeak-ng in voices split between training and held-out use, plus the LibriVox clips; and the spoken words of
the two probes (keywords said by every probe voice)."""

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import soundfile as sf

from fairseq_runs.speech import SAMPLE_RATE, cut, read_speech_clips, resample

#: voices the teacher and every student train on (espeak-ng accent + voice variant)
TRAIN_VOICES = (
    "en-us+m1",
    "en-gb+f2",
    "en-gb-scotland+m3",
    "en-gb-x-rp+f4",
    "en-029+m5",
    "en-us-nyc+f1",
    "en-gb-x-gbclan+m2",
    "en-us+f5",
)
#: voices that no model trains on: the held-out sentences and the probes' test voices
HELD_OUT_VOICES = ("en-gb-x-gbcwmd+m7", "en-gb-scotland+f3", "en-029+m4")
#: the keywords of the keyword-spotting probe (those of Speech Commands' ten-word task)
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: renditions of every keyword by every voice: (words per minute, pitch 0-99)
RENDITIONS = ((140, 35), (140, 65), (185, 35), (185, 65))

_SUBJECTS = (
    "the old farmer",
    "my sister",
    "a tall stranger",
    "the young doctor",
    "our teacher",
    "the little girl",
    "a quiet man",
    "the captain",
    "her brother",
    "the baker",
    "a tired student",
    "the king",
    "the nurse",
    "his neighbour",
    "the driver",
    "a clever child",
    "the painter",
    "my grandmother",
    "the sailor",
    "the cook",
)
_VERBS = (
    "found",
    "carried",
    "painted",
    "opened",
    "washed",
    "sold",
    "watched",
    "mended",
    "hid",
    "lost",
    "brought",
    "cleaned",
    "borrowed",
    "dropped",
    "measured",
    "wrapped",
    "counted",
    "lifted",
    "kept",
    "moved",
)
_OBJECTS = (
    "a wooden box",
    "the silver key",
    "three red apples",
    "an empty bottle",
    "the heavy door",
    "a long letter",
    "the broken chair",
    "two small boats",
    "the green basket",
    "a warm blanket",
    "the golden ring",
    "a bag of flour",
    "the garden gate",
    "an old map",
    "the blue kettle",
    "a pile of books",
    "the winter coat",
    "a jar of honey",
    "the kitchen table",
    "a bunch of flowers",
)
_PLACES = (
    "near the river",
    "before dinner",
    "in the morning",
    "behind the barn",
    "at the market",
    "after the storm",
    "under the bridge",
    "on a cold night",
    "by the window",
    "in the village",
    "at the station",
    "during the summer",
    "next to the church",
    "on the hill",
    "in the forest",
    "at noon",
    "in the harbour",
    "after school",
    "on the beach",
    "in the cellar",
)


def sentences(count: int, seed: int, exclude: Iterable[str] = ()) -> List[str]:
    """``count`` different sentences of the grammar, none in ``exclude``, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    taken, out = set(exclude), []
    limit = len(_SUBJECTS) * len(_VERBS) * len(_OBJECTS) * len(_PLACES)
    if count > limit - len(taken):
        raise ValueError(f"the grammar makes at most {limit} sentences, asked for {count}")
    while len(out) < count:
        parts = [p[rng.integers(len(p))] for p in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)]
        text = " ".join(parts).capitalize() + "."
        if text not in taken:
            taken.add(text)
            out.append(text)
    return out


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(items: Sequence[Tuple[str, str, int, int]]) -> List[np.ndarray]:
    """espeak-ng's rendition of each ``(text, voice, words_per_minute, pitch)`` at 16 kHz, silence trimmed."""
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.wav")
        for text, voice, speed, pitch in items:
            cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", out, text]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"espeak-ng -v {voice}: {done.stderr.strip() or 'failed'}")
            wav, rate = sf.read(out, dtype="float32")
            clips.append(_trim(resample(wav, rate)))
    return clips


def _trim(wav: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wav) > threshold)
    if len(loud) == 0:
        return wav
    pad = SAMPLE_RATE // 50  # keep 20 ms either side
    return wav[max(0, loud[0] - pad) : loud[-1] + pad]


@dataclass
class Corpus:
    """Utterances for training and held-out measurement, and the probes' spoken words."""

    train: List[np.ndarray]
    valid: List[np.ndarray]
    held_out: List[np.ndarray]
    words: List[np.ndarray]
    word_labels: List[Dict[str, object]]  # keyword, voice, rendition of each word
    description: str
    # the training sentences whole (``train`` and ``valid`` hold them cut and mixed with the LibriVox clips),
    # the (text, voice) of each of them and of each held-out sentence: what the phoneme targets are made from
    train_sentence_audio: List[np.ndarray] = field(default_factory=list)
    train_sentence_items: List[Tuple[str, str]] = field(default_factory=list)
    held_out_items: List[Tuple[str, str]] = field(default_factory=list)


def make_corpus(
    train_sentences: int, held_out_sentences: int, renditions: int = len(RENDITIONS), seed: int = 0
) -> Corpus:
    """Train and valid: ``train_sentences`` sentences, each said by one training voice (in turn), plus the
    LibriVox clips; held out: other sentences, half by held-out voices, half by training voices; the words:
    every keyword said by every voice in the first ``renditions`` of ``RENDITIONS``. The training sentences
    are also kept whole, and every sentence's text and voice (for the phoneme targets)."""
    if not have_espeak():
        raise RuntimeError("the comparison needs espeak-ng (apt-get install espeak-ng)")
    texts = sentences(train_sentences, seed)
    held_texts = sentences(held_out_sentences, seed + 1, exclude=texts)
    voices = list(TRAIN_VOICES)
    train_items = [(t, voices[i % len(voices)]) for i, t in enumerate(texts)]
    spoken = speak([(t, v, 160, 50) for t, v in train_items])
    librivox = read_speech_clips()
    utterances = cut(spoken + librivox)
    order = np.random.default_rng(seed).permutation(len(utterances))
    n_valid = max(2, len(utterances) // 20)
    valid = [utterances[i] for i in order[:n_valid]]
    train = [utterances[i] for i in order[n_valid:]]
    held_voices = [
        (HELD_OUT_VOICES if i % 2 == 0 else TRAIN_VOICES)[(i // 2) % 3] for i in range(len(held_texts))
    ]
    held_out = speak([(t, v, 160, 50) for t, v in zip(held_texts, held_voices)])
    word_items, word_labels = [], []
    for voice in TRAIN_VOICES + HELD_OUT_VOICES:
        for word in KEYWORDS:
            for r, (speed, pitch) in enumerate(RENDITIONS[:renditions]):
                word_items.append((word, voice, speed, pitch))
                word_labels.append({"keyword": word, "voice": voice, "rendition": r})
    words = speak(word_items)
    seconds = sum(len(u) for u in train + valid) / SAMPLE_RATE
    description = (
        f"{len(texts)} grammar sentences by {len(voices)} espeak-ng voices"
        + (f" + {len(librivox)} LibriVox clips" if librivox else "")
        + f", {seconds:.0f} s in {len(train)} train + {len(valid)} valid utterances"
    )
    held_items = list(zip(held_texts, held_voices))
    return Corpus(train, valid, held_out, words, word_labels, description, spoken, train_items, held_items)
