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
