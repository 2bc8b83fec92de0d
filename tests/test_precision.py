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


def _amp_and_plain_updates(cfg, make_params):
    """One AMP step (fairseq's AMPOptimizer with a loss scale of 1024) and one fp32 step on equal copies of the
    parameters; returns their updates and the AMP optimizer."""
    from fairseq import optim
    from fairseq.optim.amp_optimizer import AMPOptimizer

    updates = []
    for amp in (True, False):
        params = make_params()
        start = [p.detach().clone() for p in params]
        if amp:
            opt = AMPOptimizer.build_optimizer(cfg, params)
            opt._grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # CUDA's scaler is off on CPU
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
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import helpers as P

    cfg = P.compose(
        os.path.join(P.REPO, "configs"),
        "dphubert",
        ["task.data=D", "task.teacher_path=T", "checkpoint.save_dir=O", "optimization.max_update=10"],
    )

    def make_params():
        params = []
        for group in ("default", "gates", "lagrangian"):
            for _ in range(2):
                p = torch.nn.Parameter(torch.ones(3))
                p.param_group = group
                params.append(p)
        return params

    (amp, plain), opt = _amp_and_plain_updates(cfg, make_params)
    assert any(u.abs().max() > 0 for u in plain)
    for a, b in zip(amp, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    state = opt.state_dict()  # checkpoints save it
    assert set(state) == {"default", "gates", "lagrangian"}
    opt.load_state_dict(state)


def test_amp_step_equals_the_fp32_step_with_stage2s_plain_adam():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import helpers as P

    cfg = P.compose(
        os.path.join(P.REPO, "configs"),
        "dphubert_final",
        ["task.data=D", "task.teacher_path=T", "checkpoint.save_dir=O", "task.student_path=S"],
    )
    (amp, plain), _ = _amp_and_plain_updates(
        cfg, lambda: [torch.nn.Parameter(torch.ones(3)) for _ in range(6)]
    )
    for a, b in zip(amp, plain):  # without the fix the smallest gradients' updates shrank ~250-fold
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
