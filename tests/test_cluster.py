"""docs/recipe.md's "On a SLURM cluster" route: stage 1 through hydra's submitit launcher. On CPU its local mode runs
the job as a cluster would (a separate job process, its log under hydra.sweep.dir/.submitit/JOB_ID/); a killed
job resumes when the same command is resubmitted; the SLURM command there composes as the installed
launcher spells its keys."""

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Set

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import helpers as P  # noqa: E402

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install "dphubert-fairseq[slurm]"')

pytestmark = pytest.mark.slow

LRS = {"default": 2e-4, "gates": 0.1, "lagrangian": 0.1}
RECIPE = os.path.join(P.REPO, "docs", "recipe.md")


@pytest.fixture(scope="module")
def data(speech_manifests: str) -> str:
    return speech_manifests


@pytest.fixture(scope="module")
def teacher(pretrained_hubert: str) -> str:
    return pretrained_hubert


def local_job(data: str, teacher: str, save_dir: str, updates: int, extra: Sequence[str] = ()) -> List[str]:
    """Overrides of a short CPU stage-1 run submitted through submitit's local mode (`-m` first: a flag
    between two overrides makes hydra's argparse reject the ones after it)."""
    return (
        ["-m", f"task.data={data}", f"task.teacher_path={teacher}", f"checkpoint.save_dir={save_dir}"]
        + P.CPU_OVERRIDES
        + ["dataset.max_tokens=48000", "common.log_interval=1", f"optimization.max_update={updates}"]
        + P.schedule_overrides("dphubert", 1, LRS)
        + list(extra)
        + [
            "hydra/launcher=submitit_local",
            "hydra.launcher.gpus_per_node=0",
            # submitit's own safety net: a job left behind by a crashed test ends after this long
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={save_dir}/hydra_sweep",
        ]
    )


def job_logs(sweep_dir: str) -> Dict[str, str]:
    """{job id: the job's stdout} of the submitit jobs under ``sweep_dir`` (submitit_folder's default,
    ``${hydra.sweep.dir}/.submitit/%j``; the job id is the local controller's pid)."""
    out = {}
    for path in glob.glob(os.path.join(sweep_dir, ".submitit", "*", "*_0_log.out")):
        with open(path) as f:
            out[os.path.basename(os.path.dirname(path))] = f.read()
    return out


def saved_updates(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it is truthy; its value, or a failed test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def live_processes(session: Optional[int] = None, cmdline_has: Optional[str] = None) -> Set[int]:
    """Pids of running (not zombie) processes of a session, or whose command line contains a string."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if fields[0] in "ZX":
            continue
        if (session is None or int(fields[3]) == session) and (cmdline_has is None or cmdline_has in cmdline):
            pids.add(int(entry))
    return pids


def test_local_job_writes_its_checkpoint_to_save_dir(tmp_path, data: str, teacher: str):
    """A stage-1 run submitted through the launcher (local mode) trains in its own job process and writes
    checkpoint_last.pt to checkpoint.save_dir, not under the sweep folder."""
    save_dir = str(tmp_path / "local")
    out = P.hydra_train("dphubert", local_job(data, teacher, save_dir, 2))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in out.stdout + out.stderr
    assert P.logged(out.stdout, "train_inner") == []  # the launcher itself did not train
    (log,) = job_logs(os.path.join(save_dir, "hydra_sweep")).values()
    assert [r["num_updates"] for r in P.logged(log, "train_inner")] == ["1", "2"]
    assert "Job completed successfully" in log
    assert saved_updates(os.path.join(save_dir, "checkpoint_last.pt")) == 2


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the job's processes through /proc")
def test_killed_job_resumes_when_resubmitted(tmp_path, data: str, teacher: str):
    """SIGKILL to the launcher's process group and the job process once a checkpoint is saved leaves nothing
    running; the same command, resubmitted, loads checkpoint_last.pt and trains on from its update count."""
    updates = 6  # 5 batches an epoch: the resumed run crosses an epoch boundary
    save_dir = str(tmp_path / "killed")
    sweep_dir = os.path.join(save_dir, "hydra_sweep")
    overrides = local_job(data, teacher, save_dir, updates, ["checkpoint.save_interval_updates=1"])
    cmd = P.bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train")
    cmd += ["--config-dir", "configs", "--config-name", "dphubert", *overrides]
    with open(tmp_path / "launcher.log", "w") as launcher_log:
        launcher = P.start(cmd, stdout=launcher_log, stderr=subprocess.STDOUT, start_new_session=True)
    jobs: Set[int] = set()
    try:
        # fairseq logs "Saved checkpoint" once every copy, checkpoint_last.pt included, is complete (stock
        # fairseq copies checkpoint_E_U.pt to checkpoint_last.pt in place: the file exists before that)
        wait_for(
            lambda: (
                launcher.poll() is not None
                or any("Saved checkpoint" in t for t in job_logs(sweep_dir).values())
            ),
            300,
            "the job's first checkpoint",
        )
        assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
        # submitit's local mode: launcher -> controller (python -m submitit.local._local) -> job
        jobs = live_processes(cmdline_has=f"submitit.core._submit {sweep_dir}")
        assert len(jobs) == 1 and launcher.pid not in jobs
    finally:
        for kill, target in [(os.killpg, launcher.pid)] + [(os.kill, pid) for pid in jobs]:
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
    wait_for(
        lambda: not live_processes(session=launcher.pid) and not (jobs & live_processes()),
        30,
        "the killed processes to exit",
    )
    first_jobs = job_logs(sweep_dir)
    (first_log,) = first_jobs.values()
    assert "Job completed" not in first_log
    saved = saved_updates(os.path.join(save_dir, "checkpoint_last.pt"))
    assert 1 <= saved < updates

    out = P.hydra_train("dphubert", overrides)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (log,) = [text for job, text in job_logs(sweep_dir).items() if job not in first_jobs]
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    loaded = rf"Loaded checkpoint {re.escape(checkpoint)} \(epoch \d+ @ {saved} updates\)"
    assert re.search(loaded, log), log[-3000:]
    trained = [int(r["num_updates"]) for r in P.logged(log, "train_inner")]
    assert trained == list(range(saved + 1, updates + 1))
    assert saved_updates(checkpoint) == updates


def readme_slurm_command() -> List[str]:
    """docs/recipe.md's SLURM command (the fenced block after "On a SLURM cluster"), split as a shell would."""
    with open(RECIPE, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"On a SLURM cluster.*?```(?:bash)?\n(.*?)```", text, re.S)
    assert match, "docs/recipe.md has no command block after 'On a SLURM cluster'"
    return shlex.split(match.group(1).replace("\\\n", " "))


def test_readme_slurm_command_composes(tmp_path, data: str, teacher: str):
    """That command with `--cfg hydra` instead of `-m` (hydra takes one of them) prints the hydra
    config and submits nothing: submitit's SLURM launcher with the documented values. A misspelled launcher key
    fails."""
    readme = readme_slurm_command()
    assert readme[0] == "fairseq-hydra-train" and "-m" in readme
    args = []
    for arg in readme[1:]:
        if arg == "-m":
            args += ["--cfg", "hydra"]
        elif arg.startswith("task.data="):
            args.append(f"task.data={data}")
        elif arg.startswith("task.teacher_path="):
            args.append(f"task.teacher_path={teacher}")
        else:
            args.append(arg.replace("$PWD", str(tmp_path)))
    cmd = P.bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train")
    out = P.run(cmd + args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    hydra = yaml.safe_load(out.stdout)["hydra"]
    launcher = hydra["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    given = {
        a.split("=", 1)[0][len("hydra.launcher.") :]: a.split("=", 1)[1]
        for a in args
        if a.startswith("hydra.launcher.")
    }
    assert {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min"} <= set(given)
    for key, value in given.items():
        assert launcher[key] == yaml.safe_load(value), key
    assert hydra["sweep"]["dir"].startswith(str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing ran, nothing was submitted

    misspelled = [a.replace("hydra.launcher.gpus_per_node=", "hydra.launcher.gpu_per_node=") for a in args]
    assert misspelled != args
    out = P.run(cmd + misspelled)
    assert out.returncode != 0, out.stdout[-3000:]
    assert "Key 'gpu_per_node' not in 'SlurmQueueConf'" in out.stderr, out.stderr[-3000:]
