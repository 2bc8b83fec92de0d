"""A student made from a teacher, gates off, computes the teacher's hidden states."""

import pytest
import torch
from helpers import TEACHER_SHAPES, padded_batch

import dphubert_fairseq as dp


def _frame_mask(student, mask, frames):
    m = student.frame_padding_mask(mask, frames)
    return torch.zeros(mask.size(0), frames, dtype=torch.bool) if m is None else m


@pytest.mark.parametrize("shape", list(TEACHER_SHAPES))
def test_student_reproduces_teacher_on_padded_batch(tiny_teachers, unequal_batch, shape):
    teacher = dp.load_teacher(tiny_teachers[shape])
    student = dp.student_from_teacher(tiny_teachers[shape], prune_units=()).eval()
    source, mask = padded_batch(unequal_batch, normalize=student.cfg.normalize)
    with torch.no_grad():
        expected = dp.teacher_hidden_states(teacher, source, mask)
        got = student.hidden_states(source, mask)
    assert len(got) == len(expected) == student.cfg.encoder_layers + 1
    frame_mask = _frame_mask(student, mask, got[0].size(1))
    assert frame_mask.any() and not frame_mask.all()
    for layer, (s, t) in enumerate(zip(got, expected)):
        assert s.shape == t.shape
        assert s.dtype == torch.float32
        assert (s - t).abs().max().item() <= 1e-5, f"layer {layer}"
        assert t[~frame_mask].abs().mean() > 0.1  # real, unit-scale activations


@pytest.mark.parametrize("shape", ["hubert_base", "data2vec_base"])
def test_teacher_hidden_states_match_fairseq_extract_features(tiny_teachers, unequal_batch, shape):
    """Our reading of the teacher's layers is fairseq's own: the last one equals extract_features' output."""
    teacher = dp.load_teacher(tiny_teachers[shape])
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        ours = dp.teacher_hidden_states(teacher, source, mask)
        out = teacher.extract_features(source, padding_mask=mask, mask=False)
    x, frame_mask = (out["x"], out["padding_mask"]) if isinstance(out, dict) else out
    assert frame_mask.any()
    assert torch.allclose(ours[-1][~frame_mask], x[~frame_mask], atol=1e-6)


@pytest.mark.parametrize("shape", ["hubert_base", "wav2vec2_large"])
def test_teacher_stops_after_the_last_layer_asked_for(tiny_teachers, unequal_batch, shape):
    teacher = dp.load_teacher(tiny_teachers[shape])
    source, mask = padded_batch(unequal_batch, normalize=shape.endswith("large"))
    with torch.no_grad():
        full = dp.teacher_hidden_states(teacher, source, mask)
        for n in (0, 1, 2):
            part = dp.teacher_hidden_states(teacher, source, mask, num_layers=n)
            assert len(part) == n + 1
            assert all(torch.equal(a, b) for a, b in zip(part, full))


def test_student_of_base_sized_hubert_reproduces_teacher(teacher_dir, speech):
    import helpers

    _, _, teacher, _ = helpers.build("hubert", teacher_dir + "/base_labels", size="base")
    teacher.eval()
    student = dp.student_from_teacher(teacher, prune_units=()).eval()
    source, mask = padded_batch([speech[0][:24000], speech[3][:16000]])
    with torch.no_grad():
        expected = dp.teacher_hidden_states(teacher, source, mask)
        got = student.hidden_states(source, mask)
    for s, t in zip(got, expected):
        assert (s - t).abs().max().item() <= 1e-5


def test_a_data2vec_checkpoint_without_its_ema_copy_loads(tiny_teachers, tmp_path, unequal_batch):
    """fairseq's data2vec insists on its EMA copy of the encoder when loaded at an update count; a teacher
    needs none, and a checkpoint stripped of it loads all the same."""
    state = torch.load(tiny_teachers["data2vec_base"], weights_only=False)
    assert "_ema" in state["model"]
    del state["model"]["_ema"]
    torch.save(state, tmp_path / "stripped.pt")
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        a = dp.teacher_hidden_states(dp.load_teacher(tiny_teachers["data2vec_base"]), source, mask)
        b = dp.teacher_hidden_states(dp.load_teacher(str(tmp_path / "stripped.pt")), source, mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
