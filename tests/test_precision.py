"""fp16 / bf16 / AMP: gate logits, their arithmetic and the Lagrangian stay float32."""

import pytest
import torch

import dphubert_fairseq as dp
from dphubert_fairseq.criterions.lagrangian import SparsityLagrangian


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_casting_the_model_keeps_gates_float32(tiny_teachers, cast):
    model = dp.student_from_teacher(
        tiny_teachers["hubert_base"], prune_units=("conv", "head", "interm", "attlayer")
    )
    before = {n: g.log_alpha.detach().clone() for n, g in model.gates().items()}
    model = model.half() if cast == "half" else model.to(dtype=torch.bfloat16)  # what fairseq's trainer does
    reduced = torch.float16 if cast == "half" else torch.bfloat16
    assert model.post_extract_proj.weight.dtype == reduced
    for name, gate in model.gates().items():
        assert gate.log_alpha.dtype == torch.float32
        assert torch.equal(gate.log_alpha, before[name])  # not rounded on the way
    lagrangian = SparsityLagrangian()
    lagrangian = lagrangian.half() if cast == "half" else lagrangian.to(dtype=torch.bfloat16)
    assert lagrangian.lambda1.dtype == lagrangian.lambda2.dtype == torch.float32

    model.train()
    if cast == "bfloat16":  # CPU has no fp16 convolutions; bf16 runs the whole forward
        source = torch.randn(2, 8000, dtype=reduced)
        states = model.hidden_states(source)
        assert states[-1].dtype == reduced
    expected = model.expected_params()
    assert expected.dtype == torch.float32
    with torch.no_grad():
        lagrangian.lambda1.fill_(0.5)
        lagrangian.lambda2.fill_(0.25)
    sparsity = 1.0 - expected / dp.count_params(model)
    term = lagrangian(sparsity, 0.5)
    assert term.dtype == torch.float32
    term.backward()
    assert all(g.log_alpha.grad.dtype == torch.float32 for g in model.gates().values())
    gap = sparsity.item() - 0.5
    assert lagrangian.lambda1.grad.item() == pytest.approx(-gap, rel=1e-5)  # ascent: the gradient is negated


def test_autocast_keeps_gate_arithmetic_float32(tiny_teachers):
    model = dp.student_from_teacher(tiny_teachers["hubert_base"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates = [g() for g in model.gates().values()]
        expected = model.expected_params()
        states = model.hidden_states(torch.randn(2, 8000))
    assert all(g.dtype == torch.float32 for g in gates)
    assert expected.dtype == torch.float32
    assert states[-1].dtype == torch.bfloat16  # the rest of the model did run in reduced precision


def test_lagrangian_is_maximised_over_the_multipliers():
    lagrangian = SparsityLagrangian()
    opt = torch.optim.SGD(lagrangian.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        lagrangian(torch.tensor(0.2), 0.5).backward()  # expected sparsity below target: gap -0.3
        opt.step()
    # ascent on lambda1 * gap makes lambda1 negative, on lambda2 * gap^2 makes lambda2 positive
    assert lagrangian.lambda1.item() < 0 < lagrangian.lambda2.item()


def cpu_amp_optimizer(cfg, params, init_scale: float = 1024.0):
    """fairseq's AMPOptimizer (as the trainer builds it under ``common.amp``) with torch's CPU GradScaler in
    place of CUDA's, which is off without a GPU."""
    from fairseq.optim.amp_optimizer import AMPOptimizer

    opt = AMPOptimizer.build_optimizer(cfg, params)
    opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return opt


def recipe_cfg(name: str = "dphubert"):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import helpers as P

    card = ["task.data=D", "task.teacher_path=T", "checkpoint.save_dir=O", "optimization.max_update=10"]
    if name == "dphubert_final":
        card.append("task.student_path=S")
    return P.compose(os.path.join(P.REPO, "configs"), name, card)


def grouped_params():
    """Two parameters in each of the recipe's composite optimizer groups."""
    params = []
    for group in ("default", "gates", "lagrangian"):
        for _ in range(2):
            p = torch.nn.Parameter(torch.ones(3))
            p.param_group = group
            params.append(p)
    return params


def overflowing_step(opt, params) -> None:
    """A backward pass whose gradients overflowed (one is inf), then the step fairseq takes."""
    opt.zero_grad()
    opt.backward(sum(p.sum() for p in params))
    params[0].grad[0] = float("inf")
    opt.clip_grad_norm(10.0)
    opt.step()


def _amp_and_plain_updates(cfg, make_params):
    """One AMP step (fairseq's AMPOptimizer with a loss scale of 1024) and one fp32 step on equal copies of the
    parameters; returns their updates and the AMP optimizer."""
    from fairseq import optim

    updates = []
    for amp in (True, False):
        params = make_params()
        start = [p.detach().clone() for p in params]
        if amp:
            opt = cpu_amp_optimizer(cfg, params)
        else:
            opt = optim.build_optimizer(cfg.optimizer, params)
        opt.zero_grad()
        scales = torch.logspace(-7, -2, 6)
        loss = sum((p * scales[i % 6]).sum() for i, p in enumerate(params))
        opt.backward(loss)
        opt.clip_grad_norm(10.0)
        opt.step()
        updates.append([p.detach() - s for p, s in zip(params, start)])
        if amp:
            amp_opt = opt
    return updates, amp_opt


def test_amp_unscales_gradients_once_with_the_recipes_composite_optimizer():
    """fairseq's AMPOptimizer unscaled every gradient twice (clip and step named different objects to the
    GradScaler) and failed on the composite optimizer; the plugin's fix makes an AMP step an fp32 step."""
    (amp, plain), opt = _amp_and_plain_updates(recipe_cfg(), grouped_params)
    assert any(u.abs().max() > 0 for u in plain)
    for a, b in zip(amp, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    state = opt.state_dict()  # checkpoints save it
    assert set(state) == {"default", "gates", "lagrangian", "amp_scaler"}
    opt.load_state_dict(state)


def test_amp_step_equals_the_fp32_step_with_stage2s_plain_adam(caplog):
    """Also: the run says, once, that its AMP steps are the patched ones (any task of a process that loaded
    the plugin gets them)."""
    with caplog.at_level("INFO", logger="fairseq.optim.amp_optimizer"):
        (amp, plain), _ = _amp_and_plain_updates(
            recipe_cfg("dphubert_final"), lambda: [torch.nn.Parameter(torch.ones(3)) for _ in range(6)]
        )
    for a, b in zip(amp, plain):  # without the fix the smallest gradients' updates shrank ~250-fold
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    said = [r.getMessage() for r in caplog.records if "unscaled once per update" in r.getMessage()]
    assert len(said) == 1 and "patch of AMPOptimizer" in said[0]


@pytest.mark.parametrize("name", ["dphubert", "dphubert_final"])
def test_amp_optimizer_is_still_the_torch_optimizer_to_fairseq(name):
    """``AMPOptimizer.optimizer`` stays the torch optimizer that reduce_lr_on_plateau, optimizer sharding and
    the trainer read; the fix lives in what clip and step hand the scaler."""
    make = grouped_params if name == "dphubert" else lambda: [torch.nn.Parameter(torch.ones(3))]
    opt = cpu_amp_optimizer(recipe_cfg(name), make())
    assert opt.optimizer is opt.fp32_optimizer.optimizer
    assert isinstance(opt.optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("name", ["dphubert", "dphubert_final"])
def test_the_loss_scale_survives_a_resume(name, tmp_path):
    """The scaler's state travels with the optimizer's in the checkpoint (read back weights-only), and a resumed
    optimizer continues from the loss scale the run had reached, not from common.fp16_init_scale."""
    make = grouped_params if name == "dphubert" else lambda: [torch.nn.Parameter(torch.ones(3))]
    params = make()
    opt = cpu_amp_optimizer(recipe_cfg(name), params)
    overflowing_step(opt, params)
    assert not opt.last_step_taken and opt.scaler.get_scale() == 512.0
    torch.save(opt.state_dict(), tmp_path / "state.pt")
    resumed = cpu_amp_optimizer(recipe_cfg(name), make())
    assert resumed.scaler.get_scale() == 1024.0
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.scaler.get_scale() == 512.0
    assert resumed.scaler.state_dict() == opt.scaler.state_dict()


def test_a_skipped_amp_step_is_not_an_update(tiny_teachers, tmp_path):
    """When the scaled gradients overflowed the scaler skips the step and fairseq retries the batch with the
    same update number: the criterion's once-per-update work (inactive-unit checks, the landing) runs once per
    step taken, not once per try."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import landing_student

    task, model, criterion = landing_student(
        tmp_path,
        tiny_teachers["hubert_base"],
        ["interm"],
        inactive_check_interval=1,
        inactive_checks=2,
        inactive_threshold=0.99,  # every FFN unit (P(open) about 0.83 at the start) is below it
    )
    params = [p for m in (model, criterion) for p in m.parameters() if p.requires_grad]
    opt = cpu_amp_optimizer(recipe_cfg(), params)
    gate = model.gates()["encoder.layers.0.ffn.unit_gate"]
    sample = {"net_input": {"source": torch.randn(2, 8000), "padding_mask": None}}
    model.train()
    for overflow in (True, False):  # the first try overflows, fairseq retries the batch as the same update
        opt.zero_grad()
        task.train_step(sample, model, criterion, opt, update_num=3)
        if overflow:
            gate.log_alpha.grad[0] = float("inf")
        opt.clip_grad_norm(10.0)
        task.optimizer_step(opt, model, update_num=3)
        assert opt.last_step_taken is not overflow
        if overflow:
            assert criterion.projection_offset is None  # no landing for a step not taken
    assert criterion.projection_offset is not None
    assert int(gate.below_threshold_checks.max()) == 1  # one check for the one update taken
    assert gate.all_active  # two checks in a row are needed


def test_the_landing_shift_survives_fp16s_flat_master_copy(tiny_teachers, tmp_path, monkeypatch):
    """``common.fp16`` with flattened gradients (fairseq's default): ``FP16Optimizer`` keeps one flat float32
    copy of every parameter and writes it over the model at each step. The landing's shift of the gate logits
    reaches that copy too, so the next step starts from the shifted logits instead of undoing the shift."""
    import os
    import sys

    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from omegaconf import open_dict

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import landing_student

    # fairseq builds its flat copy on torch.cuda.current_device(); None is the CPU parameters' device index
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    cfg = recipe_cfg("dphubert_final")  # one optimizer: the composite one refuses flat copies
    with open_dict(cfg):
        cfg.common.amp, cfg.common.fp16, cfg.common.fp16_no_flatten_grads = False, True, False
    task, model, criterion = landing_student(
        tmp_path, tiny_teachers["hubert_base"], ["interm"], target_sparsity=0.2
    )
    params = [p for m in (model, criterion) for p in m.parameters() if p.requires_grad]
    opt = FP16Optimizer.build_optimizer(cfg, params)
    assert opt.has_flat_params
    gate = model.gates()["encoder.layers.0.ffn.unit_gate"]
    sample = {"net_input": {"source": torch.randn(2, 8000), "padding_mask": None}}
    model.train()
    index = [id(p) for p in opt.fp16_params].index(id(gate.log_alpha))
    start = sum(p.numel() for p in opt.fp16_params[:index])
    offsets = []
    for update in (3, 4):
        opt.zero_grad()
        task.train_step(sample, model, criterion, opt, update_num=update)
        opt.clip_grad_norm(10.0)
        before = gate.log_alpha.detach().clone()
        task.optimizer_step(opt, model, update_num=update)
        offsets.append(float(criterion.projection_offset))
        # the step moves each logit by about lr (1e-4), the landing by the offset
        assert torch.allclose(gate.log_alpha.detach(), before + offsets[-1], atol=1e-3)
        flat = next(iter(opt.fp32_params.values()))
        assert torch.equal(flat.data[start : start + gate.n], gate.log_alpha.detach())
    # the first landing moves the gates by logit units; the second finds them where the first left them
    assert abs(offsets[0]) > 0.5 and abs(offsets[1]) < 0.05, offsets
