import math

import torch

from dphubert_fairseq.models.hard_concrete import BETA, LEFT, RIGHT, HardConcrete


def test_init_and_expected_l0():
    torch.manual_seed(0)
    gate = HardConcrete(1000, init_drop_rate=0.01)
    assert abs(gate.log_alpha.mean().item() - math.log(99)) < 0.01
    assert abs(gate.log_alpha.std().item() - 0.01) < 0.002
    p = torch.sigmoid(gate.log_alpha - BETA * math.log(-LEFT / RIGHT))
    assert torch.allclose(gate.prob_open(), p)
    assert abs(gate.l0_norm().item() - p.sum().item()) < 1e-3


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
    assert torch.allclose(mask[zeros:], torch.sigmoid(gate.log_alpha[zeros:] / BETA * 0.8))


def test_arithmetic_stays_float32_in_half_precision():
    gate = HardConcrete(8, init_drop_rate=0.01).half().train()
    assert gate().dtype == torch.float32
    assert gate.l0_norm().dtype == torch.float32
    assert gate.log_alpha.dtype == torch.float32  # the gate refuses to be cast down
