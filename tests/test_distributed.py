"""What only several workers show: two processes over gloo, started as a cluster launcher starts them, each a
rank of one process group. Logged values reduce as one process's would, DDP without find_unused_parameters
(the configs' c10d setting) accepts every student a run can build, the landing applies one offset on every
rank, and the audio check splits its files across ranks and shares one verdict."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Dict, List

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
from helpers import free_port, tiny_student_config

from dphubert_fairseq.errors import ConfigError, ManifestError
from dphubert_fairseq.models.dphubert import DPHuBERTConfig, DPHuBERTModel

RANKS = 2
SAMPLES = 4000


def run_ranks(scenario: str, folder, **args) -> List[Dict]:
    """Run ``scenario`` (a function of this file) in two processes, one rank each; their results."""
    port = free_port()
    outs = [os.path.join(str(folder), f"{scenario}.rank{rank}.pt") for rank in range(RANKS)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(rank), str(port), out, json.dumps(args)],
            env=env,
            cwd=os.path.dirname(__file__),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outs)
    ]
    texts = [w.communicate(timeout=300)[0] for w in workers]
    for w, text in zip(workers, texts):
        assert w.returncode == 0, text[-3000:]
    return [torch.load(out, weights_only=False) for out in outs]


def ddp_updates(model: DPHuBERTModel, rank: int, updates: int = 3) -> Dict[str, torch.Tensor]:
    """``updates`` SGD updates of ``model`` in torch's DDP without ``find_unused_parameters``, each rank on
    its own batch; the parameters after them."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(updates):
        torch.manual_seed(100 * step + rank)
        out = ddp(torch.randn(2, SAMPLES))
        loss = sum(h.pow(2).mean() for h in out["hidden_states"]) + out["x"][..., :0].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ----- 1. logged values reduce across ranks as in one process -----


def logging_scenario(rank: int, teacher: str, data: str) -> Dict:
    """A wav2vec2-style student (frames past the conv output length are padding; no mask when nothing is
    padded): rank 0's batch is padded, rank 1's is not. Training and validation logs, reduced as fairseq's
    trainer reduces them (``all_reduce_dict``)."""
    from fairseq.distributed import utils as distributed_utils
    from helpers import distill_task
    from omegaconf import OmegaConf

    from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig

    task = distill_task(data, teacher)
    torch.manual_seed(0)
    model = task.build_model(OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=["head"])))
    criterion = DPHuBERTDistillCriterion(
        DPHuBERTDistillCriterionConfig(
            distill_layers="0;1,2,3", target_sparsity=0.5, sparsity_warmup_updates=10, max_update=20
        ),
        task,
    )
    criterion.set_num_updates(5)
    torch.manual_seed(1)
    source = torch.randn(2, SAMPLES)
    padding = torch.zeros(2, SAMPLES, dtype=torch.bool)
    if rank == 0:
        padding[1, 3000:] = True
    sample = {"net_input": {"source": source, "padding_mask": padding}}
    result = {}
    for mode in ("train", "valid"):
        model.train(mode == "train")
        with torch.no_grad():
            log = criterion(model, sample)[2]
        reduced = distributed_utils.all_reduce_dict(
            {f"logging_outputs_{k}": v for k, v in log.items()}, device=torch.device("cpu"), group=None
        )
        result[mode] = {
            "log": {k: float(v) for k, v in log.items()},
            "reduced": {k[len("logging_outputs_") :]: float(v) for k, v in reduced.items()},
        }
    return result


def test_logged_values_reduce_across_ranks_as_in_one_process(tmp_path, tiny_teachers):
    """One rank's batch padded, the other's not: every logged value is summed as a single process would sum
    the two logs (before the fix ``ntokens`` was a tensor on one rank and a number on the other, and the
    reduction's two buffers had different lengths on the two ranks)."""
    results = run_ranks(
        "logging_scenario", tmp_path, teacher=tiny_teachers["wav2vec2_base"], data=str(tmp_path)
    )
    for mode in ("train", "valid"):
        logs = [r[mode]["log"] for r in results]
        assert logs[0]["ntokens"] < logs[1]["ntokens"]  # rank 0's batch is the padded one
        expected = {k: logs[0][k] + logs[1][k] for k in logs[0]}
        for r in results:
            assert r[mode]["reduced"] == pytest.approx(expected, rel=1e-6), mode


# ----- 2. DDP without find_unused_parameters: a frozen CNN, layerdrop -----


def frozen_cnn_scenario(rank: int) -> Dict:
    torch.manual_seed(0)
    model = DPHuBERTModel(tiny_student_config(feature_grad_mult=0.0))
    params = ddp_updates(model, rank)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {"params": params, "frozen": frozen}


def test_a_frozen_cnn_trains_under_ddp_without_unused_parameters(tmp_path):
    """``model.feature_grad_mult=0`` freezes the CNN: its parameters need no gradient, so DDP without
    ``find_unused_parameters`` trains (it refused at the second update when the CNN ran under no_grad)."""
    first, second = run_ranks("frozen_cnn_scenario", tmp_path)
    cnn = {n for n in first["params"] if n.startswith("feature_extractor.")}
    assert cnn and first["frozen"] == cnn | {"masking.mask_emb"}  # the mask embedding: no masking
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


def stage2_with_layerdrop_scenario(rank: int, teacher: str, data: str, student: str) -> Dict:
    from helpers import distill_task
    from omegaconf import OmegaConf

    task = distill_task(data, teacher, student_path=student)
    model = task.build_model(OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=[])))
    return {"layerdrop": model.cfg.encoder_layerdrop, "params": ddp_updates(model, rank)}


def test_stage2_from_a_student_with_layerdrop_trains_under_ddp(tmp_path, tiny_teachers):
    """A stage-1 export whose config has layerdrop (the reference format records 0.05) is distilled without
    it: no layer is skipped, and DDP without ``find_unused_parameters`` trains."""
    from dphubert_fairseq.checkpoint_io import save_model
    from dphubert_fairseq.teacher import load_teacher_and_config

    _, teacher_cfg = load_teacher_and_config(tiny_teachers["hubert_base"])
    teacher_cfg.encoder_layerdrop, teacher_cfg.prune_units = 0.9, []
    student = save_model(DPHuBERTModel(teacher_cfg), str(tmp_path / "student.pt"))
    first, second = run_ranks(
        "stage2_with_layerdrop_scenario",
        tmp_path,
        teacher=tiny_teachers["hubert_base"],
        data=str(tmp_path),
        student=student,
    )
    assert first["layerdrop"] == 0.0
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


def test_layerdrop_and_a_frozen_cnn_are_refused_where_they_cannot_work(tmp_path, tiny_teachers):
    from helpers import assert_one_line, distill_task
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError) as err:
        DPHuBERTModel(tiny_student_config(feature_grad_mult=0.0, prune_units=["conv", "head"]))
    assert_one_line(str(err.value), "model.prune_units: 'conv'", ["model.feature_grad_mult"])

    layerdrop = OmegaConf.structured(DPHuBERTConfig(_name="dphubert", encoder_layerdrop=0.1))
    with pytest.raises(ConfigError) as err:
        distill_task(tmp_path, tiny_teachers["hubert_base"]).build_model(layerdrop)
    assert_one_line(
        str(err.value),
        "model.encoder_layerdrop=0.1",
        ["distributed_training.find_unused_parameters=true"],
    )
    allowed = distill_task(tmp_path, tiny_teachers["hubert_base"], find_unused_parameters=True)
    assert allowed.build_model(layerdrop).cfg.encoder_layerdrop == 0.1


# ----- 5. the landing's offset is rank 0's -----


def landing_scenario(rank: int, teacher: str, data: str) -> Dict:
    """The landing step on both ranks, with rank 1's bisection made to find another offset (as index_add's
    non-determinism on CUDA can, near the target)."""
    from helpers import landing_student

    from dphubert_fairseq.criterions import target_projection

    torch.manual_seed(0)
    _, model, criterion = landing_student(data, teacher, ["head", "interm"], skip_inactive_units=False)
    if rank == 1:
        found = target_projection.offset_to_target
        target_projection.offset_to_target = lambda *a, **k: found(*a, **k) + 0.37
    criterion.after_optimizer_step(model, update_num=5)
    return {
        "offset": float(criterion.projection_offset),
        "logits": {n: g.log_alpha.detach().clone() for n, g in model.gates().items()},
    }


def test_every_rank_applies_rank_0s_landing_offset(tmp_path, tiny_teachers):
    first, second = run_ranks(
        "landing_scenario", tmp_path, teacher=tiny_teachers["hubert_base"], data=str(tmp_path)
    )
    assert first["offset"] == second["offset"] != 0.0
    for name in first["logits"]:
        assert torch.equal(first["logits"][name], second["logits"][name]), name


# ----- 5. the audio check: each rank reads its share, all share the verdict -----


def manifest_scenario(rank: int, manifest: str, broken_rank: int = -1) -> Dict:
    """The check on this rank's share; on ``broken_rank`` checking an entry fails with an error that is not a
    ``ManifestError`` (an I/O error where no check expects one)."""
    from dphubert_fairseq.data import manifest_check

    opened = []
    real = manifest_check.sf.SoundFile

    def counting(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    def failing(path, number, *args):
        raise OSError(5, "Input/output error", path)

    if rank == broken_rank:
        manifest_check._check_entry = failing

    manifest_check.sf.SoundFile = counting
    try:
        return {"count": manifest_check.check_manifest_on_workers(manifest, 16000), "opened": opened}
    except ManifestError as err:
        return {"error": str(err), "line": err.line, "opened": opened}


def write_clips(folder, lengths, listed=None) -> str:
    """``folder/train.tsv`` listing one clip per entry of ``lengths`` (the manifest says ``listed``)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [str(folder)]
    for i, (n, said) in enumerate(zip(lengths, listed or lengths)):
        sf.write(os.path.join(folder, f"{i}.wav"), rng.standard_normal(n).astype("float32") * 0.1, 16000)
        lines.append(f"{i}.wav\t{said}")
    path = os.path.join(folder, "train.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_the_audio_check_splits_the_files_across_ranks_and_shares_one_verdict(tmp_path):
    lengths = [1600 + 10 * i for i in range(6)]
    good = write_clips(tmp_path / "good", lengths)
    first, second = run_ranks("manifest_scenario", tmp_path, manifest=good)
    assert first["count"] == second["count"] == 6
    assert sorted(first["opened"] + second["opened"]) == [f"{i}.wav" for i in range(6)]
    assert len(first["opened"]) == len(second["opened"]) == 3

    # entry 1 (line 3, rank 1's share) and entry 4 (line 6, rank 0's) are wrong: both ranks report line 3,
    # as one process reading them all would
    listed = list(lengths)
    listed[1] += 1
    listed[4] += 1
    bad = write_clips(tmp_path / "bad", lengths, listed)
    from dphubert_fairseq.data.manifest_check import check_manifest

    with pytest.raises(ManifestError) as alone:
        check_manifest(bad, 16000)
    results = run_ranks("manifest_scenario", tmp_path, manifest=bad)
    for r in results:
        assert r["error"] == str(alone.value) and r["line"] == alone.value.line == 3
    assert all(len(r["opened"]) <= 3 for r in results)

    # a failure that is no manifest's (rank 1's file system fails) still reaches the gather: both ranks raise
    # it, instead of rank 0 waiting in the collective until the timeout
    results = run_ranks("manifest_scenario", tmp_path, manifest=good, broken_rank=1)
    for r in results:
        assert r["error"].startswith(f"{good}: worker 1 failed checking its files: OSError: [Errno 5]"), r
        assert "\n" not in r["error"]


if __name__ == "__main__":
    scenario, rank, port, out, args = sys.argv[1:]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=int(rank),
        world_size=RANKS,
        timeout=timedelta(seconds=60),  # a collective that cannot complete fails instead of hanging
    )
    result = globals()[scenario](int(rank), **json.loads(args))
    torch.save(result, out)
    dist.destroy_process_group()
