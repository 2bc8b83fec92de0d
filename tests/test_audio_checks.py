"""Audio checked for what it holds: frame counts and encodings before training, non-finite samples before
training (task.check_audio_content) and in every batch at run time."""

import logging
import math
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from dphubert_fairseq.data.finite_audio import FiniteAudioDataset
from dphubert_fairseq.errors import ManifestError

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402

RATE = 16000
REGENERATE = "regenerate the manifest, e.g. with fairseq's examples/wav2vec/wav2vec_manifest.py"


@pytest.fixture
def data(three_clip_manifest):
    return three_clip_manifest


task_for = P.distill_task


def load_error(data, teacher, **kw) -> str:
    """The one-line ManifestError that loading ``train`` raises."""
    with pytest.raises(ManifestError) as err:
        task_for(data, teacher, **kw).load_dataset("train")
    message = str(err.value)
    P.assert_one_line(message)
    return message


def write_non_finite(path, speech, samples: int, value: float = math.nan) -> None:
    """Real speech with one sample set to ``value``, stored as float samples (integer PCM cannot hold NaN)."""
    wav = np.resize(speech.numpy(), samples).astype("float32")
    wav[samples // 2] = value
    sf.write(path, wav, RATE, subtype="FLOAT")


# ----- header checks -----


def test_zero_frame_file(data, tiny_teachers):
    sf.write(data / "audio" / "1.wav", np.zeros(0, dtype="float32"), RATE)
    message = load_error(data, tiny_teachers["hubert_base"])
    assert message == (
        f"{data / 'train.tsv'}:3: audio file {data / 'audio' / '1.wav'} holds no samples (0 frames); "
        "remove its line"
    )


def test_truncated_file(data, tiny_teachers, speech):
    sf.write(data / "audio" / "2.wav", speech[2][: RATE - 16].numpy(), RATE)
    message = load_error(data, tiny_teachers["hubert_base"])
    assert message == (
        f"{data / 'train.tsv'}:4: audio file {data / 'audio' / '2.wav'} holds {RATE - 16} samples but the "
        f"manifest lists {RATE}; {REGENERATE}"
    )


def test_manifest_count_longer_than_the_file(data, tiny_teachers):
    manifest = data / "train.tsv"
    manifest.write_text(manifest.read_text().replace(f"0.wav\t{RATE}", f"0.wav\t{2 * RATE}"))
    message = load_error(data, tiny_teachers["hubert_base"])
    assert message == (
        f"{manifest}:2: audio file {data / 'audio' / '0.wav'} holds {RATE} samples but the manifest lists "
        f"{2 * RATE}; {REGENERATE}"
    )


def test_header_checks_can_be_turned_off(data, tiny_teachers):
    sf.write(data / "audio" / "1.wav", np.zeros(0, dtype="float32"), RATE)
    task = task_for(data, tiny_teachers["hubert_base"], check_audio_files=False)
    task.load_dataset("train")
    assert len(task.datasets["train"]) == 3


def test_non_utf8_manifest_line(data, tiny_teachers):
    manifest = data / "train.tsv"
    raw = manifest.read_bytes().replace(b"1.wav", b"caf\xe9.wav")  # latin-1 e-acute
    manifest.write_bytes(raw)
    message = load_error(data, tiny_teachers["hubert_base"])
    assert message.startswith(
        f"{manifest}:3: not valid UTF-8 (byte 0xe9 at column 4) in audio file "
        f"'{data / 'audio' / 'caf'}\\\\xe9.wav'; fairseq reads manifests as UTF-8"
    )
    assert REGENERATE in message

    manifest.write_bytes(b"/data/\xff\n" + raw.split(b"\n", 1)[1])
    message = load_error(data, tiny_teachers["hubert_base"])
    assert message.startswith(
        f"{manifest}:1: not valid UTF-8 (byte 0xff at column 7) in root folder '/data/\\\\xff'"
    )


# ----- the content scan (task.check_audio_content) -----


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_full_scan_refuses_non_finite_samples(data, tiny_teachers, speech, value):
    write_non_finite(data / "audio" / "2.wav", speech[2], RATE, value)
    task = task_for(data, tiny_teachers["hubert_base"])
    task.load_dataset("train")  # the header is fine: without the scan the file is only caught at run time
    assert len(task.datasets["train"]) == 3
    message = load_error(data, tiny_teachers["hubert_base"], check_audio_content=True)
    assert message == (
        f"{data / 'train.tsv'}:4: audio file {data / 'audio' / '2.wav'} holds non-finite samples "
        "(NaN or inf); fix or remove the file"
    )


def test_full_scan_passes_clean_data_and_skips_integer_files(data, tiny_teachers, speech, monkeypatch):
    from dphubert_fairseq.data import manifest_check

    sf.write(data / "audio" / "1.wav", speech[1][:RATE].numpy(), RATE, subtype="FLOAT")
    scanned = []
    scan = manifest_check._has_non_finite
    monkeypatch.setattr(manifest_check, "_has_non_finite", lambda f: scanned.append(f.name) or scan(f))
    task = task_for(data, tiny_teachers["hubert_base"], check_audio_content=True)
    task.load_dataset("train")
    assert len(task.datasets["train"]) == 3
    assert scanned == [str(data / "audio" / "1.wav")]  # the PCM_16 files cannot hold NaN/inf: not read


# ----- run time: items with non-finite samples are left out of their batch -----


def test_collater_leaves_out_non_finite_items_and_names_their_files(data, tiny_teachers, speech, caplog):
    write_non_finite(data / "audio" / "1.wav", speech[1], RATE)
    write_non_finite(data / "audio" / "2.wav", speech[2], RATE, math.inf)
    task = task_for(data, tiny_teachers["hubert_base"])
    task.load_dataset("train")
    dataset = task.datasets["train"]
    with caplog.at_level(logging.WARNING):
        batch = dataset.collater([dataset[i] for i in range(3)])
    assert batch["id"].tolist() == [0]
    assert batch["net_input"]["source"].shape == (1, RATE)
    assert np.isfinite(batch["net_input"]["source"].numpy()).all()
    assert (
        f"{data / 'train.tsv'}: left out of this batch (2 of 3 items): audio with non-finite samples (NaN or "
        f"inf): {data / 'audio' / '1.wav'}, {data / 'audio' / '2.wav'}"
    ) in caplog.text
    assert dataset.collater([dataset[1], dataset[2]]) == {}  # fairseq's trainer runs {} as a dummy batch


def test_wrapped_dataset_batches_as_fairseq_does(data, tiny_teachers, speech):
    """What fairseq's batching and the plugin's code read still works on the wrapper."""
    (data / "train.tsv").write_text(
        (data / "train.tsv").read_text() + "short.wav\t4000\n"  # below min_sample_size: fairseq skips it
    )
    sf.write(data / "audio" / "short.wav", speech[0][:4000].numpy(), RATE)
    write_non_finite(data / "audio" / "1.wav", speech[1], RATE)
    task = task_for(data, tiny_teachers["hubert_base"], min_sample_size=8000)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    assert isinstance(dataset, FiniteAudioDataset)
    assert len(dataset) == 3 and dataset.sizes.tolist() == [RATE] * 3
    assert (
        dataset.skipped_indices == {3}
        and len(dataset.fnames) == 3
        and dataset.root_dir == str(data / "audio")
    )
    assert dataset.num_tokens(0) == dataset.size(0) == RATE
    assert sorted(dataset.ordered_indices().tolist()) == [0, 1, 2]
    assert dataset.file_name(1) == str(data / "audio" / "1.wav")
    restored = pickle.loads(pickle.dumps(dataset))  # data loader workers started by spawn
    assert restored.file_name(2) == str(data / "audio" / "2.wav")

    iterator = task.get_batch_iterator(dataset, max_tokens=2 * RATE, max_positions=None, seed=1)
    batches = list(iterator.next_epoch_itr(shuffle=False))
    ids = sorted(i for b in batches if b for i in b["id"].tolist())
    assert ids == [0, 2]
    assert iterator.first_batch  # fairseq's dummy batch: the first batch, here with its finite items


def nan_run_data(folder, speech_manifests, speech):
    """``speech_manifests``'s chunks (1.5 s) with non-finite files added: train.tsv lists ``nan_a.wav``
    (1.5 s: shares a 2-item batch with clean audio) and ``nan_b.wav`` (1 s, the shortest: alone in the last
    batch, which becomes empty); valid.tsv lists ``nan_valid.wav`` (1 s, alone in the last batch)."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    chunk = int(1.5 * RATE)
    for split, extra, clean in (("train", ["nan_a", "nan_b"], 3), ("valid", ["nan_valid"], 4)):
        with open(os.path.join(speech_manifests, f"{split}.tsv")) as f:
            lines = f.read().splitlines()
        entries = [line.split("\t")[0] for line in lines[1 : clean + 1]]
        for name in entries:
            shutil.copy(os.path.join(lines[0], name), audio)
        listed = [f"{name}\t{chunk}" for name in entries]
        for name in extra:
            samples = chunk if name == "nan_a" else RATE
            write_non_finite(audio / f"{name}.wav", speech[0], samples)
            listed.insert(1, f"{name}.wav\t{samples}")
        (folder / f"{split}.tsv").write_text("\n".join([str(audio), *listed]) + "\n")
    return folder


@pytest.mark.slow
def test_training_leaves_out_non_finite_audio(tmp_path, speech_manifests, speech, tiny_teachers):
    """Stock fairseq-hydra-train: two epochs of 3 batches (one holding nan_a and a clean item, one with nan_b
    only: the empty batch fairseq runs as a dummy), then validation with one empty batch (nan_valid)."""
    data = nan_run_data(tmp_path / "data", speech_manifests, speech)
    save_dir = tmp_path / "out"
    out = P.hydra_train("dphubert", P.tiny_run_overrides(data, tiny_teachers["hubert_base"], save_dir, 6))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    warnings = [
        line for line in out.stdout.splitlines() if "WARNING" in line and "non-finite samples" in line
    ]
    for split, name in (("train", "nan_a"), ("train", "nan_b"), ("valid", "nan_valid")):
        assert any(
            f"{data / split}.tsv: left out of this batch" in line
            and str(data / "audio" / f"{name}.wav") in line
            for line in warnings
        ), name
    train = P.logged(out.stdout, "train_inner")
    assert [int(r["num_updates"]) for r in train] == list(range(1, 7))
    assert all(math.isfinite(float(r[key])) for r in train for key in ("loss", "distill_loss", "gnorm"))
    (valid,) = P.logged(out.stdout, "valid")
    assert math.isfinite(float(valid["valid_loss"]))
    assert (save_dir / "checkpoint_best.pt").exists()


@pytest.mark.slow
def test_a_first_batch_of_non_finite_audio_only(tmp_path, speech_manifests, speech, tiny_teachers):
    """fairseq makes its dummy batch (what an empty batch runs as) from a split's first batch; the plugin makes
    it take the first batch that is not empty (fairseq_patches/dummy_batch.py), else the run would stop with
    'Invalid dummy batch: {}'."""
    data = nan_run_data(tmp_path / "data", speech_manifests, speech)
    # the longest utterance of valid.tsv, alone in the first batch (2 x 32000 samples > max_tokens)
    write_non_finite(data / "audio" / "nan_valid.wav", speech[0], 2 * RATE)
    manifest = data / "valid.tsv"
    manifest.write_text(manifest.read_text().replace(f"nan_valid.wav\t{RATE}", f"nan_valid.wav\t{2 * RATE}"))
    save_dir = tmp_path / "out"
    out = P.hydra_train("dphubert", P.tiny_run_overrides(data, tiny_teachers["hubert_base"], save_dir, 2))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (save_dir / "checkpoint_best.pt").exists()
