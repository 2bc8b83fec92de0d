"""WavLM and data2vec teachers through fairseq's own trainer. DPWavLM: stage 1 from a WavLM checkpoint as
released, export, reload with stock fairseq, stage 2, and stock CTC fine-tuning of the result. data2vec audio:
stage 1 and an exact export."""

import os

import helpers as P
import pytest
import torch
from fairseq import checkpoint_utils
from helpers import padded_batch

import dphubert_fairseq as dp
from dphubert_fairseq.export import model_from_training_checkpoint
from dphubert_fairseq.teacher import teacher_identity

pytestmark = pytest.mark.slow  # fairseq-hydra-train and dphubert-export runs

UPDATES = 60


def overrides(data, teacher, save_dir, max_update=UPDATES):
    return P.tiny_run_overrides(data, teacher, save_dir, max_update, log_interval=10) + [
        f"checkpoint.save_interval_updates={max_update}",
        f"dataset.validate_interval_updates={max_update}",
    ]


@pytest.fixture(scope="module")
def dpwavlm(tmp_path_factory, speech_manifests, wavlm_teachers):
    """Stage 1 from the tiny WavLM Base-shaped teacher, target sparsity 0.5, exported."""
    work = tmp_path_factory.mktemp("dpwavlm")
    teacher = wavlm_teachers["wavlm_base"]
    out = P.hydra_train(
        "dphubert",
        overrides(speech_manifests, teacher, str(work / "stage1"))
        + ["criterion.target_sparsity=0.5", f"criterion.sparsity_warmup_updates={UPDATES // 3}"]
        + P.schedule_overrides("dphubert", 5, {"default": 2e-4, "gates": 0.1, "lagrangian": 0.1}),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exported = str(work / "dpwavlm.pt")
    result = P.export(str(work / "stage1" / "checkpoint_last.pt"), exported)
    assert result.returncode == 0, result.stdout + result.stderr
    return work, teacher, exported, result.stdout


def test_stage1_from_a_wavlm_checkpoint_exports_a_smaller_dpwavlm(dpwavlm, unequal_batch):
    work, teacher_path, exported, printed = dpwavlm
    teacher = dp.load_teacher(teacher_path)
    assert "export is exact" in printed
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([exported])  # stock fairseq
    model = models[0].eval()
    assert cfg.model._name == "dphubert" and cfg.model.relative_position_buckets == 32
    assert dp.count_params(model) < dp.count_params(teacher)
    # the exported model is the stage-1 model with its gates folded in: the same hidden states
    stage1, _ = model_from_training_checkpoint(str(work / "stage1" / "checkpoint_last.pt"))
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        for a, b in zip(stage1.eval().hidden_states(source, mask), model.hidden_states(source, mask)):
            assert (a - b).abs().max() <= 1e-4
    # the teacher it names is the WavLM checkpoint it was trained from
    assert model.cfg.teacher_identity == teacher_identity(teacher)


def test_stage2_and_stock_ctc_finetuning_of_a_dpwavlm(dpwavlm, speech_manifests, tmp_path):
    work, teacher, exported, _ = dpwavlm
    stage2 = str(tmp_path / "stage2")
    out = P.hydra_train(
        "dphubert_final", overrides(speech_manifests, teacher, stage2, 4) + [f"task.student_path={exported}"]
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = str(tmp_path / "final.pt")
    assert P.export(os.path.join(stage2, "checkpoint_last.pt"), final).returncode == 0

    P.write_letter_labels(speech_manifests)
    ctc_dir = str(tmp_path / "ctc")
    out = P.run(P.stock_ctc_command("wav2vec_ctc", speech_manifests, final, ctc_dir), cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = P.logged(out.stdout, "train_inner")
    assert len(records) == 4 and all(float(r["loss"]) > 0 for r in records)
    state = torch.load(os.path.join(ctc_dir, "checkpoint_last.pt"))
    # the fine-tuned encoder is the DPWavLM: its kept heads still read their teacher's bias columns
    heads = state["model"]["w2v_encoder.w2v_model.encoder.layers.1.self_attn.head_index"]
    assert torch.equal(heads, torch.load(final)["model"]["encoder.layers.1.self_attn.head_index"])
    assert "w2v_encoder.w2v_model.encoder.relative_attention_bias.weight" in state["model"]


def test_stage1_from_a_data2vec_checkpoint_exports_exactly(tmp_path, speech_manifests, tiny_teachers):
    teacher = tiny_teachers["data2vec_base"]
    out = P.hydra_train(
        "dphubert",
        overrides(speech_manifests, teacher, str(tmp_path / "stage1"), max_update=10)
        + ["criterion.target_sparsity=0.3", "criterion.sparsity_warmup_updates=5"],
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exported = str(tmp_path / "dp.pt")
    result = P.export(str(tmp_path / "stage1" / "checkpoint_last.pt"), exported)
    assert result.returncode == 0 and "export is exact" in result.stdout, result.stdout + result.stderr
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([exported])
    assert cfg.model.conv_pos_depth == 3 and len(models[0].encoder.pos_conv) == 3
