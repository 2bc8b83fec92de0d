"""Native fairseq checkpoints load with torch's weights-only default on; anything else is refused clearly."""

import datetime
import os
import sys
import textwrap

import helpers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fairseq import checkpoint_utils
from fairseq.data.dictionary import Dictionary
from helpers import padded_batch

import dphubert_fairseq as dp
from dphubert_fairseq.safe_loading import TRUST_ENV


def _run(script: str, env_extra=None):
    """``python -c SCRIPT`` in a fresh interpreter, the checkout first on its path (``helpers.run``)."""
    return helpers.run([sys.executable, "-c", textwrap.dedent(script)], env=env_extra)


def test_trainer_checkpoint_needs_the_plugin_and_loads_with_it(tiny_teachers):
    path = tiny_teachers["hubert_base"]
    # stock torch + fairseq alone refuse it (this is the problem the plugin solves) ...
    out = _run(f"import torch, fairseq.data.dictionary; torch.load({path!r})")
    assert out.returncode != 0 and "fairseq.data.dictionary.Dictionary" in out.stderr
    # ... with the plugin imported, plain torch.load (weights_only=True by default) and fairseq's loader work
    state = torch.load(path)
    assert isinstance(state["task_state"]["dictionaries"][0], Dictionary)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    assert state["cfg"].model._name == "hubert"
    assert state["last_optimizer_state"] is not None and state["extra_state"]["metrics"] is not None


def test_legacy_wav2vec2_namespace_checkpoint(tmp_path, unequal_batch):
    import helpers

    path = helpers.make_legacy_wav2vec2(str(tmp_path / "wav2vec_small.pt"), str(tmp_path))
    assert torch.load(path)["args"].arch == "wav2vec2"
    teacher = dp.load_teacher(path)
    student = dp.student_from_teacher(path, prune_units=()).eval()
    source, mask = padded_batch(unequal_batch)
    with torch.no_grad():
        for a, b in zip(dp.teacher_hidden_states(teacher, source, mask), student.hidden_states(source, mask)):
            assert (a - b).abs().max() <= 1e-5


def _broadcast_worker(rank: int, path: str, port: int, result_dir: str) -> None:
    from fairseq.distributed import utils as distributed_utils

    import dphubert_fairseq  # noqa: F401  (every worker imports the plugin through common.user_dir)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    state = checkpoint_utils.load_checkpoint_to_cpu(path) if rank == 0 else None
    # exactly what Trainer.load_checkpoint does to hand rank 0's checkpoint to the other workers
    state = distributed_utils.broadcast_object(state, src_rank=0, group=dist.group.WORLD)
    summary = (
        state["cfg"].model._name,
        len(state["task_state"]["dictionaries"][0]),
        float(sum(v.double().sum() for v in state["model"].values())),
    )
    torch.save(summary, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_resume_broadcast_between_workers(tiny_teachers, tmp_path):
    port = helpers.free_port()
    mp.spawn(_broadcast_worker, args=(tiny_teachers["hubert_base"], port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0 == rank1 and rank0[0] == "hubert"


@pytest.fixture
def checkpoint_with_foreign_class(tmp_path, tiny_teachers):
    state = torch.load(tiny_teachers["hubert_base"])
    state["extra_state"]["written_on"] = datetime.date(2026, 11, 26)
    path = str(tmp_path / "foreign.pt")
    torch.save(state, path)
    return path


def test_foreign_class_is_refused_with_the_opt_in(checkpoint_with_foreign_class):
    path = checkpoint_with_foreign_class
    for load in (dp.load_teacher, checkpoint_utils.load_checkpoint_to_cpu):
        with pytest.raises(dp.CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(path)
        assert "datetime.date" in message and f"{TRUST_ENV}=datetime.date" in message
    # still refused by plain torch.load: the check was not switched off
    with pytest.raises(Exception, match="datetime.date"):
        torch.load(path)


def test_user_who_trusts_the_file_can_opt_in(checkpoint_with_foreign_class):
    script = f"""
        import dphubert_fairseq as dp
        teacher = dp.load_teacher({checkpoint_with_foreign_class!r})
        print("loaded", type(teacher).__name__)
        """
    out = _run(script, {TRUST_ENV: "datetime.date"})
    assert out.returncode == 0, out.stderr[-1500:]
    assert "loaded HubertModel" in out.stdout


class _SystemCall:
    """The commonest malicious payload: unpickling it calls os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalCall:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.code,))


def _payload_checkpoints(tmp_path, tiny_teachers, payload):
    """The payload at the top level, inside cfg, and inside extra_state of a real fairseq checkpoint."""
    top = str(tmp_path / "top.pt")
    torch.save(payload, top)
    in_cfg = str(tmp_path / "in_cfg.pt")
    state = torch.load(tiny_teachers["hubert_base"])
    state["cfg"]["model"]["evil"] = payload
    torch.save(state, in_cfg)
    return [top, in_cfg]


def test_system_call_payload_is_refused_as_what_it_is(tmp_path, tiny_teachers):
    marker = tmp_path / "pwned"
    for path in _payload_checkpoints(tmp_path, tiny_teachers, _SystemCall(f"touch {marker}")):
        for load in (dp.load_teacher, dp.load_model, checkpoint_utils.load_checkpoint_to_cpu):
            with pytest.raises(dp.CheckpointError) as err:
                load(path)
            message = str(err.value)
            assert "\n" not in message and message.startswith(path)
            assert "posix.system" in message and "refused" in message
            assert "corrupt" not in message and TRUST_ENV not in message  # no advice to allow it
    assert not marker.exists()


def test_eval_payload_is_refused_and_cannot_be_allow_listed(tmp_path, tiny_teachers):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w')"
    paths = _payload_checkpoints(tmp_path, tiny_teachers, _EvalCall(code))
    for path in paths:
        with pytest.raises(dp.CheckpointError) as err:
            dp.load_teacher(path)
        assert "it pickles eval" in str(err.value) and TRUST_ENV not in str(err.value)
    # allow-listing it is refused outright, whatever the spelling; the payload never runs
    for name in ("eval", "builtins.exec"):
        out = _run(f"import dphubert_fairseq as dp; dp.load_teacher({paths[1]!r})", {TRUST_ENV: name})
        assert out.returncode != 0 and not marker.exists()
        assert f"{TRUST_ENV}: refusing to allow-list {name}" in out.stderr.strip().splitlines()[-1]
    from dphubert_fairseq.safe_loading import allow_globals

    for name in ("builtins.__import__", "os.system", "subprocess.Popen", "importlib.import_module"):
        with pytest.raises(ValueError, match=f"refusing to allow-list {name}: it is an object of the"):
            allow_globals([name])


@pytest.mark.parametrize(
    "name, kind",
    [
        ("numpy.dot", "not a class"),  # a function of an ordinary module
        ("collections.namedtuple", "not a class"),
        ("abc.ABCMeta", "a metaclass"),
        ("shutil.rmtree", "shutil module"),
        ("os.path.join", "os.path module"),
        ("functools.partial", "functools module"),  # a class that calls whatever it wraps
    ],
)
def test_only_data_classes_can_be_allow_listed(name, kind):
    from dphubert_fairseq.safe_loading import allow_globals

    with pytest.raises(ValueError, match=f"refusing to allow-list {name}: it is .*{kind}"):
        allow_globals([name])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda s: s.update(optimizer_history=[]), "'optimizer_history' is empty"),
        (lambda s: s.update(optimizer_history=None), "'optimizer_history' is empty"),
        (lambda s: s["cfg"].pop("model"), "'cfg' has no 'model' section"),
        (lambda s: s.update(model=[1, 2]), "'model' is a list, not a state dict"),
        (lambda s: s.update(extra_state=[]), "'extra_state' is not a dict"),
        (lambda s: s["optimizer_history"][-1].pop("lr_scheduler_state"), "upgrading it failed: KeyError"),
    ],
)
def test_incomplete_fairseq_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_teachers, damage, problem):
    state = torch.load(tiny_teachers["hubert_base"])
    damage(state)
    path = str(tmp_path / "incomplete.pt")
    torch.save(state, path)
    for load in (dp.load_teacher, checkpoint_utils.load_checkpoint_to_cpu):
        with pytest.raises(dp.CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(path) and problem in message, message


def test_a_remote_checkpoint_path_is_left_to_fairseqs_path_manager(tiny_teachers, monkeypatch):
    """fairseq reads ``s3://`` and the like through its PathManager (iopath, when installed): the plugin's
    checks of a local file do not stand in the way; a local path that is missing still gets its one line."""
    from fairseq import file_io

    remote = "s3://bucket/teachers/hubert_base.pt"
    local = tiny_teachers["hubert_base"]
    fetched = []

    def get_local_path(path, **kwargs):
        fetched.append(path)
        return local if path == remote else path

    monkeypatch.setattr(file_io.PathManager, "get_local_path", staticmethod(get_local_path))
    state = checkpoint_utils.load_checkpoint_to_cpu(remote)
    assert remote in fetched and "model" in state
    with pytest.raises(dp.CheckpointError, match=r"^/nowhere/x.pt: no such checkpoint file$"):
        checkpoint_utils.load_checkpoint_to_cpu("/nowhere/x.pt")
