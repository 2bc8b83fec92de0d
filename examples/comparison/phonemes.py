"""Phoneme transcriptions of the comparison's sentences, the targets of the phoneme recognition probe.

The transcription is espeak-ng's own: ``espeak-ng -q -x`` with the voice and the text that synthesised the
audio prints the phonemes it speaks as its ASCII phoneme mnemonics (``DI2 'oUld f'A@m3`` for "the old
farmer" in en-us). These are phonemic labels, as in SUPERB's phoneme recognition (LibriSpeech's lexicon
phonemes): a voice's accent picks them (its own dictionary rules), its phoneme table realises them. They are
preferred to the ``--ipa`` output, which writes the realisation: it splits one phoneme into accent-specific
symbols and has symbols in the held-out voices that no training voice says.

A transcription becomes a phoneme sequence deterministically: espeak-ng separates the phonemes itself
(``--sep``, with a character no mnemonic contains), stress marks are removed, word boundaries are dropped,
and so are pauses (``_`` mnemonics) and the zero-length linking phoneme ``;``. The inventory is the set of
phonemes of the training sentences; a phoneme outside it in a test sentence is kept in the reference as
``UNSEEN``, which no probe can output, so it counts as an error for every model alike.
"""

import subprocess
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .corpus import HELD_OUT_VOICES, Corpus

#: the phoneme separator asked of espeak-ng: ``--sep=z`` is U+200C (zero-width non-joiner), not in any mnemonic
_SEPARATOR = "\u200c"
#: stress marks espeak-ng writes before a stressed (') or secondarily stressed (,) phoneme, or unstressed (%)
_STRESS = "',%"
#: a zero-length phoneme espeak-ng writes at the end of a word before one that starts with a vowel ("the
#: old", "key at"); its IPA output has nothing for it
_LINK = ";"
#: the id of a test phoneme outside the inventory (no probe outputs it)
UNSEEN = -1


def parse_mnemonics(line: str) -> List[str]:
    """The phonemes of one line of ``espeak-ng -q -x --sep=z`` output (see the module's docstring)."""
    phonemes = []
    for word in line.split():
        for piece in word.split(_SEPARATOR):
            phoneme = piece.lstrip(_STRESS)
            if phoneme and phoneme != _LINK and not phoneme.startswith("_"):
                phonemes.append(phoneme)
    return phonemes


def transcribe(items: Sequence[Tuple[str, str]]) -> List[List[str]]:
    """The phonemes espeak-ng says for each ``(text, voice)``, one espeak-ng process per voice.

    Each text must be one clause (no punctuation inside it, as the grammar's sentences and the keywords):
    espeak-ng writes a line per clause, and the lines are matched to the texts by count."""
    by_voice: Dict[str, List[int]] = {}
    for i, (_, voice) in enumerate(items):
        by_voice.setdefault(voice, []).append(i)
    out: List[List[str]] = [[] for _ in items]
    for voice, indices in by_voice.items():
        texts = [" ".join(items[i][0].split()) for i in indices]  # a newline inside a text would split it
        done = subprocess.run(
            ["espeak-ng", "-q", "-x", "--sep=z", "-v", voice],
            input="\n".join(texts) + "\n",
            capture_output=True,
            text=True,
            encoding="utf-8",
        )
        if done.returncode != 0:
            raise RuntimeError(f"espeak-ng -v {voice}: {done.stderr.strip() or 'failed'}")
        lines = done.stdout.splitlines()
        if len(lines) != len(texts):
            raise ValueError(
                f"espeak-ng -v {voice} wrote {len(lines)} clauses for {len(texts)} texts: "
                "a text with punctuation inside it is more than one clause"
            )
        for i, line in zip(indices, lines):
            out[i] = parse_mnemonics(line)
    return out


@dataclass
class Inventory:
    """The phonemes a probe outputs: id ``k + 1`` for ``symbols[k]`` (0 is CTC's blank)."""

    symbols: List[str]

    def __post_init__(self) -> None:
        self._ids = {symbol: k + 1 for k, symbol in enumerate(self.symbols)}

    @classmethod
    def of(cls, sequences: Sequence[Sequence[str]]) -> "Inventory":
        """Every phoneme of ``sequences`` (the training targets), sorted."""
        return cls(sorted({p for sequence in sequences for p in sequence}))

    def encode(self, sequence: Sequence[str]) -> List[int]:
        """The ids of ``sequence``; ``UNSEEN`` for a phoneme outside the inventory."""
        return [self._ids.get(p, UNSEEN) for p in sequence]

    def __len__(self) -> int:
        return len(self.symbols)


@dataclass
class SentencePhonemes:
    """The phoneme targets of the corpus's whole sentences: the training sentences (training voices) and the
    held-out ones, with the group of each held-out sentence (``"train_voices"`` or ``"held_out_voices"``)."""

    train: List[List[str]]
    held_out: List[List[str]]
    held_out_groups: List[str]


def sentence_phonemes(corpus: Corpus) -> SentencePhonemes:
    """espeak-ng's phonemes of ``corpus.train_sentence_audio`` and ``corpus.held_out`` (in the same order)."""
    train = transcribe(corpus.train_sentence_items)
    held_out = transcribe(corpus.held_out_items)
    groups = ["held_out_voices" if v in HELD_OUT_VOICES else "train_voices" for _, v in corpus.held_out_items]
    return SentencePhonemes(train, held_out, groups)
