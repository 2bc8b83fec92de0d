"""Speech for the quickstart: real read speech, synthesised sentences, or (when neither is installed) audio
generated in code; cut into utterances and listed in fairseq manifests."""

import glob
import math
import os
import shutil
import subprocess
import tempfile
from typing import Callable, List, Tuple

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-us+f3"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She sells sea shells by the sea shore every summer morning.",
    "A small model can learn a great deal from a larger teacher.",
    "Please call the office before noon to confirm the meeting.",
    "The weather today is cold and windy with a chance of rain.",
    "Reading aloud helps children learn new words and sounds.",
    "The train to the city leaves at half past seven every day.",
    "He opened the window and listened to the birds outside.",
    "Numbers like seven, twelve and forty two are easy to say.",
    "The library closes early on Sundays and public holidays.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "They walked along the beach until the sun went down.",
    "Speech recognition turns spoken words into written text.",
    "The old clock in the hall struck nine as we arrived.",
    "Bring a warm coat, the mountain path gets very cold at night.",
    "Every student must hand in the report by Friday afternoon.",
    "The garden was full of roses, tulips and tall sunflowers.",
    "Our neighbours painted their front door a bright shade of blue.",
    "Music filled the room as the band began to play.",
    "Pruning removes the parts of a network that matter least.",
]
Log = Callable[[str], None]


def read_speech_clips() -> List[np.ndarray]:
    """The LibriVox clips of Debian's pocketsphinx-testdata (16 kHz), or [] when not installed."""
    clips = []
    for path in sorted(glob.glob(os.path.join(LIBRIVOX, "*.wav"))):
        wav, rate = sf.read(path, dtype="float32")
        clips.append(resample(wav, rate))
    return clips


def synthesise_sentences(voices=VOICES, sentences=SENTENCES, speeds=(150,)) -> List[np.ndarray]:
    """Sentences spoken by espeak-ng in several voices, or [] when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return []
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.wav")
        for voice in voices:
            for speed in speeds:
                for text in sentences:
                    done = subprocess.run(
                        ["espeak-ng", "-v", voice, "-s", str(speed), "-w", out, text], capture_output=True
                    )
                    if done.returncode != 0:
                        break  # voice not available here
                    wav, rate = sf.read(out, dtype="float32")
                    clips.append(resample(wav, rate))
    return clips


def generated_audio(seconds: float, seed: int = 0) -> List[np.ndarray]:
    """Speech-like audio made in code (harmonic chirps with formant-like noise bursts): only for the
    mechanics of the pipeline, not for anything that claims speech quality."""
    rng = np.random.default_rng(seed)
    clips, total = [], 0.0
    while total < seconds:
        length = rng.uniform(2.0, 4.0)
        t = np.arange(int(length * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = 100 + 60 * np.sin(2 * math.pi * rng.uniform(0.2, 1.0) * t)
        phase = 2 * math.pi * np.cumsum(f0) / SAMPLE_RATE
        wave = sum(np.sin(k * phase) / k for k in range(1, 8))
        wave *= 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2, 5) * t) ** 2
        wave += 0.05 * rng.standard_normal(len(t))
        clips.append((0.3 * wave / np.abs(wave).max()).astype(np.float32))
        total += length
    return clips


def resample(wav: np.ndarray, rate: int) -> np.ndarray:
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    if rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(torch.from_numpy(wav), rate, SAMPLE_RATE).numpy()
    return wav.astype(np.float32)


def cut(clips: List[np.ndarray], max_seconds: float = 4.0, min_seconds: float = 1.0) -> List[np.ndarray]:
    """Utterances of at most ``max_seconds``: long clips cut into equal pieces, short pieces dropped."""
    out = []
    for clip in clips:
        pieces = max(1, math.ceil(len(clip) / (max_seconds * SAMPLE_RATE)))
        for piece in np.array_split(clip, pieces):
            if len(piece) >= min_seconds * SAMPLE_RATE:
                out.append(piece)
    return out


def gather_speech(
    minimum_seconds: float, log: Log = print, synthesised: bool = True
) -> Tuple[List[np.ndarray], str]:
    """Utterances and a one-line description of where they came from."""
    real = read_speech_clips()
    spoken = synthesise_sentences() if synthesised else []
    sources = []
    if real:
        sources.append(f"{len(real)} LibriVox clips (pocketsphinx-testdata)")
    else:
        log(
            "pocketsphinx-testdata is not installed: no real read speech (apt-get install pocketsphinx-testdata)"
        )
    if spoken:
        sources.append(f"{len(spoken)} espeak-ng sentences")
    elif synthesised:
        log("espeak-ng is not installed: no synthesised sentences (apt-get install espeak-ng)")
    utterances = cut(real + spoken)
    seconds = sum(len(u) for u in utterances) / SAMPLE_RATE
    if seconds < minimum_seconds:
        missing = minimum_seconds - seconds
        log(f"only {seconds:.0f} s of speech: adding {missing:.0f} s of audio generated in code")
        utterances += cut(generated_audio(missing))
        sources.append("audio generated in code")
    return utterances, ", ".join(sources)


def write_manifests(
    utterances: List[np.ndarray], folder: str, valid_fraction: float = 0.1
) -> Tuple[int, int]:
    """Write the utterances as wav files and fairseq's ``train.tsv`` / ``valid.tsv``. Returns the counts."""
    audio = os.path.join(folder, "audio")
    os.makedirs(audio, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(utterances))
    n_valid = max(2, int(round(valid_fraction * len(utterances))))
    splits = {"valid": order[:n_valid], "train": order[n_valid:]}
    for split, indices in splits.items():
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.write(os.path.abspath(audio) + "\n")
            for i in indices:
                name = f"utt{i:04d}.wav"
                sf.write(os.path.join(audio, name), utterances[i], SAMPLE_RATE)
                f.write(f"{name}\t{len(utterances[i])}\n")
    return len(splits["train"]), len(splits["valid"])
