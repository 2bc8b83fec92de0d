"""The distillation criterion in-process: loss values at known points, prediction-head mode, logging."""

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig
from dphubert_fairseq.criterions.distill_loss import parse_layer_groups
from dphubert_fairseq.models.dphubert import DPHuBERTConfig
from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask


@pytest.fixture(scope="module")
def task(tiny_teachers, tmp_path_factory):
    cfg = DPHuBERTDistillConfig(
        data=str(tmp_path_factory.mktemp("none")),
        teacher_path=tiny_teachers["hubert_base"],
        tpu=False,
        seed=1,
    )
    return DPHuBERTDistillTask.setup_task(OmegaConf.structured(cfg))


def build(task, prune_units=(), **criterion_kw):
    model = task.build_model(
        OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=list(prune_units)))
    )
    criterion = DPHuBERTDistillCriterion(DPHuBERTDistillCriterionConfig(**criterion_kw), task)
    return model, criterion


def sample(batch=2, length=12000):
    torch.manual_seed(0)
    return {"net_input": {"source": torch.randn(batch, length), "padding_mask": None}}


def test_a_copy_of_the_teacher_has_the_minimal_loss(task):
    model, criterion = build(task, distill_layers="0;1,2,3", lagrangian=False)
    model.eval()
    loss, sample_size, log = criterion(model, sample())
    assert sample_size == 1
    # identical states through identity projections: L1 0, cosine 1
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)
    assert log["distill_loss"] == pytest.approx(-1.0, abs=1e-5)
    assert log["eval_sparsity"] == pytest.approx(0.0, abs=1e-9)


def test_prediction_heads_and_lagrangian_logging(task):
    model, criterion = build(
        task,
        prune_units=("head", "interm"),
        distill_layers="1;3",
        prediction_heads=True,
        target_sparsity=0.4,
        sparsity_warmup_updates=10,
    )
    assert len(criterion.projections.proj) == 2 and criterion.projections.targets == [1, 3]
    criterion.set_num_updates(5)
    model.train()
    loss, _, log = criterion(model, sample())
    loss.backward()
    assert log["target_sparsity"] == pytest.approx(0.2)
    for key in ("expected_sparsity", "lambda1", "lambda2", "expected_params", "distill_loss"):
        assert key in log
    assert all(p.grad is not None for p in criterion.projections.parameters())
    assert criterion.lagrangian.lambda1.grad is not None
    assert any(g.log_alpha.grad is not None for g in model.gates().values())


def test_validation_loss_is_the_mean_over_frames(task):
    """Validation's loss and distill_loss are means over every frame of the split, each batch weighted by its
    frames (as fairseq's meters aggregate the batches' reduced logs), so that batching and the number of
    workers do not change them; training logs its per-update means as before."""
    from fairseq.logging import metrics

    model, criterion = build(task, distill_layers="1;3", lagrangian=False)
    torch.manual_seed(0)
    with torch.no_grad():  # a student that is not the teacher, so that the batches' losses differ
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    logs = [criterion(model, sample(batch=b, length=n))[2] for b, n in ((1, 4000), (3, 12000))]
    with metrics.aggregate(new_root=True) as agg:
        for log in logs:
            criterion.reduce_metrics([log])  # one valid step each, as fairseq's trainer reduces them
    frames = [float(log["ntokens"]) for log in logs]
    assert frames[0] < frames[1] / 3
    for key in ("loss", "distill_loss"):
        values = [float(log[key]) for log in logs]
        weighted = sum(v * f for v, f in zip(values, frames)) / sum(frames)
        assert agg.get_smoothed_value(key) == pytest.approx(weighted, abs=1e-5)
        assert abs(weighted - sum(values) / 2) > 1e-3  # what a mean over batches would have said
    model.train()
    log = criterion(model, sample())[2]
    assert not any(key.endswith("_x_frames") for key in log)


def test_distilhuberts_heads(task):
    """criterion.prediction_head=distilhubert: one head per target layer, each DistilHuBERT's (linear, GELU,
    linear at torch's default initialisation, seeded like the run), all reading the student's last layer and
    trained; refused without prediction_heads."""
    torch.manual_seed(3)
    model, criterion = build(
        task, distill_layers="1;3", prediction_heads=True, prediction_head="distilhubert", lagrangian=False
    )
    proj = criterion.projections
    assert proj.targets == [1, 3] and len(proj.proj) == 2
    for head in proj.proj:
        assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
        dim = head[0].in_features
        assert head[2].out_features == dim and head[0].weight.abs().max() <= dim**-0.5  # torch's bound
    torch.manual_seed(3)
    _, again = build(
        task, distill_layers="1;3", prediction_heads=True, prediction_head="distilhubert", lagrangian=False
    )
    assert all(
        torch.equal(a, b) for a, b in zip(proj.state_dict().values(), again.projections.state_dict().values())
    )
    model.train()
    states = model(**sample()["net_input"])["hidden_states"]
    first, second = proj(states)
    assert torch.allclose(first, proj.proj[0](states[-1])) and not torch.allclose(first, second)
    loss, _, _ = criterion(model, sample())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    with pytest.raises(ValueError) as err:
        build(task, distill_layers="1;3", prediction_head="distilhubert", lagrangian=False)
    assert str(err.value).startswith("criterion.prediction_head=distilhubert is a kind of prediction head")


def test_bad_criterion_settings(task):
    with pytest.raises(
        ValueError, match="criterion.distill_layers: layer 4 does not exist .the teacher has 3 layers"
    ):
        build(task, distill_layers="0;4,8,12")
    with pytest.raises(ValueError, match="cannot read"):
        parse_layer_groups("0;four")
    with pytest.raises(ValueError, match="target_sparsity must be in"):
        build(task, target_sparsity=1.5)
