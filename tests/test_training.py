"""The whole pipeline through fairseq's own trainer: stage 1, export, stage 2, export, resume, 2 workers."""

import json
import os
import sys

import pytest
import torch
from fairseq import checkpoint_utils

import dphubert_fairseq as dp
from dphubert_fairseq.export import model_from_training_checkpoint
from dphubert_fairseq.macs import count_macs, nominal_samples
from dphubert_fairseq.pruning import max_hidden_state_deviation
from dphubert_fairseq.teacher import config_from_fairseq

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402

STAGE1_UPDATES = 200
#: what stage 1 logs every interval, to the console and to TensorBoard
STAGE1_SCALARS = (
    "loss",
    "distill_loss",
    "expected_sparsity",
    "eval_sparsity",
    "expected_macs_sparsity",
    "eval_macs_sparsity",
    "target_sparsity",
    "lambda1",
    "lambda2",
    "expected_params",
    "lr_default",
    "lr_gates",
    "lr_lagrangian",
)
LRS = {"default": 2e-4, "gates": 0.1, "lagrangian": 0.1}

pytestmark = pytest.mark.slow  # every test here runs fairseq-hydra-train or dphubert-export


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def data(speech_manifests):
    return speech_manifests


@pytest.fixture(scope="module")
def teacher(pretrained_hubert):
    return pretrained_hubert


def card(data, teacher, save_dir):
    """The card's command line (task.data, task.teacher_path, checkpoint.save_dir)."""
    return [f"task.data={data}", f"task.teacher_path={teacher}", f"checkpoint.save_dir={save_dir}"]


def stage1_overrides(data, teacher, save_dir: str, updates: int) -> list:
    """A CPU stage 1 of ``updates`` at target sparsity 0.5 (ramped over a sixth of it), logged every 10
    updates, validated and saved at its end."""
    return (
        card(data, teacher, save_dir)
        + P.CPU_OVERRIDES
        + [
            "dataset.max_tokens=48000",
            f"optimization.max_update={updates}",
            "criterion.target_sparsity=0.5",
            f"criterion.sparsity_warmup_updates={updates // 6}",
            "common.log_interval=10",
            f"dataset.validate_interval_updates={updates}",
            f"checkpoint.save_interval_updates={updates}",
        ]
        + P.schedule_overrides("dphubert", 5, LRS)
    )


@pytest.fixture(scope="module")
def stage1(workdir, data, teacher):
    save_dir = str(workdir / "stage1")
    out = P.hydra_train("dphubert", stage1_overrides(data, teacher, save_dir, STAGE1_UPDATES))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return save_dir, out.stdout


def test_stage1_reaches_the_target_sparsity(stage1):
    save_dir, stdout = stage1
    train = P.logged(stdout, "train_inner")
    assert len(train) == STAGE1_UPDATES // 10
    for record in train:  # logged every interval
        for key in STAGE1_SCALARS:
            assert key in record, key
    assert float(train[0]["target_sparsity"]) < 0.5 == float(train[-1]["target_sparsity"])
    assert abs(float(train[-1]["lambda1"])) > 0.1 and abs(float(train[-1]["lambda2"])) > 0.1  # they moved
    # the three groups have their own learning rates, with one schedule shape
    lrs = {k: float(train[1][f"lr_{k}"]) for k in LRS}
    assert lrs["gates"] / lrs["default"] == pytest.approx(LRS["gates"] / LRS["default"], rel=1e-3)
    valid = P.logged(stdout, "valid")[-1]
    for key in (
        "valid_eval_sparsity",
        "valid_eval_params",
        "valid_kept_heads",
        "valid_kept_ffn_units",
        "valid_kept_conv_channels",
    ):
        assert key in valid
    assert abs(float(valid["valid_eval_sparsity"]) - 0.5) <= 0.02
    # the final phase (target_projection_start 0.9) holds the eval-mask size on the target; before it, the
    # training log's sync-free eval sparsity agrees with the validation's mask-based one
    assert abs(float(train[-1]["eval_sparsity"]) - 0.5) <= 0.02 and "projection_offset" in train[-1]
    assert "projection_offset" not in train[len(train) * 8 // 10]
    assert float(train[-1]["eval_sparsity"]) == pytest.approx(float(valid["valid_eval_sparsity"]), abs=2e-3)
    assert os.path.exists(os.path.join(save_dir, "checkpoint_last.pt"))
    # the teacher never went into the checkpoint
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"))
    assert all("teacher" not in k for k in state["model"]) and set(state["criterion"]) == {
        "projections.proj.0.weight",
        "projections.proj.0.bias",
        "projections.proj.1.weight",
        "projections.proj.1.bias",
        "lagrangian.lambda1",
        "lagrangian.lambda2",
    }


def test_stage1_with_a_macs_target_lands_on_it(workdir, data, teacher):
    """criterion.target_metric=macs: the Lagrangian and the landing work on MACs (of a 10 s utterance); the
    export reaches the target within 0.02, counted on the exported model; both sparsities are logged."""
    save_dir = str(workdir / "stage1_macs")
    out = P.hydra_train(
        "dphubert",
        stage1_overrides(data, teacher, save_dir, 80)
        + ["criterion.target_metric=macs", "common.tensorboard_logdir=null"],
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = P.logged(out.stdout, "train_inner")[-1]
    for key in ("expected_sparsity", "expected_macs_sparsity", "eval_sparsity", "eval_macs_sparsity"):
        assert key in last, key
    assert "stage 1 ends at MACs sparsity" in out.stdout + out.stderr
    pruned, summary_path = str(workdir / "macs.pt"), str(workdir / "macs.json")
    result = P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned, summary_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(open(summary_path).read())
    assert summary["target_metric"] == "macs" and summary["target_sparsity"] == 0.5
    model = dp.load_model(pruned)
    nominal = nominal_samples(model.cfg)
    assert summary["macs"] == count_macs(model.cfg, nominal).total
    assert summary["teacher_macs"] == count_macs(config_from_fairseq(dp.load_teacher(teacher)), nominal).total
    assert abs(summary["macs_sparsity"] - 0.5) <= 0.02
    assert "MACs of a 10 s utterance" in result.stdout and "WARNING" not in result.stdout


def test_stage1_writes_tensorboard_curves(stage1):
    save_dir, _ = stage1
    runs = P.tensorboard_scalars(os.path.join(save_dir, "tensorboard"))
    assert {"train_inner", "train", "valid"} <= set(runs)
    for tag in STAGE1_SCALARS:
        assert len(runs["train_inner"][tag]) == STAGE1_UPDATES // 10, tag
    assert runs["train_inner"]["target_sparsity"][-1] == pytest.approx(0.5)
    for tag in ("loss", "distill_loss", "expected_sparsity", "eval_sparsity", "eval_params", "lambda1"):
        assert len(runs["valid"][tag]) == 1, tag


def test_export_stage2_export(stage1, workdir, data, teacher):
    save_dir, _ = stage1
    pruned1 = str(workdir / "stage1_pruned.pt")
    summary_path = str(workdir / "stage1.json")
    out = P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned1, summary_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameters:" in out.stdout and "sparsity" in out.stdout
    summary = json.load(open(summary_path))
    for key in ("params", "teacher_params", "sparsity", "conv_channels", "heads", "ffn_dims"):
        assert key in summary
    assert len(summary["heads"]) == len(summary["ffn_dims"]) == 12 and len(summary["conv_channels"]) == 7
    # the export lands on the target after a run of a few hundred updates, and says what it was asked
    assert abs(summary["sparsity"] - 0.5) <= 0.02 and summary["target_sparsity"] == 0.5
    assert "target 0.5000" in out.stdout and "WARNING" not in out.stdout
    assert summary["params"] == dp.count_params(dp.load_model(pruned1))

    stage2_dir = str(workdir / "stage2")
    out = P.hydra_train(
        "dphubert_final",
        card(data, teacher, stage2_dir)
        + [f"task.student_path={pruned1}"]
        + P.CPU_OVERRIDES
        + ["dataset.max_tokens=48000", "optimization.max_update=6", "common.log_interval=1"]
        + P.schedule_overrides("dphubert_final", 2, {"default": 1e-4}),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "expected_sparsity" not in P.logged(out.stdout, "train_inner")[0]  # no Lagrangian in stage 2

    final = str(workdir / "final.pt")
    out = P.export(os.path.join(stage2_dir, "checkpoint_last.pt"), final)
    assert out.returncode == 0, out.stderr[-3000:]
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([final])
    exported = models[0].eval()
    trained, _ = model_from_training_checkpoint(os.path.join(stage2_dir, "checkpoint_last.pt"))
    source = torch.randn(2, 24000)
    with torch.no_grad():
        for a, b in zip(trained.hidden_states(source), exported.hidden_states(source)):
            assert torch.equal(a, b)
    assert dp.count_params(exported) == summary["params"]
    assert cfg.task._name == "audio_pretraining"


def test_export_rounds_kept_units_up_exactly(stage1, workdir):
    """--round-heads / --round-ffn: multiples kept, output unchanged, the cost in parameters reported."""
    save_dir, _ = stage1
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    plain, rounded = str(workdir / "plain.pt"), str(workdir / "rounded.pt")
    assert P.export(checkpoint, plain).returncode == 0
    out = P.export(
        checkpoint, rounded, str(workdir / "rounded.json"), ["--round-heads", "3", "--round-ffn", "16"]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(workdir / "rounded.json"))
    a, b = dp.load_model(plain).eval(), dp.load_model(rounded).eval()
    for h0, h1, f0, f1 in zip(
        a.cfg.encoder_attention_heads,
        b.cfg.encoder_attention_heads,
        a.cfg.encoder_ffn_embed_dims,
        b.cfg.encoder_ffn_embed_dims,
    ):
        assert (
            h1 in (0, 3, 4) and h0 <= h1 and (h0 > 0) == (h1 > 0)
        )  # multiples of 3, at most the teacher's 4
        assert f1 % 16 == 0 and f0 <= f1 <= 64 and (f0 > 0) == (f1 > 0)
    assert b.cfg.encoder_ffn_embed_dims != a.cfg.encoder_ffn_embed_dims
    assert summary["rounding"]["extra_params"] == b.num_params() - a.num_params() > 0
    assert "more parameters than without rounding" in out.stdout
    source = torch.randn(2, 24000)
    with torch.no_grad():
        assert max_hidden_state_deviation(a, b, source) <= 1e-5

    out = P.export(checkpoint, str(workdir / "bad.pt"), extra=["--round-ffn", "0"])
    assert out.returncode == 2 and "round_ffn must be >= 1" in out.stderr
    out = P.export(rounded, str(workdir / "again.pt"), extra=["--round-heads", "2"])  # nothing left to prune
    assert out.returncode == 2 and "has no gates" in out.stderr and not os.path.exists(workdir / "again.pt")


def test_stage2_starts_from_the_stage1_projections(stage1, workdir, teacher, data):
    """Stage 2 builds the pruned architecture from the export and carries the projections over."""
    from omegaconf import OmegaConf

    from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig
    from dphubert_fairseq.models.dphubert import DPHuBERTConfig
    from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

    save_dir, _ = stage1
    pruned1 = str(workdir / "stage1_pruned_b.pt")
    assert P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned1).returncode == 0
    task = DPHuBERTDistillTask.setup_task(
        OmegaConf.structured(DPHuBERTDistillConfig(data=data, teacher_path=teacher, student_path=pruned1))
    )
    model_cfg = OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=[]))
    model = task.build_model(model_cfg)
    assert model.num_params() == dp.count_params(dp.load_model(pruned1))
    assert list(model_cfg.encoder_ffn_embed_dims) == list(model.cfg.encoder_ffn_embed_dims)  # written back
    criterion = DPHuBERTDistillCriterion(DPHuBERTDistillCriterionConfig(lagrangian=False), task)
    stage1_state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"))["criterion"]
    for name, value in criterion.projections.state_dict().items():
        assert torch.equal(value, stage1_state["projections." + name])


def stage2_task(data: str, teacher: str, student: str):
    from omegaconf import OmegaConf

    from dphubert_fairseq.models.dphubert import DPHuBERTConfig
    from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

    task = DPHuBERTDistillTask.setup_task(
        OmegaConf.structured(DPHuBERTDistillConfig(data=data, teacher_path=teacher, student_path=student))
    )
    return task, OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=[]))


def test_stage2_refuses_another_teacher(stage1, workdir, teacher, data, tiny_teachers):
    """The export records the teacher (model class + SHA-256 of its weights); stage 2 checks it."""
    save_dir, _ = stage1
    pruned1 = str(workdir / "stage1_pruned_c.pt")
    assert P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned1).returncode == 0
    recorded = dp.load_model(pruned1).cfg.teacher_identity
    assert recorded == dp.teacher.teacher_identity(dp.load_teacher(teacher))
    assert recorded.startswith("HubertModel sha256:")
    # the same architecture, one weight changed
    state = torch.load(teacher)
    state["model"]["encoder.layers.3.fc1.bias"][0] += 1e-3
    nudged = str(workdir / "nudged_teacher.pt")
    torch.save(state, nudged)
    for other in (nudged, tiny_teachers["hubert_base"]):
        task, model_cfg = stage2_task(data, other, pruned1)
        with pytest.raises(ValueError) as err:
            task.build_model(model_cfg)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"task.teacher_path: {other} is not the teacher")
        assert recorded in message and task.teacher_identity in message and recorded != task.teacher_identity
    task, model_cfg = stage2_task(data, teacher, pruned1)  # the stage-1 teacher itself
    assert task.build_model(model_cfg).cfg.teacher_identity == recorded


def test_stage2_refuses_other_distillation_layers(stage1, workdir, teacher, data):
    from omegaconf import OmegaConf

    from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig

    save_dir, _ = stage1
    pruned1 = str(workdir / "stage1_pruned_d.pt")
    assert P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned1).returncode == 0
    task, model_cfg = stage2_task(data, teacher, pruned1)
    task.build_model(model_cfg)
    # 4,8,12 -> 4,8,11: the shapes agree, so the stage-1 projections would load onto the wrong layer
    cfg = OmegaConf.structured(DPHuBERTDistillCriterionConfig(lagrangian=False, distill_layers="0;4,8,11"))
    with pytest.raises(ValueError) as err:
        DPHuBERTDistillCriterion(cfg, task)
    assert "criterion.distill_layers='0;4,8,11' differs from the stage-1 run's '0;4,8,12'" in str(err.value)


def test_reexporting_an_export_keeps_what_it_carries(stage1, workdir):
    save_dir, _ = stage1
    first, again = str(workdir / "first.pt"), str(workdir / "again.pt")
    assert P.export(os.path.join(save_dir, "checkpoint_last.pt"), first).returncode == 0
    out = P.export(first, again, str(workdir / "again.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    a = dp.checkpoint_io.load_model_and_extra_state(first)
    b = dp.checkpoint_io.load_model_and_extra_state(again)
    for key in ("distill_layers", "prediction_heads", "prediction_head"):
        assert b[1][key] == a[1][key] is not None
    assert b[1]["distill_projections"].keys() == a[1]["distill_projections"].keys() != set()
    for name, value in a[1]["distill_projections"].items():
        assert torch.equal(b[1]["distill_projections"][name], value)
    assert b[1]["export_summary"]["target_sparsity"] == 0.5 and "target 0.5000" in out.stdout
    assert b[0].cfg.teacher_identity == a[0].cfg.teacher_identity != ""
    assert dp.count_params(b[0]) == dp.count_params(a[0])


def test_export_checks_its_destinations_before_writing(stage1, workdir, capsys):
    from dphubert_fairseq.export import main

    save_dir, _ = stage1
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    a_file = workdir / "a_file.txt"
    a_file.write_text("x")
    good = str(workdir / "dest" / "ok.pt")
    cases = [
        ([str(workdir), "--json", str(workdir / "s.json")], f"output {workdir}: is a directory"),
        ([str(a_file / "out.pt")], f"output {a_file / 'out.pt'}: {a_file} is a file, not a folder"),
        (["/proc/dphubert_out.pt"], "output /proc/dphubert_out.pt: cannot write in /proc"),
        ([good, "--json", str(workdir)], f"--json {workdir}: is a directory"),
        ([good, "--json", "/proc/x/s.json"], "--json /proc/x/s.json: cannot write in /proc"),
        ([good, "--json", str(a_file / "s.json")], f"{a_file} is a file, not a folder"),
        # the input itself, by its path or through a link: the stage-1 run's gates would be lost
        ([checkpoint], f"output {checkpoint}: is the input {checkpoint}, which it would overwrite"),
        ([good, "--json", checkpoint], f"--json {checkpoint}: is the input {checkpoint}, which it would"),
        ([str(workdir / "link.pt")], f"output {workdir / 'link.pt'}: is the input {checkpoint}"),
    ]
    os.symlink(checkpoint, workdir / "link.pt")
    with open(checkpoint, "rb") as f:
        before = f.read()
    for args, expected in cases:
        assert main([checkpoint, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err and "Traceback" not in err, err
        assert not os.path.exists(good) and not os.path.exists(workdir / "dest")  # nothing was written
    with open(checkpoint, "rb") as f:
        assert f.read() == before
    os.remove(workdir / "link.pt")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_usual_permissions(stage1, workdir, umask):
    from dphubert_fairseq.export import export

    save_dir, _ = stage1
    out, summary = str(workdir / f"perm{umask:o}.pt"), str(workdir / f"perm{umask:o}.json")
    old = os.umask(umask)
    try:
        export(os.path.join(save_dir, "checkpoint_last.pt"), out, summary)
    finally:
        os.umask(old)
    for path in (out, summary):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    # as fairseq's own checkpoints of the same run
    assert os.stat(os.path.join(save_dir, "checkpoint_last.pt")).st_mode & 0o777 == 0o666 & ~old


RESUME_ARGS = [
    "dataset.max_tokens=48000",
    "common.log_interval=1",
    "criterion.target_sparsity=0.5",
    "criterion.sparsity_warmup_updates=4",
    "checkpoint.save_interval_updates=6",
    "dataset.validate_interval_updates=1000",
    "+criterion.max_update=12",  # the first run stops at 6 on purpose: the landing phase still starts at 11
    # units go inactive before and after the resume (checks every 2 updates, 2 in a row below p = 0.83: the
    # FFN units start at 0.83), so the resumed run must restore both the active sets and the streaks
    "criterion.inactive_threshold=0.83",
    "criterion.inactive_checks=2",
    "criterion.inactive_check_interval=2",
    # both runs leave the inactive units out: 'measure' decides from timings, which may differ between the
    # runs and, with them, the rounding (masked and gathered sums add in another order)
    "criterion.inactive_compute=gather",
] + P.schedule_overrides("dphubert", 2, LRS, total=12)


def test_resume_continues_exactly(workdir, data, teacher):
    straight = P.hydra_train(
        "dphubert",
        card(data, teacher, str(workdir / "straight"))
        + P.CPU_OVERRIDES
        + RESUME_ARGS
        + ["optimization.max_update=12"],
    )
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    resumed_dir = str(workdir / "resumed")
    first = P.hydra_train(
        "dphubert",
        card(data, teacher, resumed_dir) + P.CPU_OVERRIDES + RESUME_ARGS + ["optimization.max_update=6"],
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = P.hydra_train(
        "dphubert",
        card(data, teacher, resumed_dir) + P.CPU_OVERRIDES + RESUME_ARGS + ["optimization.max_update=12"],
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Loaded checkpoint" in second.stdout
    expected = {r["num_updates"]: r for r in P.logged(straight.stdout, "train_inner")}
    got = {r["num_updates"]: r for r in P.logged(second.stdout, "train_inner")}
    assert sorted(got, key=int) == [str(u) for u in range(7, 13)]
    keys = (
        "loss",
        "distill_loss",
        "expected_sparsity",
        "target_sparsity",
        "lambda1",
        "lambda2",
        "lr_default",
        "lr_gates",
        "lr_lagrangian",
        "gnorm",
        "active_heads",
        "active_ffn_units",
        "active_conv_channels",
        "active_macs_ratio",
        "active_gmacs",
    )
    for update, record in got.items():
        for key in keys:
            assert record[key] == expected[update][key], (update, key)
    assert float(got["12"]["lambda1"]) != 0.0
    # the student shrank before the resume and again after it
    first_records = {r["num_updates"]: r for r in P.logged(first.stdout, "train_inner")}
    assert float(first_records["6"]["active_ffn_units"]) < 1.0
    assert float(got["12"]["active_ffn_units"]) < float(got["7"]["active_ffn_units"])
    assert float(got["12"]["active_macs_ratio"]) < float(first_records["1"]["active_macs_ratio"]) == 1.0
    assert "projection_offset" in got["12"] and "projection_offset" not in got["10"]


def test_two_workers_train_one_consistent_checkpoint(workdir, data, teacher):
    """Two CPU workers (gloo), one process per rank as a cluster launcher starts them. On CPU fairseq's
    torchrun path and its c10d wrapper assume CUDA devices, so this uses fairseq's legacy_ddp wrapper; the
    configs' c10d is for GPUs."""
    import subprocess

    port = P.free_port()
    save_dir = str(workdir / "ddp")
    common = (
        card(data, teacher, save_dir)
        + [o for o in P.CPU_OVERRIDES if "world_size" not in o and "nprocs" not in o]
        + [
            "distributed_training.distributed_world_size=2",
            "distributed_training.distributed_backend=gloo",
            f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
            "distributed_training.distributed_no_spawn=true",
            "distributed_training.ddp_backend=legacy_ddp",
            "dataset.max_tokens=24000",
            "optimization.max_update=4",
            "common.log_interval=1",
            "checkpoint.save_interval_updates=4",
        ]
        + P.schedule_overrides("dphubert", 1, LRS)
    )
    cmd = P.hydra_train_command("configs", "dphubert")
    workers = [
        P.start(
            cmd
            + common
            + [f"distributed_training.distributed_rank={rank}", f"hydra.run.dir={save_dir}/hydra{rank}"],
            env={"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, text in zip(workers, outputs):
        assert w.returncode == 0, text[-3000:]
    assert "distributed init (rank 1)" in outputs[1]
    assert [f for f in os.listdir(save_dir) if f.endswith(".pt.tmp")] == []
    model, state = model_from_training_checkpoint(os.path.join(save_dir, "checkpoint_last.pt"))
    assert state["optimizer_history"][-1]["num_updates"] == 4
    records = P.logged(outputs[0], "train_inner")
    assert len(records) == 4
    single = P.logged(
        P.hydra_train(
            "dphubert",
            card(data, teacher, str(workdir / "single"))
            + P.CPU_OVERRIDES
            + ["dataset.max_tokens=24000", "optimization.max_update=1", "common.log_interval=1"],
        ).stdout,
        "train_inner",
    )
    # each update of the 2-worker run saw both workers' batches
    assert int(records[0]["bsz"]) > int(single[0]["bsz"])


@pytest.mark.parametrize("recipe", list(P.CTC_RECIPES))
def test_exported_model_finetunes_with_stock_ctc(stage1, workdir, data, recipe):
    """fairseq's own CTC recipes on the exported model, plugin loaded through common.user_dir, a few updates
    on a tiny labelled set (hubert_ctc needs the plugin's fix of its build)."""
    save_dir, _ = stage1
    pruned = str(workdir / "for_ctc.pt")
    if not os.path.exists(pruned):
        assert P.export(os.path.join(save_dir, "checkpoint_last.pt"), pruned).returncode == 0
    P.write_letter_labels(data)
    out_dir = str(workdir / recipe)
    cmd = P.stock_ctc_command(recipe, data, pruned, out_dir)
    out = P.run(cmd, cwd=str(workdir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = P.logged(out.stdout, "train_inner")
    assert len(records) == 4 and all(float(r["loss"]) > 0 for r in records)
    assert "valid_wer" in P.logged(out.stdout, "valid")[-1]
    state = torch.load(os.path.join(out_dir, "checkpoint_last.pt"))
    assert state["cfg"]["model"]["_name"] == recipe
    # the fine-tuned encoder is the dphubert model (its FFN blocks are named ffn.fc1, fairseq's are fc1) ...
    assert any(k.startswith("w2v_encoder.w2v_model.encoder.layers.0.ffn.fc1.") for k in state["model"])
    # ... fine-tuned with the recipe's time masking: the mask embedding was trained
    exported = torch.load(pruned)["model"]["masking.mask_emb"]
    assert not torch.equal(state["model"]["w2v_encoder.w2v_model.masking.mask_emb"], exported)


def test_legacy_fairseq_train_route(workdir, data, teacher):
    """``fairseq-train --user-dir`` (argparse) builds the same task, model and criterion."""
    save_dir = str(workdir / "legacy")
    cmd = P.bin_or_module("fairseq-train", "fairseq_cli.train") + [
        data,
        "--user-dir",
        os.path.join(P.REPO, "dphubert_fairseq"),
        "--task",
        "dphubert_distill",
        "--teacher-path",
        teacher,
        "--arch",
        "dphubert",
        "--prune-units",
        '["conv","head","interm"]',
        "--criterion",
        "dphubert_distill",
        "--target-sparsity",
        "0.5",
        "--sparsity-warmup-updates",
        "2",
        "--optimizer",
        "adam",
        "--lr",
        "1e-4",
        "--max-update",
        "3",
        "--cpu",
        "--max-tokens",
        "48000",
        "--required-batch-size-multiple",
        "1",
        "--min-sample-size",
        "8000",
        "--save-dir",
        save_dir,
        "--log-interval",
        "1",
        "--log-format",
        "json",
        "--num-workers",
        "0",
    ]
    out = P.run(cmd, cwd=str(workdir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [
        json.loads(line.split(" | ")[-1]) for line in out.stdout.splitlines() if "| train_inner |" in line
    ]
    assert len(lines) == 3 and lines[-1]["target_sparsity"] == "0.5"
    model, _ = model_from_training_checkpoint(os.path.join(save_dir, "checkpoint_last.pt"))
    assert set(model.cfg.prune_units) == {"conv", "head", "interm"} and model.gates()


def test_stage1_trains_in_bf16_too(workdir, data, teacher):
    """The recipe trains under AMP; fairseq's bf16 mode (model cast to bf16, fp32 master weights) still
    works, with gate logits and multipliers kept in float32. (fp16 has no CPU convolutions to test here.)"""
    save_dir = str(workdir / "bf16")
    out = P.hydra_train(
        "dphubert",
        card(data, teacher, save_dir)
        + P.CPU_OVERRIDES
        + ["common.amp=false", "common.bf16=true", "dataset.max_tokens=48000", "optimization.max_update=3"]
        + ["criterion.sparsity_warmup_updates=1", "common.log_interval=1"]
        + P.schedule_overrides("dphubert", 1, LRS),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = P.logged(out.stdout, "train_inner")
    assert len(records) == 3 and all(abs(float(r["distill_loss"])) < 10 for r in records)
    assert "'bf16': True" in out.stdout and "'amp': False" in out.stdout  # fairseq printed its config
    assert float(records[-1]["lambda2"]) > 0  # the Lagrangian stepped
    model, _ = model_from_training_checkpoint(os.path.join(save_dir, "checkpoint_last.pt"))
    assert model.gates()  # fairseq saves the bf16 weights as fp32; the checkpoint loads as any other
