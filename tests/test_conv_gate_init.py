"""``model.conv_gate_init_drop_rate``: where the CNN's channel gates start. The reference's value by default and
in the parameter recipe; the compute-target configs (``configs/compute/``) start them nearer the decision
boundary."""

import math
import os

import helpers
import pytest
import torch
import yaml
from omegaconf import OmegaConf

import dphubert_fairseq.models.dphubert as dp
from dphubert_fairseq.models.hard_concrete import INIT_DROP_RATE


def logit(m: float) -> float:
    return math.log((1 - m) / m)


def conv_logits(model) -> torch.Tensor:
    return torch.cat(
        [b.gate.log_alpha.detach() for b in model.feature_extractor.blocks if b.gate is not None]
    )


def test_the_default_is_the_references_and_the_compute_configs_move_it_nearer_the_boundary():
    assert dp.DPHuBERTConfig().conv_gate_init_drop_rate == INIT_DROP_RATE["conv"] == 0.01
    for metric, start in (("macs", 0.5), ("latency", 0.2)):
        with open(os.path.join(helpers.CONFIGS, "compute", f"{metric}.yaml")) as f:
            compute = yaml.safe_load(f)
        assert compute["criterion"]["target_metric"] == metric
        assert compute["model"]["conv_gate_init_drop_rate"] == start  # docs/compute.md: the measurement
        with open(os.path.join(helpers.CONFIGS, f"dphubert_{metric}.yaml")) as f:
            assert yaml.safe_load(f)["defaults"] == ["_self_", "dphubert", f"compute/{metric}"]


def test_stage_1_starts_the_conv_gates_at_the_configured_drop_rate(speech_manifests, tiny_teachers):
    """Through the task, as fairseq-hydra-train builds stage 1: only the conv gates move, and the key is
    recorded with the model's config."""
    task = helpers.distill_task(speech_manifests, tiny_teachers["hubert_base"])

    def build(**model):
        torch.manual_seed(0)
        cfg = OmegaConf.structured(dp.DPHuBERTConfig(_name="dphubert", prune_units=["conv", "head"], **model))
        return task.build_model(cfg)

    reference, moved = build(), build(conv_gate_init_drop_rate=0.5)
    assert conv_logits(reference).mean().item() == pytest.approx(
        logit(0.01), abs=0.01
    )  # 4.6 from the boundary
    assert conv_logits(moved).mean().item() == pytest.approx(0.0, abs=0.01)
    assert moved.cfg.conv_gate_init_drop_rate == 0.5
    heads = [layer.self_attn.head_gate.log_alpha for layer in moved.encoder.layers]
    assert all(h.mean().item() == pytest.approx(logit(INIT_DROP_RATE["head"]), abs=0.01) for h in heads)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1])
def test_a_drop_rate_outside_0_1_is_refused(value):
    with pytest.raises(dp.ConfigError) as e:
        dp.validate_config(helpers.tiny_student_config(conv_gate_init_drop_rate=value))
    helpers.assert_one_line(str(e.value), starts_with="model.conv_gate_init_drop_rate must be in (0, 1)")
