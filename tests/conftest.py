import glob
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import helpers  # noqa: E402
from helpers import LIBRIVOX, TEACHER_SHAPES  # noqa: E402

import dphubert_fairseq  # noqa: E402,F401  (installs safe loading, registers the model)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: launches fairseq command-line runs (fairseq-hydra-train, dphubert-export, the quickstart, "
        "the benchmark scripts) or other training subprocesses; the fast lane is "
        "`python -m pytest tests -m 'not slow'`",
    )
    # noise from third-party code on this stack, not from the plugin
    for line in (
        "ignore::UserWarning:hydra",
        "ignore:.*version_base parameter is not specified.*",
        "ignore:(?s).*selects Hydra 1.1 compatibility behavior",
        "ignore:.*torch.cuda.amp.GradScaler.*:FutureWarning",  # fairseq's AMPOptimizer
        "ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available",
        "ignore:(?s).*is validated against ConfigStore schema:UserWarning",
        "ignore:.*The strict flag in the compose API is deprecated.*",
        "ignore:.*Usage of deprecated keyword in package header.*",
        "ignore:.*hydra.experimental.compose.*",
        "ignore:.*torch.nn.utils.weight_norm.*is deprecated.*:FutureWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from one random state (torch, numpy, random): a random input is the same input on
    every run and machine, whichever tests ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="session")
def tiny_teachers(teacher_dir):
    """Checkpoint paths of tiny teachers of every supported shape, written by fairseq's Trainer."""
    return {
        name: helpers.make_teacher(os.path.join(teacher_dir, f"{name}.pt"), kind, "tiny", large, seed=i)
        for i, (name, (kind, large)) in enumerate(TEACHER_SHAPES.items())
    }


@pytest.fixture(scope="session")
def wavlm_teachers(teacher_dir):
    """Checkpoint paths of tiny WavLM teachers (``helpers.WAVLM_SHAPES``), made by WavLM's own code."""
    return {
        name: helpers.make_wavlm_teacher(os.path.join(teacher_dir, f"{name}.pt"), large, seed=10 + i)
        for i, (name, large) in enumerate(helpers.WAVLM_SHAPES.items())
    }


@pytest.fixture(scope="session")
def speech():
    """Real read speech (LibriVox clips of Debian's pocketsphinx-testdata), float32 at 16 kHz, if installed."""
    import soundfile as sf

    files = sorted(glob.glob(os.path.join(LIBRIVOX, "*.wav")))
    if not files:
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install pocketsphinx-testdata)")
    clips = []
    for f in files:
        wav, rate = sf.read(f, dtype="float32")
        assert rate == 16000
        clips.append(torch.from_numpy(wav))
    return clips


@pytest.fixture(scope="session")
def unequal_batch(speech):
    """Three clips of unequal length (1.3 s, 2.0 s, 0.9 s) cut from real speech."""
    return [speech[0][:20800], speech[1][:32000], speech[2][8000:22400]]


@pytest.fixture(scope="session")
def speech_manifests(tmp_path_factory, speech):
    """A folder of real-speech chunks with train/valid manifests (``helpers.write_speech_manifests``)."""
    return helpers.write_speech_manifests(str(tmp_path_factory.mktemp("speech_data")))


@pytest.fixture(scope="session")
def pretrained_hubert(tmp_path_factory, speech_manifests):
    """A 12-layer tiny HuBERT pretrained for a few updates by stock fairseq's trainer; its checkpoint path."""
    return helpers.pretrain_tiny_hubert(speech_manifests, str(tmp_path_factory.mktemp("hubert_teacher")))


@pytest.fixture
def three_clip_manifest(tmp_path, speech):
    """``tmp_path`` with ``train.tsv`` listing three 1 s files of real speech, ``audio/0.wav`` to ``2.wav``
    (manifest lines 2 to 4)."""
    import soundfile as sf

    audio = tmp_path / "audio"
    audio.mkdir()
    lines = [str(audio)]
    for i in range(3):
        sf.write(audio / f"{i}.wav", speech[i][:16000].numpy(), 16000)
        lines.append(f"{i}.wav\t16000")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path
