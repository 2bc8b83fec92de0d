"""Runs killed with SIGKILL at any moment resume where their last completed save left them: checkpoint files
appear whole or not at all, and a checkpoint_last.pt cut short by someone else's plain copy is stepped over."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

import pytest
from omegaconf import OmegaConf

import dphubert_fairseq as dp
from dphubert_fairseq.checkpoint_recovery import checkpoint_damage, newest_intact_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402

pytestmark = pytest.mark.slow

#: updates of the runs killed during their copies (each copy there takes a second)
MAX_UPDATE = 15
#: kills of the run killed at random moments, and its updates: room for each kill after up to ~1.5 s of training
RANDOM_KILLS = 2
RANDOM_KILLS_MAX_UPDATE = 35
LRS = {"default": 2e-4, "gates": 0.1, "lagrangian": 0.1}
LOADED = re.compile(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)")
SAVED = re.compile(r"Saved checkpoint (\S+) \(epoch \d+ @ (\d+) updates")


def overrides(data: str, teacher: str, save_dir: str, max_update: int) -> List[str]:
    """A short stage 1 that saves after every update (validation off, so that saving is all it does)."""
    return (
        [f"task.data={data}", f"task.teacher_path={teacher}", f"checkpoint.save_dir={save_dir}"]
        + P.CPU_OVERRIDES
        + [
            "dataset.max_tokens=48000",
            "common.log_interval=1",
            "common.tensorboard_logdir=null",
            "checkpoint.save_interval_updates=1",
            "checkpoint.keep_interval_updates=2",
            "dataset.disable_validation=true",
            f"optimization.max_update={max_update}",
            "criterion.target_sparsity=0.5",
        ]
        + P.schedule_overrides("dphubert", 2, LRS)
    )


def start(cmd: Sequence[str], log: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return P.start(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def updates_logged(log: str) -> List[int]:
    return [int(r["num_updates"]) for r in P.logged(text(log), "train_inner")]


def saved_updates(path: str) -> int:
    """num_updates of a checkpoint, read through fairseq's own loader (so it is whole and loads)."""
    assert checkpoint_damage(path) is None, path
    return int(dp.safe_loading.read_checkpoint(path)["optimizer_history"][-1]["num_updates"])


def resumed_from(log: str) -> Optional[int]:
    found = LOADED.search(text(log))
    return int(found.group(2)) if found else None


def check_resumed_run(log: str, saved: int) -> None:
    """The run started from the last completed save: no update lost, none repeated."""
    if saved:
        assert resumed_from(log) == saved, text(log)[-3000:]
    done = updates_logged(log)
    if done:
        assert done[0] == saved + 1, (saved, done[:3])


@pytest.fixture
def train_cmd(speech_manifests, pretrained_hubert, tmp_path):
    """(save_dir, command) of a stage-1 run of ``max_update`` updates (default MAX_UPDATE)."""

    def make(max_update: int = MAX_UPDATE):
        save_dir = str(tmp_path / "run")
        return save_dir, P.bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train") + [
            "--config-dir",
            "configs",
            "--config-name",
            "dphubert",
            *overrides(speech_manifests, pretrained_hubert, save_dir, max_update),
        ]

    return make


def finish(cmd: Sequence[str], save_dir: str, saved: int, log: str, max_update: int = MAX_UPDATE) -> None:
    """Run to the end; it resumes from ``saved`` updates and reaches ``max_update``."""
    proc = start(cmd, log)
    assert proc.wait(timeout=600) == 0, text(log)[-3000:]
    check_resumed_run(log, saved)
    assert saved_updates(os.path.join(save_dir, "checkpoint_last.pt")) == max_update


def test_killed_at_random_moments_resumes_where_it_saved(train_cmd, tmp_path):
    save_dir, cmd = train_cmd(RANDOM_KILLS_MAX_UPDATE)
    last = os.path.join(save_dir, "checkpoint_last.pt")
    rng = random.Random(7)
    saved = 0
    for attempt in range(RANDOM_KILLS):
        log = str(tmp_path / f"run{attempt}.log")
        proc = start(cmd, log)
        # a moment at random while it trains (and saves after every update): 0-1.5 s after its first update
        wait_for(lambda: updates_logged(log), proc, "the first update")
        time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before it was killed: raise RANDOM_KILLS_MAX_UPDATE"
        kill(proc)
        check_resumed_run(log, saved)
        reached = updates_logged(log)[-1]
        now = saved_updates(last)
        # nothing lost beyond the last completed save: the kill came after update `reached` was logged,
        # at worst while its checkpoint was written
        assert reached - 1 <= now <= reached and now >= saved, (saved, reached, now)
        saved = now
    finish(cmd, save_dir, saved, str(tmp_path / "final.log"), RANDOM_KILLS_MAX_UPDATE)


def run_until_inside_a_copy(cmd: Sequence[str], mode: str, marker: str, log: str) -> subprocess.Popen:
    """Start a run whose copies to checkpoint_last.pt take about a second; return once it is inside its
    third copy (two saves of this run completed), still running."""
    open(marker, "w").close()
    script = [sys.executable, os.path.join(P.REPO, "tests", "slow_copy_train.py"), marker, mode]
    proc = start(script + list(cmd[cmd.index("--config-dir") :]), log)

    def inside_third_copy() -> bool:
        lines = text(marker).splitlines()
        starts = [line for line in lines if line.startswith("copying")]
        return len(starts) >= 3 and not lines[-1].startswith("copied")

    wait_for(inside_third_copy, proc, "a copy to checkpoint_last.pt")
    return proc


def last_completed_save(log: str) -> int:
    return int(SAVED.findall(text(log))[-1][1])


def test_killed_during_the_copy_to_checkpoint_last(train_cmd, tmp_path):
    """The plugin's copy (its full-copy path, as on a file system without hard links) killed midway:
    checkpoint_last.pt is still the previous save, whole, and the resumed run continues from it."""
    save_dir, cmd = train_cmd()
    last = os.path.join(save_dir, "checkpoint_last.pt")
    log = str(tmp_path / "run.log")
    proc = run_until_inside_a_copy(cmd, "plugin", str(tmp_path / "copies.txt"), log)
    kill(proc)
    check_resumed_run(log, 0)
    saved = saved_updates(last)
    assert saved == last_completed_save(log), text(log)[-2000:]
    leftovers = [f for f in os.listdir(save_dir) if f.endswith(".tmp")]
    # the killed copy's temporary file, never under a checkpoint's name; the next run removes it
    assert len(leftovers) == 1, leftovers
    finish(cmd, save_dir, saved, str(tmp_path / "final.log"))
    assert not [f for f in os.listdir(save_dir) if f.endswith(".tmp")]


def test_resume_steps_over_a_checkpoint_last_cut_short(train_cmd, tmp_path):
    """fairseq's own plain copy, killed midway, leaves checkpoint_last.pt cut short; the next run (the same
    command) resumes from the newest whole checkpoint beside it and says so."""
    save_dir, cmd = train_cmd()
    last = os.path.join(save_dir, "checkpoint_last.pt")
    log = str(tmp_path / "stock.log")
    proc = run_until_inside_a_copy(cmd, "stock", str(tmp_path / "copies.txt"), log)
    kill(proc)
    assert "cut short" in (checkpoint_damage(last) or "")  # the bug, reproduced
    whole = newest_intact_checkpoint(save_dir, last)
    saved = saved_updates(whole)
    assert saved == last_completed_save(log) + 1  # the save whose copy was killed: its checkpoint_E_N.pt
    final = str(tmp_path / "final.log")
    finish(cmd, save_dir, saved, final)
    assert re.search(
        r"checkpoint_last\.pt: it is cut short .*resuming from the newest whole checkpoint", text(final)
    )


class _Trainer:
    checkpoint_suffix = ""


def test_no_whole_checkpoint_left_is_one_line_naming_the_file(tmp_path):
    from fairseq import checkpoint_utils

    last = tmp_path / "checkpoint_last.pt"
    last.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    cfg = OmegaConf.create({"restore_file": "checkpoint_last.pt", "save_dir": str(tmp_path)})
    with pytest.raises(dp.CheckpointError) as err:
        checkpoint_utils.load_checkpoint(cfg, _Trainer())
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(last))
    assert "no other whole checkpoint" in message and "remove it" in message


def test_the_newest_whole_checkpoint_is_chosen(tmp_path, tiny_teachers):
    import shutil

    good = tiny_teachers["hubert_base"]
    for i, name in enumerate(["checkpoint_1_3.pt", "checkpoint_1_5.pt", "checkpoint_1_6.pt"]):
        shutil.copy(good, tmp_path / name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    with open(tmp_path / "checkpoint_1_6.pt", "r+b") as f:
        f.truncate(1000)
    last = str(tmp_path / "checkpoint_last.pt")
    assert newest_intact_checkpoint(str(tmp_path), last) == str(tmp_path / "checkpoint_1_5.pt")
    assert checkpoint_damage(str(tmp_path / "checkpoint_1_6.pt")).startswith("it is cut short")
