"""A non-editable install works without the checkout: the configs ship in the wheel, ``config_dir()`` finds
them, and the card's stage-1 command trains from an unrelated folder."""

import os
import site
import subprocess
import sys

import helpers
import pytest

pytestmark = pytest.mark.slow


def config_files(root: str) -> list:
    """Every yaml under ``root``, relative to it."""
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, fs in os.walk(root)
        for f in fs
        if f.endswith(".yaml")
    )


def test_wheel_install_trains_stage1_from_another_folder(tmp_path, speech_manifests, pretrained_hubert):
    """A fresh venv (the project's packages through a .pth; this checkout installed with pip, not editable)
    imports its own copy of the plugin, reports the packaged configs, and runs ``fairseq-hydra-train
    --config-dir $(config dir) --config-name dphubert`` to a checkpoint. (``python -m venv
    --system-site-packages`` from a venv sees the base interpreter's packages, not the venv's: hence the .pth.)"""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(packages, "project_env.pth"), "w") as f:
        f.write(site.getsitepackages()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env["PATH"]
    work = tmp_path / "elsewhere"
    work.mkdir()

    def call(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    pip = call(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", helpers.REPO)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    where = call(python, "-c", "import dphubert_fairseq as d; print(d.__file__); print(d.config_dir())")
    assert where.returncode == 0, where.stderr[-3000:]
    package_file, config_dir = where.stdout.strip().splitlines()[-2:]
    assert package_file.startswith(packages), package_file  # the installed copy, not the checkout's
    assert config_dir == os.path.join(packages, "dphubert_fairseq", "configs")
    assert config_files(config_dir) == config_files(helpers.CONFIGS)  # compute/macs.yaml included
    printed = call(python, "-m", "dphubert_fairseq.packaged_configs")
    assert printed.stdout.strip().splitlines()[-1] == config_dir
    user_dir = (
        call(python, "-m", "dphubert_fairseq.packaged_configs", "--user-dir").stdout.strip().splitlines()[-1]
    )
    for name in ("examples", "fairseq_runs", "benchmarks", "tests"):
        assert not os.path.exists(os.path.join(packages, name)), name

    save_dir = tmp_path / "stage1"
    cmd = [
        python,  # fairseq's console script belongs to the project venv (its python): this venv runs the module
        "-m",
        "fairseq_cli.hydra_train",
        "--config-dir",
        config_dir,
        "--config-name",
        "dphubert_macs",  # the recipe with compute/macs.yaml on top: composed from the packaged tree
        f"task.data={speech_manifests}",
        f"task.teacher_path={pretrained_hubert}",
        f"checkpoint.save_dir={save_dir}",
        # fairseq finds the yaml's "common.user_dir: dphubert_fairseq" relative to the launch folder or next
        # to fairseq's own package; here the plugin is in another site-packages, so it is named explicitly
        f"common.user_dir={user_dir}",
        *helpers.CPU_OVERRIDES,
        "dataset.max_tokens=48000",
        "optimization.max_update=2",
        "common.log_interval=1",
        "criterion.sparsity_warmup_updates=1",
        *helpers.composite_schedule({"default": 2e-4, "gates": 0.1, "lagrangian": 0.1}, 1),
    ]
    out = call(*cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(helpers.records(out.stdout, "train_inner")) == 2
    assert (save_dir / "checkpoint_last.pt").exists()
    assert "'target_metric': macs" in out.stdout and "'conv_gate_init_drop_rate': 0.5" in out.stdout
    assert os.listdir(work) == []  # nothing written into the launch folder


def test_packaged_configs_command_line(capsys):
    """``python -m dphubert_fairseq.packaged_configs``: the configs' folder, ``--user-dir`` the plugin's,
    ``--help`` the usage (exit 0), anything else the usage line and exit 2."""
    from dphubert_fairseq import packaged_configs

    assert packaged_configs.main([]) == 0
    assert capsys.readouterr().out.strip() == packaged_configs.config_dir()
    assert os.path.isfile(os.path.join(packaged_configs.config_dir(), "dphubert.yaml"))
    assert packaged_configs.main(["--user-dir"]) == 0
    assert capsys.readouterr().out.strip() == packaged_configs.user_dir()
    with pytest.raises(SystemExit) as done:
        packaged_configs.main(["--help"])
    assert done.value.code == 0 and "--user-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        packaged_configs.main(["--config"])
    assert done.value.code == 2 and "unrecognized arguments: --config" in capsys.readouterr().err
