import math

import pytest
import torch

from dphubert_fairseq.models.hard_concrete import BETA, LEFT, RIGHT, GateSet, HardConcrete, sample

#: P(gate > 0) = sigmoid(log_alpha - beta log(-l / r)) with beta = 2/3, (l, r) = (-0.1, 1.1) (docs/method.md,
#: "Gates: constants and their sources"), evaluated by hand at these logits
OPEN_PROBABILITY = {-3.0: 0.197594, 0.0: 0.831822, 1.0: 0.930771, 3.0: 0.990034, math.log(99): 0.997962}


def test_the_constants_are_the_papers():
    assert (BETA, LEFT, RIGHT) == (2 / 3, -0.1, 1.1)


def test_open_probability_and_expected_l0_at_known_logits():
    gate = HardConcrete(len(OPEN_PROBABILITY), init_drop_rate=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(list(OPEN_PROBABILITY)))
    expected = torch.tensor(list(OPEN_PROBABILITY.values()))
    assert torch.allclose(gate.prob_open(), expected, atol=1e-6)
    assert gate.l0_norm().item() == pytest.approx(sum(OPEN_PROBABILITY.values()), abs=1e-5)


def test_initialisation_follows_the_drop_rate():
    torch.manual_seed(0)
    gate = HardConcrete(1000, init_drop_rate=0.01)  # log(0.99 / 0.01) = log 99, spread 0.01
    assert abs(gate.log_alpha.mean().item() - math.log(99)) < 0.01
    assert abs(gate.log_alpha.std().item() - 0.01) < 0.002
    assert gate.l0_norm().item() == pytest.approx(1000 * 0.997962, rel=1e-3)


def test_samples_are_in_unit_interval_and_match_the_open_probability():
    torch.manual_seed(0)
    gate = HardConcrete(4, init_drop_rate=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, 0.0, 1.0, 3.0]))
    gate.train()
    samples = torch.stack([gate() for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1
    open_rate = (samples > 0).float().mean(0)
    assert torch.allclose(open_rate, gate.prob_open().detach(), atol=0.02)
    assert (samples == 1).any() and (samples == 0).any()  # the stretch makes exact 0s and 1s


def test_deterministic_mask_zeroes_the_expected_number_of_smallest_gates():
    gate = HardConcrete(10, init_drop_rate=0.5).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-4, 4, 10))
    mask = gate()
    zeros = round(10 - gate.l0_norm().item())
    assert (mask == 0).sum().item() == zeros
    assert (mask[:zeros] == 0).all()
    # the kept gates keep sigmoid(log_alpha / beta * 0.8): by hand, 0.991837 at log_alpha 4, 0.976645 at 28/9
    assert mask[-1].item() == pytest.approx(0.991837, abs=1e-6)
    assert mask[-2].item() == pytest.approx(0.976645, abs=1e-6)


def test_arithmetic_stays_float32_in_half_precision():
    gate = HardConcrete(8, init_drop_rate=0.01).half().train()
    assert gate().dtype == torch.float32
    assert gate.l0_norm().dtype == torch.float32
    assert gate.log_alpha.dtype == torch.float32  # the gate refuses to be cast down


def test_gate_set_counts_and_draws_like_the_gates_one_by_one():
    torch.manual_seed(0)
    gates = [HardConcrete(n, init_drop_rate=r) for n, r in ((3, 0.01), (1, 0.01), (7, 0.5))]
    with torch.no_grad():
        for g in gates:
            g.log_alpha.normal_(0.0, 2.0)
    gate_set = GateSet(gates)
    expected = gate_set.expected_open()
    one_by_one = torch.stack([g.l0_norm() for g in gates])
    assert torch.allclose(expected, one_by_one)
    (grads,) = torch.autograd.grad((expected * torch.tensor([1.0, 2.0, 3.0])).sum(), [gates[2].log_alpha])
    assert torch.allclose(grads, 3.0 * torch.autograd.grad(gates[2].l0_norm(), [gates[2].log_alpha])[0])

    for g in gates:
        g.train()
    torch.manual_seed(1)
    with gate_set.drawn():
        drawn = [g() for g in gates]
        assert all(torch.equal(g(), d) for g, d in zip(gates, drawn))  # one sample per forward pass
    torch.manual_seed(1)
    together = sample(torch.cat([g.log_alpha for g in gates]))
    assert torch.equal(torch.cat(drawn), together)
    assert all(g.drawn is None for g in gates)  # cleared: outside a forward pass, gates sample on their own
    assert drawn[2].requires_grad


def test_a_training_forward_draws_each_gate_once(tiny_teachers):
    import dphubert_fairseq as dp

    model = dp.student_from_teacher(tiny_teachers["hubert_base"]).train()
    seen = []
    for gate in model.gates().values():
        gate.register_forward_hook(lambda module, args, out: seen.append((module, out)))
    model(torch.randn(1, 8000))
    assert {id(m) for m, _ in seen} == {id(g) for g in model.gates().values()}
    assert all(out is m.drawn or m.drawn is None for m, out in seen)
    # the expected size, counted for all gates at once, reaches every gate's logits
    expected = model.expected_params()
    expected.backward()
    assert all(g.log_alpha.grad is not None for g in model.gates().values())
