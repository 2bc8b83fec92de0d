"""The stage configs train what the reference recipe trains: audio per update, dropout after the feature
projection, long utterances left out, mixed precision, one knob for the run length."""

import logging
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from fairseq.data.audio.raw_audio_dataset import FileAudioDataset
from omegaconf import OmegaConf

from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig
from dphubert_fairseq.criterions.distill_loss import layer_loss
from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402

CONFIGS = ("dphubert", "dphubert_final")
RATE = 16000


def recipe_config(name: str, *overrides: str):
    """The config ``fairseq-hydra-train --config-dir configs --config-name NAME`` runs for a user's card."""
    card = ["task.data=DATA", "task.teacher_path=TEACHER", "checkpoint.save_dir=OUT"]
    if name == "dphubert_final":
        card.append("task.student_path=STUDENT")
    return P.compose(os.path.join(P.REPO, "configs"), name, card + list(overrides))


def write_manifest(folder: str, seconds, files: bool = False) -> str:
    """``folder/train.tsv`` listing one utterance per entry of ``seconds``; with ``files`` also the audio."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "train.tsv"), "w") as f:
        f.write(folder + "\n")
        for i, s in enumerate(seconds):
            n = int(round(s * RATE))
            if files:
                sf.write(
                    os.path.join(folder, f"{i}.wav"), 0.1 * rng.standard_normal(n).astype("float32"), RATE
                )
            f.write(f"{i}.wav\t{n}\n")
    return folder


# ----- 1. audio per update -----


@pytest.mark.parametrize("name", CONFIGS)
def test_batches_of_12_s_items_hold_13_like_the_reference(tmp_path, name):
    cfg = recipe_config(name)
    assert cfg.dataset.max_tokens == 2_560_000 and cfg.dataset.required_batch_size_multiple == 1
    folder = write_manifest(str(tmp_path), [12.0] * 40)
    dataset = FileAudioDataset(
        os.path.join(folder, "train.tsv"),
        RATE,
        max_sample_size=cfg.task.max_sample_size,
        min_sample_size=cfg.task.min_sample_size,
        pad=cfg.task.enable_padding,
    )

    def batch_sizes(multiple: int):  # fairseq's own batching, as task.get_batch_iterator calls it
        batches = dataset.batch_by_size(
            dataset.ordered_indices(),
            max_tokens=cfg.dataset.max_tokens,
            max_sentences=cfg.dataset.batch_size,
            required_batch_size_multiple=multiple,
        )
        return sorted((len(b) for b in batches), reverse=True)

    assert batch_sizes(cfg.dataset.required_batch_size_multiple) == [13, 13, 13, 1]  # 156 s of 160 s
    assert batch_sizes(8)[:5] == [8] * 5  # fairseq's default multiple: 96 s


# ----- 2. dropout after the feature projection -----


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_drop_out_the_feature_projection_output(name):
    cfg = recipe_config(name)
    assert cfg.model.dropout_input == 0.1
    assert (cfg.model.dropout, cfg.model.attention_dropout, cfg.model.activation_dropout) == (0.1, 0.1, 0.0)


@pytest.fixture(scope="module")
def task(tiny_teachers, tmp_path_factory):
    cfg = DPHuBERTDistillConfig(
        data=str(tmp_path_factory.mktemp("none")), teacher_path=tiny_teachers["hubert_base"], tpu=False
    )
    return DPHuBERTDistillTask.setup_task(OmegaConf.structured(cfg))


def stage1_model(task, **model_overrides):
    """The student the stage-1 config builds (its model block) from the task's teacher."""
    model_cfg = recipe_config("dphubert").model
    with_overrides = OmegaConf.merge(model_cfg, model_overrides)
    return task.build_model(with_overrides)


def test_student_h0_is_dropped_out_in_training_and_distilled_so(task):
    model = stage1_model(task, prune_units=[])  # no gates: training and eval mode differ by dropout only
    assert model.dropout_input.p == 0.1
    source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    model.eval()
    h0_eval = model(source)["hidden_states"][0]
    model.train()
    torch.manual_seed(1)
    h0_train = model(source)["hidden_states"][0]
    dropped = h0_train == 0
    assert 0.05 < dropped.float().mean().item() < 0.15
    torch.testing.assert_close(h0_train[~dropped], h0_eval[~dropped] / 0.9)

    # the criterion distils that dropped-out h_0: its loss is the layer loss of the dropped-out state
    criterion = DPHuBERTDistillCriterion(
        DPHuBERTDistillCriterionConfig(distill_layers="0", cos_weight=0.0, lagrangian=False), task
    )
    model.train()
    sample = {"net_input": {"source": source, "padding_mask": None}}
    torch.manual_seed(2)
    loss, _, _ = criterion(model, sample)
    torch.manual_seed(2)
    h0 = model(source)["hidden_states"][0]
    target = task.teacher_hidden_states(sample["net_input"], torch.float32, 0)[0]
    expected = layer_loss(criterion.projections.proj[0](h0), target, None, 1.0, 0.0, 0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (h0 == 0).float().mean().item() > 0.05


# ----- 3. utterances longer than the maximum -----


def length_task(tiny_teachers, folder: str, mode: str) -> DPHuBERTDistillTask:
    cfg = DPHuBERTDistillConfig(
        data=folder,
        teacher_path=tiny_teachers["hubert_base"],
        tpu=False,
        min_sample_size=8000,
        max_sample_size=24000,
        long_utterances=mode,
    )
    return DPHuBERTDistillTask.setup_task(OmegaConf.structured(cfg))


def test_long_utterances_are_left_out_and_logged(tiny_teachers, tmp_path, caplog):
    folder = write_manifest(str(tmp_path), [0.25, 1.0, 1.25, 1.5, 2.0, 3.0], files=True)
    task = length_task(tiny_teachers, folder, "drop")
    with caplog.at_level(logging.INFO):
        task.load_dataset("train")
    dataset = task.datasets["train"]
    # 0.25 s is below the minimum (fairseq skips it), 2.0 s and 3.0 s are above 24000 samples
    assert sorted(dataset.sizes.tolist()) == [16000, 20000, 24000]
    assert (
        "left out 2 utterances longer than task.max_sample_size=24000 samples (5.0 s of audio)" in caplog.text
    )
    # the items that remain are the right files, and nothing is ever cropped
    names = [
        dataset.text_compressor.decompress(f if isinstance(dataset.fnames, list) else f.as_py())
        for f in dataset.fnames
    ]
    assert names == ["1.wav", "2.wav", "3.wav"]
    assert dataset.skipped_indices == {0, 4, 5}
    batch = dataset.collater([dataset[i] for i in range(3)])
    assert batch["net_input"]["source"].shape == (3, 16000)  # cropped to the shortest item, as always
    assert len(dataset[2]["source"]) == 24000


def test_cropping_long_utterances_stays_available(tiny_teachers, tmp_path):
    folder = write_manifest(str(tmp_path), [1.0, 2.0, 3.0], files=True)
    task = length_task(tiny_teachers, folder, "crop")
    task.load_dataset("train")
    dataset = task.datasets["train"]
    assert len(dataset) == 3
    batch = dataset.collater([dataset[1], dataset[2]])
    assert batch["net_input"]["source"].shape == (2, 24000)  # a random window of the maximum length


def test_a_split_with_nothing_left_is_refused(tiny_teachers, tmp_path):
    folder = write_manifest(str(tmp_path), [2.0, 3.0], files=True)
    task = length_task(tiny_teachers, folder, "drop")
    with pytest.raises(ValueError, match="no utterance is between task.min_sample_size=8000 and task.max_sa"):
        task.load_dataset("train")


# ----- 4. mixed precision -----


def test_recipe_trains_with_automatic_mixed_precision():
    for name in CONFIGS:
        cfg = recipe_config(name)
        assert cfg.common.amp and not cfg.common.fp16 and not cfg.common.bf16, name


def test_teacher_targets_are_float32_under_autocast_and_reduced_otherwise(task):
    """Under autocast (``common.amp``) the teacher keeps float32 weights, autocast runs its matmuls in reduced
    precision and the targets come back as float32; under fairseq's fp16 / bf16 modes the teacher runs in the
    student's dtype. Checked on the dtypes each Linear and conv of the teacher computes in, not on values: CPU
    bf16 kernels differ between CPUs (AMX / AVX512-BF16 ones round the grouped positional conv far off)."""
    modules = [m for m in task.teacher.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
    computed = []
    hooks = [m.register_forward_hook(lambda m, i, out: computed.append(out.dtype)) for m in modules]
    try:
        source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
        net_input = {"source": source, "padding_mask": None}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = task.teacher_hidden_states(net_input, torch.bfloat16)
        assert all(h.dtype == torch.float32 for h in states)
        assert all(p.dtype == torch.float32 for p in task.teacher.parameters())  # weights stay float32
        assert computed and set(computed) == {torch.bfloat16}  # autocast did run every matmul in bf16
        computed.clear()
        full = task.teacher_hidden_states(net_input, torch.float32)
        assert all(h.dtype == torch.float32 for h in full) and set(computed) == {torch.float32}
        computed.clear()
        # fairseq's fp16 / bf16 modes cast the student; the teacher then runs in the same reduced precision
        reduced = task.teacher_hidden_states(net_input, torch.bfloat16)
        assert all(h.dtype == torch.bfloat16 for h in reduced) and set(computed) == {torch.bfloat16}
        assert all(p.dtype == torch.bfloat16 for p in task.teacher.parameters())
    finally:
        for hook in hooks:
            hook.remove()
        task.teacher.float()


def test_criterion_under_autocast_keeps_loss_gates_and_multipliers_float32(task):
    model = stage1_model(task)
    criterion = DPHuBERTDistillCriterion(
        DPHuBERTDistillCriterionConfig(
            target_sparsity=0.5, sparsity_warmup_updates=10, distill_layers="0;1,2,3"
        ),
        task,
    )
    criterion.set_num_updates(10**6)
    model.train()
    sample = {"net_input": {"source": torch.randn(2, 8000), "padding_mask": None}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**sample["net_input"])
        loss, _, log = criterion(model, sample)
    assert out["hidden_states"][-1].dtype == torch.bfloat16  # the student did run in reduced precision
    assert loss.dtype == torch.float32 and log["expected_sparsity"].dtype == torch.float32
    loss.backward()
    for gate in model.gates().values():
        assert gate.log_alpha.dtype == gate.log_alpha.grad.dtype == torch.float32
    assert criterion.lagrangian.lambda1.grad.dtype == torch.float32
