"""Landing on the target: the projection's offset, what it does to the export, and that it never reads back."""

import pytest
import torch
from omegaconf import OmegaConf

import dphubert_fairseq as dp
from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig
from dphubert_fairseq.criterions.target_projection import offset_to_target, project_to_target
from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

UNITS = ("conv", "head", "interm")


def scattered_student(teacher: str, seed: int = 0):
    """A gated student whose gate logits are spread as after some training (N(0, 2))."""
    model = dp.student_from_teacher(teacher, prune_units=UNITS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.copy_(2.0 * torch.randn(gate.n, generator=g))
    return model


def largest_jump(model) -> int:
    """An upper bound of how much one unit changes the count: a conv channel of the widest layer pair."""
    sizes = model.unit_sizes("static")
    conv = (
        max(a * b for a, b in zip(sizes.conv_channels, sizes.conv_channels[1:]))
        * 3
        // min(sizes.conv_channels)
    )
    dim = model.cfg.encoder_embed_dim
    head = (dim + 1) * 3 * model.cfg.attention_head_dim + model.cfg.attention_head_dim * dim
    return max(conv, head, 2 * dim + 1)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
def test_projection_lands_the_export_on_the_target(tiny_teachers, target):
    model = scattered_student(tiny_teachers["hubert_base"])
    full = dp.count_params(model)
    before = 1.0 - model.eval_mask_params() / full
    order = {n: torch.argsort(g.log_alpha).tolist() for n, g in model.gates().items()}
    offset = project_to_target(model, (1.0 - target) * full)
    assert (offset.item() > 0) == (before > target)  # reopens when too sparse, closes when too dense
    assert {n: torch.argsort(g.log_alpha).tolist() for n, g in model.gates().items()} == order
    pruned = dp.prune(model)  # the export folds the masks the model now has: still exact
    assert pruned.pruning_report.exact and pruned.pruning_report.max_abs_deviation < 1e-4
    exported = dp.count_params(pruned)
    assert exported == model.eval_mask_params()  # the projection counted what the export keeps
    assert abs(exported - (1.0 - target) * full) <= largest_jump(model)
    # a second projection has nothing left to do
    again = offset_to_target(model, (1.0 - target) * full)
    assert model.eval_mask_params() == exported
    assert abs(again.item()) < 0.5


def test_an_unreachable_target_leaves_the_gates_alone(tiny_teachers):
    model = scattered_student(tiny_teachers["hubert_base"])
    before = {n: g.log_alpha.detach().clone() for n, g in model.gates().items()}
    offset = project_to_target(model, 10 * dp.count_params(model))  # more than the teacher has
    assert offset.item() == 0.0
    assert all(torch.equal(g.log_alpha, before[n]) for n, g in model.gates().items())


def test_the_offset_is_found_without_reading_back_to_the_host(tiny_teachers, monkeypatch):
    """On a GPU every value read back (.item(), bool(), int()) makes the host wait: the search reads none."""
    model = scattered_student(tiny_teachers["hubert_base"])

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    offset = offset_to_target(model, 0.5 * dp.count_params(model))
    monkeypatch.undo()
    assert offset.item() != 0.0


@pytest.fixture(scope="module")
def task(tiny_teachers, tmp_path_factory):
    cfg = DPHuBERTDistillConfig(
        data=str(tmp_path_factory.mktemp("none")), teacher_path=tiny_teachers["hubert_base"], tpu=False
    )
    return DPHuBERTDistillTask.setup_task(OmegaConf.structured(cfg))


def criterion_for(task, max_update: int, **kw) -> DPHuBERTDistillCriterion:
    cfg = OmegaConf.merge(
        OmegaConf.structured(DPHuBERTDistillCriterionConfig),
        {
            "max_update": max_update,
            "sparsity_warmup_updates": 10,
            "target_sparsity": 0.5,
            "distill_layers": "0;1,2,3",
            **kw,
        },
    )
    return DPHuBERTDistillCriterion(cfg, task)


def test_criterion_projects_in_the_final_phase_only(task, tiny_teachers):
    model = scattered_student(tiny_teachers["hubert_base"])
    criterion = criterion_for(task, max_update=100)  # target_projection_start 0.9: from update 90
    full = dp.count_params(model)
    before = model.eval_mask_params()
    criterion.after_optimizer_step(model, update_num=88)  # the 89th update
    assert model.eval_mask_params() == before and criterion.projection_offset is None
    criterion.after_optimizer_step(model, update_num=89)  # the 90th
    assert abs(model.eval_mask_params() - 0.5 * full) <= largest_jump(model)
    assert criterion.projection_offset is not None

    off = criterion_for(task, max_update=100, target_projection_start=1.0)
    model = scattered_student(tiny_teachers["hubert_base"])
    off.after_optimizer_step(model, update_num=99)
    assert model.eval_mask_params() == before


def test_a_run_of_unknown_length_says_it_will_not_land(task, caplog):
    """An epoch-limited run (optimization.max_update 0, the ramp set by hand) has no final phase to land in:
    the criterion says so at the start instead of silently relying on the Lagrangian."""
    with caplog.at_level("WARNING"):
        criterion = criterion_for(task, max_update=0, sparsity_warmup_updates=10)
    assert criterion.projection_from is None
    assert any(
        "optimization.max_update is not set: criterion.target_projection_start=0.9 cannot place the landing"
        in r.getMessage()
        for r in caplog.records
    )


def test_the_target_ramp_follows_the_run_length(task):
    """Unset, the ramp is a tenth of optimization.max_update, as the recipe's 5k of 50k: shortening a run is
    one knob. Set, it must end within the run."""
    assert criterion_for(task, max_update=50_000, sparsity_warmup_updates=None).sparsity_warmup == 5_000
    assert criterion_for(task, max_update=300, sparsity_warmup_updates=None).sparsity_warmup == 30
    assert criterion_for(task, max_update=300, sparsity_warmup_updates=200).sparsity_warmup == 200
    with pytest.raises(
        ValueError, match=r"sparsity_warmup_updates=10 is beyond optimization.max_update=9: the"
    ):
        criterion_for(task, max_update=9)
    with pytest.raises(
        ValueError, match=r"sparsity_warmup_updates: unset, and optimization.max_update is not"
    ):
        criterion_for(task, max_update=0, sparsity_warmup_updates=None)
    with pytest.raises(ValueError, match=r"target_projection_start must be in \[0, 1\], got 1.5"):
        criterion_for(task, max_update=100, target_projection_start=1.5)


def test_export_summary_states_the_target_and_a_miss():
    from dphubert_fairseq.export import format_summary

    summary = {
        "params": 134_716,
        "teacher_params": 682_817,
        "sparsity": 1 - 134_716 / 682_817,
        "target_sparsity": 0.75,
        "conv_channels": [64],
        "heads": [1],
        "ffn_dims": [8],
        "use_attention": [1],
        "use_ffn": [1],
        "exact": None,
    }
    text = format_summary(summary)
    assert "parameters: 134,716 of 682,817 (sparsity 0.8027); target 0.7500, 170,704 parameters" in text
    assert (
        "WARNING: stage 1 missed its target: sparsity 0.8027 reached, criterion.target_sparsity=0.7500 asked "
        "(0.0527 too sparse)" in text
    )
    assert "optimization.max_update" in text
    summary.update(params=160_000, sparsity=1 - 160_000 / 682_817)  # 0.7657: within 0.02
    assert "WARNING" not in format_summary(summary)


def test_a_base_shaped_student_lands_within_a_thousandth(tmp_path):
    """The recipe's shape (HuBERT Base, conv / head / FFN gates): the projection puts the eval-mask size
    within 0.001 of the target, from gate logits spread as after training, too dense or too sparse."""
    from helpers import build

    _, _, teacher, _ = build("hubert", str(tmp_path), size="base")
    model = dp.student_from_teacher(teacher, prune_units=UNITS)
    full = dp.count_params(model)
    g = torch.Generator().manual_seed(0)
    for centre in (-3.0, 3.0):
        with torch.no_grad():
            for gate in model.gates().values():
                gate.log_alpha.copy_(centre + 2.0 * torch.randn(gate.n, generator=g))
        project_to_target(model, 0.25 * full)
        assert abs(1.0 - model.eval_mask_params() / full - 0.75) < 1e-3


def ours(caplog):
    """The criterion's log records (not the timing of the blocks its first update asks for)."""
    return [r for r in caplog.records if r.name.startswith("dphubert_fairseq.criterions")]


def test_stage1_that_misses_its_target_says_so_at_its_last_update(task, tiny_teachers, caplog):
    model = scattered_student(tiny_teachers["hubert_base"])
    reached = 1.0 - model.eval_mask_params() / dp.count_params(model)
    off = criterion_for(task, max_update=100, target_projection_start=1.0, target_sparsity=0.9)
    with caplog.at_level("INFO"):
        off.after_optimizer_step(model, update_num=98)
        assert not ours(caplog)  # only the last update reports
        off.after_optimizer_step(model, update_num=99)
    (record,) = ours(caplog)
    assert record.levelname == "WARNING"
    assert f"sparsity {reached:.4f} reached, criterion.target_sparsity=0.9000 asked" in record.getMessage()
    assert "optimization.max_update" in record.getMessage()
    # one that lands says where it ended, quietly
    caplog.clear()
    landing = criterion_for(task, max_update=100)
    with caplog.at_level("INFO"):
        landing.after_optimizer_step(model, update_num=99)
    assert [r.levelname for r in ours(caplog)] == ["INFO"]
    message = ours(caplog)[0].getMessage()
    assert (
        message.startswith("stage 1 ends at sparsity 0.") and "(criterion.target_sparsity=0.5000)" in message
    )
    assert abs(float(message.split()[5]) - 0.5) <= 0.02
