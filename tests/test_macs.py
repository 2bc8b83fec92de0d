"""The analytic MAC count agrees with what torch's FLOP counter sees in real forward passes."""

import pytest
import torch
from helpers import randomise_gates
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dphubert_fairseq as dp
from dphubert_fairseq.macs import count_macs, nominal_samples
from dphubert_fairseq.teacher import config_from_fairseq

SAMPLES = 16000 + 123  # frames do not divide evenly: the conv length arithmetic is exercised


def counted_flops(model, source) -> int:
    # the math backend runs attention as matrix products, which the counter sees on every device
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        dp.teacher_hidden_states(model, source)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", ["hubert_base", "wav2vec2_large", "data2vec_base"])
def test_macs_of_a_fairseq_teacher(tiny_teachers, shape):
    teacher = dp.load_teacher(tiny_teachers[shape])
    source = torch.randn(1, SAMPLES)
    macs = count_macs(config_from_fairseq(teacher), SAMPLES)
    assert counted_flops(teacher, source) == 2 * macs.total


@pytest.mark.parametrize("shape", ["hubert_base", "wav2vec2_base", "data2vec_base"])
def test_macs_of_an_exported_model(tiny_teachers, shape):
    teacher = dp.load_teacher(tiny_teachers[shape])
    student = randomise_gates(
        dp.student_from_teacher(teacher, prune_units=["conv", "head", "interm", "attlayer", "ffnlayer"])
    )
    pruned = dp.prune(student.eval())
    assert pruned.num_params() < student.num_params()
    source = torch.randn(1, SAMPLES)
    macs = count_macs(pruned.cfg, SAMPLES)
    assert counted_flops(pruned, source) == 2 * macs.total
    # and the pruned model computes fewer MACs than its teacher, in every part that was pruned
    full = count_macs(config_from_fairseq(teacher), SAMPLES)
    assert sum(macs.conv) < sum(full.conv) and sum(macs.ffn) < sum(full.ffn)
    assert macs.frames == full.frames


def test_macs_scale_with_batch_and_length(tiny_teachers):
    cfg = config_from_fairseq(dp.load_teacher(tiny_teachers["hubert_base"]))
    one, two = count_macs(cfg, 32000), count_macs(cfg, 64000)
    assert (one.frames, two.frames) == (99, 199)
    # linear parts grow with the frames, attention's T^2 part faster
    assert two.ffn[0] * one.frames == one.ffn[0] * two.frames
    assert two.attention[0] * one.frames > one.attention[0] * two.frames


ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")


@pytest.mark.parametrize("shape", ["hubert_base", "wav2vec2_large"])
def test_expected_macs_are_the_exports_when_no_gate_is_stochastic(tiny_teachers, shape):
    """The MACs target's expected count is count_macs's arithmetic: with every gate saturated (open or
    closed), it is the MAC count of the model the export writes; ungated, the teacher's."""
    teacher_cfg = config_from_fairseq(dp.load_teacher(tiny_teachers[shape]))
    nominal = nominal_samples(teacher_cfg)
    student = randomise_gates(dp.student_from_teacher(tiny_teachers[shape], prune_units=ALL_UNITS))
    with torch.no_grad():
        for gate in student.gates().values():
            gate.log_alpha.copy_(torch.where(gate.log_alpha > 0, 30.0, -30.0))
    pruned = dp.prune(student.eval())
    exported = count_macs(pruned.cfg, nominal).total
    assert pruned.size("macs") == exported < count_macs(teacher_cfg, nominal).total
    assert student.eval_mask_size("macs") == exported
    assert float(student.eval_mask_size("macs", sync_free=True)) == pytest.approx(exported, rel=1e-6)
    assert float(student.expected_size("macs")) == pytest.approx(exported, rel=1e-6)
    assert student.cfg.teacher_macs == count_macs(teacher_cfg, nominal).total
    ungated = dp.student_from_teacher(tiny_teachers[shape], prune_units=())
    assert float(ungated.expected_size("macs")) == ungated.size("macs") == student.cfg.teacher_macs


@pytest.mark.parametrize("units", [["head"], ["interm"], ["attlayer", "ffnlayer"]])
def test_expected_macs_with_one_kind_of_unit_gated(tiny_teachers, units):
    """Gates on one kind of unit only (the others count one number for every layer): the expected MACs are
    the export's once the gates are saturated."""
    student = randomise_gates(dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=units))
    with torch.no_grad():
        for gate in student.gates().values():
            gate.log_alpha.copy_(torch.where(gate.log_alpha > 0, 30.0, -30.0))
    exported = dp.prune(student.eval()).size("macs")
    assert exported < student.size("macs")
    assert float(student.expected_size("macs")) == pytest.approx(exported, rel=1e-6)


def test_expected_macs_are_differentiable_in_every_gate(tiny_teachers):
    student = randomise_gates(dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=ALL_UNITS))
    student.expected_size("macs").backward()
    for name, gate in student.gates().items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, name
    # the CNN front end is a real share of the compute (it is a few percent of the parameters)
    macs_share = count_macs(student.cfg, nominal_samples(student.cfg)).conv
    assert sum(macs_share) / student.size("macs") > 0.2  # a real share of the compute
