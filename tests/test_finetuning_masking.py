"""Fine-tuning options of the dphubert model: time / channel masking and layerdrop (off in distillation)."""

import dataclasses

import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq.models.dphubert import as_config


def _with(model, **changes):
    cfg = dataclasses.replace(as_config(model.cfg), **changes)
    other = dp.DPHuBERTModel(cfg)
    other.load_state_dict(model.state_dict())
    return other


def test_masking_is_off_for_distillation_and_frozen(tiny_teachers):
    student = dp.student_from_teacher(tiny_teachers["hubert_base"])
    assert student.cfg.mask_prob == 0 and not student.masking.mask_emb.requires_grad
    teacher = dp.load_teacher(tiny_teachers["hubert_base"])
    assert torch.equal(student.masking.mask_emb, teacher.mask_emb)  # carried over from the teacher
    x = torch.randn(2, 50, student.cfg.encoder_embed_dim)
    assert torch.equal(student.train().masking(x, None), x)


def test_time_and_channel_masking_in_training_only(tiny_teachers):
    model = _with(
        dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=()),
        mask_prob=0.5,
        mask_length=5,
        mask_channel_prob=0.2,
        mask_channel_length=4,
    )
    assert model.masking.mask_emb.requires_grad
    torch.manual_seed(0)
    x = torch.randn(3, 80, model.cfg.encoder_embed_dim)
    out = model.train().masking(x, None)
    channels = (out == 0).all(1)  # (B, C): zeroed channel spans
    frames = ((out == model.masking.mask_emb) | channels.unsqueeze(1)).all(
        -1
    )  # (B, T): frames set to mask_emb
    assert 0.2 < frames.float().mean() < 0.9 and channels.any()
    kept = ~frames.unsqueeze(-1) & ~channels.unsqueeze(1)
    assert torch.equal(out[kept], x[kept])  # everything else untouched
    assert torch.equal(model.eval().masking(x, None), x)
    # through the fine-tuning entry point: masked in training, exact in eval
    source = torch.randn(2, 16000)
    model.train()
    masked = model.extract_features(source, None, mask=True)["x"]
    unmasked = model.extract_features(source, None, mask=False)
    assert masked.shape == unmasked[0].shape
    model.eval()
    a, b = model.extract_features(source, None, mask=True), model.extract_features(source, None, mask=False)
    assert torch.equal(a[0], b[0])


def test_layerdrop_skips_layers_in_training(tiny_teachers):
    model = _with(
        dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=()),
        encoder_layerdrop=1.0,
        dropout=0.0,
        attention_dropout=0.0,
        dropout_input=0.0,
    )
    states = model.train().hidden_states(torch.randn(1, 8000))
    assert len(states) == model.cfg.encoder_layers + 1
    assert all(torch.equal(states[i], states[1]) for i in range(2, len(states)))
    evaluated = model.eval().hidden_states(torch.randn(1, 8000))
    assert not torch.equal(evaluated[2], evaluated[1])


def test_masking_under_autocast_where_stock_hubert_fails(tiny_teachers):
    """Under autocast (common.amp) the features reach the masking in reduced precision while mask_emb stays
    float32: stock fairseq HuBERT's index put refuses the mix, the dphubert model masks (troubleshooting.md)."""
    model = _with(dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=()), mask_prob=0.5)
    teacher = dp.load_teacher(tiny_teachers["hubert_base"]).train()
    source = torch.randn(2, 16000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="Index put requires the source and destination dtypes match"):
            teacher.extract_features(source, None, mask=True)
        torch.manual_seed(0)
        masked = model.train().extract_features(source, None, mask=True)["x"]
    assert masked.dtype == torch.bfloat16 and torch.isfinite(masked).all()
