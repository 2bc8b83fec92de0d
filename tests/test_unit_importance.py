"""Unit importance (``unit_importance``): each unit's weight norm, and the option that starts the gates from it
(``model.gate_init_importance``): off by default, the reference's constant start plus the spread when on."""

import helpers
import pytest
import torch
from omegaconf import OmegaConf

import dphubert_fairseq as dp
from dphubert_fairseq.models.hard_concrete import INIT_DROP_RATE
from dphubert_fairseq.unit_importance import init_gates_from_importance, standardised_log, unit_scores


@pytest.fixture
def gated(tiny_teachers):
    return dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=("conv", "head", "interm"))


def test_scores_are_the_weights_of_each_unit(gated):
    scores = unit_scores(gated)
    blocks = gated.feature_extractor.blocks
    assert sorted(scores) == sorted(name for name, g in gated.gates().items() if g.n > 1)
    for i, block in enumerate(blocks):
        consumer = blocks[i + 1].conv.weight if i + 1 < len(blocks) else gated.post_extract_proj.weight
        for c in (0, block.out_channels - 1):
            direct = block.conv.weight[c].pow(2).sum() + consumer[:, c].pow(2).sum()
            assert scores[f"feature_extractor.blocks.{i}.gate"][c] == pytest.approx(float(direct), rel=1e-5)
    attn, ffn = gated.encoder.layers[1].self_attn, gated.encoder.layers[1].ffn
    d = attn.head_dim
    for h in range(attn.num_heads):
        rows = slice(h * d, (h + 1) * d)
        direct = sum(p.weight[rows].pow(2).sum() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        direct = direct + attn.out_proj.weight[:, rows].pow(2).sum()
        assert scores["encoder.layers.1.self_attn.head_gate"][h] == pytest.approx(float(direct), rel=1e-5)
    direct = ffn.fc1.weight[7].pow(2).sum() + ffn.fc2.weight[:, 7].pow(2).sum()
    assert scores["encoder.layers.1.ffn.unit_gate"][7] == pytest.approx(float(direct), rel=1e-5)


def test_standardised_log_keeps_the_order_and_has_unit_spread():
    z = standardised_log(torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    assert torch.allclose(z, torch.tensor([-1.3416, -0.4472, 0.4472, 1.3416]), atol=1e-4)
    assert torch.equal(standardised_log(torch.full((5,), 3.0)), torch.zeros(5))


def test_the_spread_is_added_around_the_references_start(gated):
    before = {name: g.log_alpha.detach().clone() for name, g in gated.gates().items()}
    init_gates_from_importance(gated, 0.0)
    assert all(torch.equal(g.log_alpha, before[name]) for name, g in gated.gates().items())
    scores = unit_scores(gated)
    init_gates_from_importance(gated, 1.5)
    for name, gate in gated.gates().items():
        shift = gate.log_alpha.detach() - before[name]
        if name not in scores:  # a whole-layer gate: nothing to rank
            assert torch.equal(shift, torch.zeros_like(shift))
            continue
        assert torch.allclose(shift, 1.5 * standardised_log(scores[name]), atol=1e-6)
        assert abs(float(shift.mean())) < 1e-5 and float(shift.std(unbiased=False)) == pytest.approx(
            1.5, rel=1e-4
        )
        # the heavier unit starts more open
        heavy, light = int(scores[name].argmax()), int(scores[name].argmin())
        assert gate.log_alpha[heavy] > gate.log_alpha[light]
    with pytest.raises(ValueError, match="spread must be >= 0"):
        init_gates_from_importance(gated, -1.0)


def test_the_task_starts_stage_1_from_importance_only_when_asked(speech_manifests, tiny_teachers):
    task = helpers.distill_task(speech_manifests, tiny_teachers["hubert_base"])

    def build(**model):
        cfg = OmegaConf.structured(
            dp.DPHuBERTConfig(_name="dphubert", prune_units=["head", "interm"], **model)
        )
        return task.build_model(cfg), cfg

    default, _ = build()
    ffn_start = float(torch.log(torch.tensor((1 - INIT_DROP_RATE["interm"]) / INIT_DROP_RATE["interm"])))
    gate = default.encoder.layers[0].ffn.unit_gate.log_alpha
    assert (gate - ffn_start).abs().max() < 0.1  # the reference's constant start, N(mean, 0.01)
    spread, cfg = build(gate_init_importance=2.0)
    assert cfg.gate_init_importance == 2.0  # recorded with the model's config in its checkpoints
    scores = unit_scores(spread)["encoder.layers.0.ffn.unit_gate"]
    shift = spread.encoder.layers[0].ffn.unit_gate.log_alpha.detach() - ffn_start
    assert torch.corrcoef(torch.stack([shift, standardised_log(scores)]))[0, 1] > 0.99
    with pytest.raises(dp.ConfigError, match="model.gate_init_importance must be >= 0"):
        build(gate_init_importance=-0.5)
