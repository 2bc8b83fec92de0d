"""The analytic MAC count agrees with what torch's FLOP counter sees in real forward passes."""

import pytest
import torch
from helpers import randomise_gates
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dphubert_fairseq as dp
from dphubert_fairseq.macs import count_macs
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
