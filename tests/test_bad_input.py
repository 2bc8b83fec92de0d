"""Bad input: one-line errors that name the file and the problem."""

import pytest
import torch
from helpers import assert_one_line

import dphubert_fairseq as dp


def _assert_one_line(err, path, *words):
    assert_one_line(str(err.value), starts_with=str(path), contains=words)
    # not a chained traceback from deep inside torch
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "teacher.pt"
    for load in (dp.load_teacher, dp.load_model, dp.student_from_teacher):
        with pytest.raises(dp.CheckpointError) as err:
            load(str(path))
        _assert_one_line(err, path, "no such")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is a text file\n")
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(str(path))
    _assert_one_line(err, path, "not a PyTorch checkpoint")
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(str(tmp_path))
    _assert_one_line(err, tmp_path, "directory")


def test_truncated_checkpoint(tmp_path, tiny_teachers):
    data = open(tiny_teachers["hubert_base"], "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(str(path))
    _assert_one_line(err, path, "corrupt or truncated")


def test_torch_file_that_is_not_a_fairseq_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(str(path))
    _assert_one_line(err, path, "not a fairseq checkpoint")


def test_unsupported_model_type(tmp_path, tiny_teachers):
    state = torch.load(tiny_teachers["wav2vec2_base"])
    state["cfg"]["model"]["_name"] = "wav2vec_ctc"
    path = tmp_path / "finetuned.pt"
    torch.save(state, path)
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(str(path))
    _assert_one_line(err, path, "'wav2vec_ctc' is not supported", "hubert", "wav2vec2")


def test_conformer_wav2vec2_is_refused(tmp_path):
    import helpers
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = helpers.training_args("wav2vec2", str(tmp_path))
    args.layer_type = "conformer"
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    path = helpers.save_with_trainer(
        str(tmp_path / "conformer.pt"), cfg, task, model, task.build_criterion(cfg.criterion)
    )
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(path)
    _assert_one_line(err, path, "not supported", "hubert, wav2vec2 and data2vec_audio")


def test_student_given_as_teacher_and_teacher_given_as_student(tmp_path, tiny_teachers, wavlm_teachers):
    student_path = dp.save_model(
        dp.student_from_teacher(tiny_teachers["hubert_base"]), tmp_path / "student.pt"
    )
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_teacher(student_path)
    _assert_one_line(err, student_path, "dphubert student", "load_model")
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_model(tiny_teachers["hubert_base"])
    _assert_one_line(err, tiny_teachers["hubert_base"], "'hubert'", "load_teacher")
    wavlm = next(iter(wavlm_teachers.values()))
    with pytest.raises(dp.CheckpointError) as err:
        dp.load_model(wavlm)
    _assert_one_line(err, wavlm, "holds a WavLM teacher (WavLM's own format), not a dphubert one")


def test_bad_prune_units(tiny_teachers):
    with pytest.raises(ValueError, match="unknown unit.*'heads'.*choose from"):
        dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=("heads",))


def test_teachers_load_without_the_import_time_allow_list(tiny_teachers):
    """On torch < 2.6, or with a fairseq that passes ``weights_only`` itself, the patch that allow-lists
    fairseq's classes at import is not installed; the plugin's own weights-only read of a teacher (a HuBERT
    one pickles fairseq's Dictionary) still allow-lists them."""
    import torch

    from dphubert_fairseq.safe_loading import allow_list_classes

    torch.serialization.clear_safe_globals()  # what such a process has
    try:
        teacher = dp.load_teacher(tiny_teachers["hubert_base"])
    finally:
        allow_list_classes()  # as this process had them, for the other tests
    assert sum(p.numel() for p in teacher.parameters()) > 0
