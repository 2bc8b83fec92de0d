"""Bad input to the training task: clear errors naming the file, before training starts."""

import os
import shutil
import sys

import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq.errors import ManifestError

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402


@pytest.fixture
def data(three_clip_manifest):
    return three_clip_manifest


task_for = P.distill_task


def one_line(err) -> str:
    message = str(err.value)
    P.assert_one_line(message)
    return message


def test_good_manifest_loads(data, tiny_teachers):
    task = task_for(data, tiny_teachers["hubert_base"])
    task.load_dataset("train")
    assert len(task.datasets["train"]) == 3


def test_missing_audio_file(data, tiny_teachers):
    os.remove(data / "audio" / "1.wav")
    with pytest.raises(ManifestError) as err:
        task_for(data, tiny_teachers["hubert_base"]).load_dataset("train")
    assert one_line(err).startswith(
        f"{data / 'train.tsv'}:3: audio file {data / 'audio' / '1.wav'} does not exist"
    )


def test_corrupt_audio_file(data, tiny_teachers):
    (data / "audio" / "2.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ManifestError) as err:
        task_for(data, tiny_teachers["hubert_base"]).load_dataset("train")
    assert "cannot read audio file" in one_line(err) and "2.wav" in str(err.value)


def test_wrong_sample_rate(data, tiny_teachers, speech):
    import soundfile as sf

    sf.write(data / "audio" / "0.wav", speech[0][:8000].numpy(), 8000)
    with pytest.raises(ManifestError, match="sampled at 8000 Hz but the teacher expects 16000 Hz"):
        task_for(data, tiny_teachers["hubert_base"]).load_dataset("train")


def test_empty_and_missing_manifest(data, tiny_teachers):
    (data / "valid.tsv").write_text(str(data / "audio") + "\n")
    task = task_for(data, tiny_teachers["hubert_base"])
    with pytest.raises(ManifestError) as err:
        task.load_dataset("valid")
    assert one_line(err) == f"{data / 'valid.tsv'}: the manifest lists no audio files"
    with pytest.raises(ManifestError, match="no such manifest"):
        task.load_dataset("test")


def test_manifest_lines_are_read_as_fairseq_reads_them(data, tiny_teachers):
    """fairseq's reader strips each line and wants exactly two fields, with no blank line: what it would
    stop on with a bare AssertionError is refused first, naming the line; what it accepts passes."""
    manifest = data / "train.tsv"
    good = manifest.read_text()
    root, *lines = good.rstrip("\n").split("\n")
    cases = [
        ([lines[0], "", *lines[1:]], 3, "a blank line, which fairseq's reader refuses"),
        ([*lines, ""], 5, "a blank line"),
        ([lines[0], lines[1] + "\textra", lines[2]], 3, "expected 'relative/path<TAB>num_samples'"),
    ]
    for body, number, message in cases:
        manifest.write_text("\n".join([root, *body]) + "\n")
        with pytest.raises(ManifestError) as err:
            task_for(data, tiny_teachers["hubert_base"]).load_dataset("train")
        assert one_line(err).startswith(f"{manifest}:{number}: {message}"), str(err.value)
    manifest.write_text("\n".join([root, " " + lines[0], *lines[1:]]) + "\r\n")  # fairseq strips these
    task = task_for(data, tiny_teachers["hubert_base"])
    task.load_dataset("train")
    assert len(task.datasets["train"]) == 3


def test_lengths_the_teacher_cannot_train_on_are_refused(data, tiny_teachers, speech):
    """A split that task.min_sample_size leaves empty, and one that keeps an utterance shorter than the
    teacher's receptive field (400 samples here), are refused at load, naming the manifest and the key."""
    import soundfile as sf

    teacher = tiny_teachers["hubert_base"]
    manifest = data / "train.tsv"
    with pytest.raises(dp.ConfigError) as err:
        task_for(data, teacher, min_sample_size=20000).load_dataset("train")
    assert (
        one_line(err)
        == f"{manifest}: no utterance is at least task.min_sample_size=20000 samples long; lower it"
    )
    sf.write(data / "audio" / "2.wav", speech[2][:300].numpy(), 16000)
    manifest.write_text(manifest.read_text().replace("2.wav\t16000", "2.wav\t300"))
    with pytest.raises(dp.ConfigError) as err:
        task_for(data, teacher, min_sample_size=100).load_dataset("train")
    assert one_line(err) == (
        f"{manifest}: 1 utterance(s) shorter than 400 samples, the teacher's CNN's receptive field (the "
        "shortest 300), are kept by task.min_sample_size=100; set it to at least 400"
    )
    task = task_for(data, teacher, min_sample_size=400)
    task.load_dataset("train")
    assert len(task.datasets["train"]) == 2


def test_missing_unsupported_or_student_teacher(data, tiny_teachers, tmp_path):
    with pytest.raises(dp.CheckpointError) as err:
        task_for(data, tmp_path / "nope.pt")
    assert one_line(err) == f"task.teacher_path: {tmp_path / 'nope.pt'}: no such checkpoint file"

    state = torch.load(tiny_teachers["wav2vec2_base"])
    state["cfg"]["model"]["_name"] = "wav2vec_ctc"
    torch.save(state, tmp_path / "ctc.pt")
    with pytest.raises(dp.CheckpointError, match="'wav2vec_ctc' is not supported"):
        task_for(data, tmp_path / "ctc.pt")

    student = dp.save_model(dp.student_from_teacher(tiny_teachers["hubert_base"]), tmp_path / "student.pt")
    with pytest.raises(dp.CheckpointError, match="holds a dphubert student, not a native fairseq teacher"):
        task_for(data, student)


def test_normalisation_must_match_the_teacher(data, tiny_teachers):
    with pytest.raises(ValueError, match="task.normalize=False but the teacher .* normalize=True"):
        task_for(data, tiny_teachers["hubert_large"])
    task_for(data, tiny_teachers["hubert_large"], normalize=True)


@pytest.mark.slow
def test_cli_reports_bad_manifest_before_training(data, tiny_teachers, tmp_path):
    shutil.rmtree(data / "audio")
    (data / "audio").mkdir()
    (data / "valid.tsv").write_text((data / "train.tsv").read_text())
    save_dir = tmp_path / "out"
    out = P.hydra_train(
        "dphubert",
        [
            f"task.data={data}",
            f"task.teacher_path={tiny_teachers['hubert_base']}",
            f"checkpoint.save_dir={save_dir}",
            'criterion.distill_layers="0;1,2,3"',
            *P.CPU_OVERRIDES,
        ],
    )
    assert out.returncode != 0
    assert (
        f"{data / 'valid.tsv'}:2: audio file {data / 'audio' / '0.wav'} does not exist"
        in out.stdout + out.stderr
    )
    assert not (save_dir / "checkpoint_last.pt").exists()


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path):
    """fairseq's trainer writes checkpoints through torch_persistent_save: a temporary file renamed into
    place. A failure while writing leaves the previous checkpoint_last.pt untouched."""
    from fairseq import checkpoint_utils

    path = str(tmp_path / "checkpoint_last.pt")
    checkpoint_utils.torch_persistent_save({"model": {"w": torch.ones(3)}}, path)
    good = open(path, "rb").read()
    with pytest.raises(Exception):
        checkpoint_utils.torch_persistent_save({"model": {"w": torch.ones(3)}, "bad": lambda: 0}, path)
    assert open(path, "rb").read() == good


def test_an_asynchronous_write_in_place_leaves_the_hard_linked_checkpoints_alone(tmp_path, monkeypatch):
    """The plugin's checkpoint copies may be hard links of checkpoint_E_N.pt; fairseq's asynchronous writes
    (checkpoint.write_checkpoints_asynchronously) open their file in place, through ``PathManager.opena``
    (iopath's, here a plain open in its stead): the written name is unlinked first, so the older checkpoint
    that shared its file keeps its content."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    monkeypatch.setattr(PathManager, "opena", staticmethod(lambda path, mode="r", *a, **k: open(path, mode)))
    older = str(tmp_path / "checkpoint_1_10.pt")
    last = str(tmp_path / "checkpoint_last.pt")
    checkpoint_utils.torch_persistent_save({"model": {"w": torch.ones(3)}}, older)
    assert checkpoint_utils.PathManager.copy(older, last, overwrite=True)
    if os.stat(last).st_nlink == 1:
        pytest.skip("this file system made a full copy, not a hard link")
    checkpoint_utils.torch_persistent_save({"model": {"w": torch.zeros(5)}}, last, async_write=True)
    assert torch.equal(torch.load(older)["model"]["w"], torch.ones(3))
    assert torch.equal(torch.load(last)["model"]["w"], torch.zeros(5))
