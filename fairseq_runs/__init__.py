"""Running fairseq as a user does, from this checkout: the helpers the quickstart, the benchmarks and the tests
share. Not installed and not imported by the plugin (``setup.py`` ships ``dphubert_fairseq`` only).

- subprocesses: the console scripts next to this interpreter, run with this checkout first on ``PYTHONPATH``
  and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` dropped (so they test the plugin's safe loading, not a bypass);
- configs composed as ``fairseq-hydra-train`` composes them;
- override lists: one CPU process, a run's length, the recipe's composite learning-rate schedule, a small
  HuBERT teacher pretrained by stock fairseq;
- fairseq's JSON log records read back from a run's output.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

Log = Callable[[str], None]
_RECORD = re.compile(r"\]\[(train_inner|valid|train)\]\[INFO\] - (\{.*\})")


# ----- subprocesses -----


def console_script(name: str, module: str) -> List[str]:
    """The console script next to this interpreter, else ``python -m module``."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return [candidate] if os.path.exists(candidate) else [sys.executable, "-m", module]


bin_or_module = console_script


def checkout_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH`` (whatever checkout an editable install points
    at), unbuffered output, and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` dropped; ``extra`` applied last."""
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    )
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.update(extra or {})
    return env


def run(
    cmd: Sequence[str], cwd: str = REPO, env: Optional[Dict[str, str]] = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in :func:`checkout_env` (plus ``env``); its output captured as text."""
    return subprocess.run(
        list(cmd), cwd=cwd, env=checkout_env(env), capture_output=True, text=True, timeout=timeout
    )


def start(
    cmd: Sequence[str], cwd: str = REPO, env: Optional[Dict[str, str]] = None, **popen
) -> subprocess.Popen:
    """Start ``cmd`` in :func:`checkout_env` (plus ``env``); ``popen`` goes to ``subprocess.Popen``."""
    return subprocess.Popen(list(cmd), cwd=cwd, env=checkout_env(env), **popen)


def run_logged(
    cmd: Sequence[str],
    log_path: str,
    cwd: str = REPO,
    show: Log = print,
    env: Optional[Dict[str, str]] = None,
) -> str:
    """Run ``cmd`` in :func:`checkout_env`; write everything it prints to ``log_path`` and show fairseq's
    progress records as they come. Raises RuntimeError with the tail of the log when it fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    lines = []
    with open(log_path, "w") as log:
        with start(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                match = _RECORD.search(line)
                if match:
                    show("    " + _short(match.group(1), json.loads(match.group(2))))
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(lines[-25:])
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log: {log_path}\n{tail}"
        )
    return "".join(lines)


def hydra_train_command(config_dir: str, config_name: str, overrides: Sequence[str] = ()) -> List[str]:
    """``fairseq-hydra-train --config-dir DIR --config-name NAME OVERRIDES``."""
    cmd = console_script("fairseq-hydra-train", "fairseq_cli.hydra_train")
    return cmd + ["--config-dir", config_dir, "--config-name", config_name, *overrides]


def hydra_train(
    config: str, overrides: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``fairseq-hydra-train --config-dir configs --config-name CONFIG OVERRIDES`` from the repository root."""
    return run(hydra_train_command("configs", config, overrides), env=env, timeout=timeout)


def export_command(checkpoint: str, out: str, json_path: Optional[str] = None, extra: Sequence[str] = ()):
    """``dphubert-export CHECKPOINT OUT [EXTRA] [--json JSON]``."""
    cmd = console_script("dphubert-export", "dphubert_fairseq.export") + [checkpoint, out, *extra]
    return cmd + (["--json", json_path] if json_path else [])


def export(
    checkpoint: str, out: str, json_path: Optional[str] = None, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """Run ``dphubert-export`` (see :func:`export_command`) from the repository root."""
    return run(export_command(checkpoint, out, json_path, extra))


# ----- configs -----


def compose(config_dir: str, config_name: str, overrides: Sequence[str]):
    """The config ``fairseq-hydra-train --config-dir DIR --config-name NAME OVERRIDES`` would run."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import dphubert_fairseq  # noqa: F401  (registers the plugin for add_defaults)

    hydra_init(config_name)
    # version_base 1.1: fairseq-hydra-train's semantics (the yaml is matched with the schema of its name)
    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base="1.1"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


# ----- override lists -----


def cpu_overrides(
    min_sample_size: Optional[int] = 8000,
    max_tokens: Optional[int] = None,
    max_sample_size: Optional[int] = None,
    amp: Optional[bool] = None,
) -> List[str]:
    """One CPU process without fp16: utterances shorter than ``min_sample_size`` samples skipped, batches of
    ``max_tokens`` samples, utterances cropped to ``max_sample_size``, AMP set to ``amp``; None leaves the
    config's value."""
    out = [
        "common.fp16=false",
        "common.cpu=true",
        "distributed_training.distributed_world_size=1",
        "distributed_training.nprocs_per_node=1",
        "dataset.num_workers=0",
        "dataset.required_batch_size_multiple=1",
    ]
    if amp is not None:
        out.append(f"common.amp={str(amp).lower()}")
    if max_tokens is not None:
        out.append(f"dataset.max_tokens={max_tokens}")
    if min_sample_size is not None:
        out.append(f"task.min_sample_size={min_sample_size}")
    if max_sample_size is not None:
        out.append(f"task.max_sample_size={max_sample_size}")
    return out


#: what most tests run with: one CPU process, utterances of at least 0.5 s, the config's AMP setting
CPU_OVERRIDES = cpu_overrides()


def short_utterance_overrides(max_tokens: int) -> List[str]:
    """What the quickstart and the comparison run with: one CPU process in fp32, batches of ``max_tokens``
    samples, utterances of 1 to 4 s."""
    return cpu_overrides(min_sample_size=16000, max_tokens=max_tokens, max_sample_size=64000, amp=False)


def run_length(updates: int, log_every: int) -> List[str]:
    """A run of ``updates`` updates, logging every ``log_every``, validating and saving once at the end."""
    return [
        f"optimization.max_update={updates}",
        f"common.log_interval={max(1, log_every)}",
        f"dataset.validate_interval_updates={updates}",
        f"checkpoint.save_interval_updates={updates}",
    ]


def composite_schedule(lrs: Dict[str, float], warmup: int, total: Optional[int] = None) -> List[str]:
    """Overrides of ``configs/dphubert.yaml``'s three optimizer groups: each group's learning rate and the one
    warm-up key the groups share. Their decay ends at ``optimization.max_update``, or at ``total`` (for a run
    stopped early on purpose, e.g. to test resuming)."""
    out = [f"optimizer.groups.{group}.lr_float={lr}" for group, lr in lrs.items()]
    out.append(f"optimizer.groups.default.lr_scheduler.warmup_updates={warmup}")
    if total is not None:
        out += [f"optimizer.groups.{group}.lr_scheduler.total_num_update={total}" for group in lrs]
    return out


def schedule_overrides(
    config: str, warmup: int, lrs: Dict[str, float], total: Optional[int] = None
) -> List[str]:
    """Learning rate(s) and warm-up of ``configs/<config>.yaml``: the composite schedule of ``dphubert``, the
    plain one of ``dphubert_final`` (``lrs['default']``)."""
    if config == "dphubert":
        return composite_schedule(lrs, warmup, total)
    out = [f"lr_scheduler.warmup_updates={warmup}", f"optimization.lr=[{lrs['default']}]"]
    return out + ([f"lr_scheduler.total_num_update={total}"] if total is not None else [])


def optimizer_overrides(config: str, name: str) -> List[str]:
    """``configs/<config>.yaml`` with every group's optimizer replaced by fairseq optimizer ``name`` (the configs
    use ``torch_adamw``; ``adam``, fairseq's, takes the same keys)."""
    if config == "dphubert":
        return [
            f"optimizer.groups.{group}.optimizer._name={name}" for group in ("default", "gates", "lagrangian")
        ]
    return [f"optimizer._name={name}"]


# ----- teachers pretrained by stock fairseq -----


@dataclass(frozen=True)
class Shape:
    """A HuBERT encoder shape, given to fairseq's ``hubert`` model as overrides."""

    layers: int
    dim: int
    ffn: int
    heads: int
    conv: str
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: Optional[int] = None  # None: the recipe's

    def hubert_overrides(self) -> List[str]:
        out = [
            f"+model.encoder_layers={self.layers}",
            f"+model.encoder_embed_dim={self.dim}",
            f"+model.encoder_ffn_embed_dim={self.ffn}",
            f"+model.encoder_attention_heads={self.heads}",
            f"+model.conv_pos={self.conv_pos}",
            f"+model.conv_pos_groups={self.conv_pos_groups}",
            f'model.conv_feature_layers="{self.conv}"',
        ]
        return out + ([f"model.final_dim={self.final_dim}"] if self.final_dim is not None else [])


#: the tests' pretrained teacher: 12 layers of width 32
TINY_HUBERT = Shape(12, 32, 64, 4, "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", 16, 4, 16)


def fairseq_hubert_config_dir() -> str:
    """fairseq's own HuBERT pretraining recipes (``hubert_base_librispeech.yaml``)."""
    import fairseq

    return os.path.join(os.path.dirname(fairseq.__file__), "examples", "hubert", "config", "pretrain")


def stock_hubert_overrides(
    data: str, shape: Shape, label_rate: int, run_dir: Optional[str] = None
) -> List[str]:
    """Overrides of fairseq's ``hubert_base_librispeech.yaml`` for k-means labels ``km`` in ``data``, at
    ``label_rate`` Hz, and a model of ``shape``; hydra's run folder ``run_dir`` when given."""
    out = [
        f"task.data={data}",
        f"task.label_dir={data}",
        "task.labels=[km]",
        f"model.label_rate={label_rate}",
        "common.tensorboard_logdir=null",
    ]
    return out + ([f"hydra.run.dir={run_dir}"] if run_dir else []) + shape.hubert_overrides()


def hubert_pretraining_command(
    data: str, save_dir: str, shape: Shape, label_rate: int, updates: int, extra: Sequence[str] = ()
) -> List[str]:
    """``fairseq-hydra-train`` of stock HuBERT pretraining (fairseq's Base recipe, reshaped) into ``save_dir``
    for ``updates`` updates; ``extra`` overrides last (CPU, batch size, logging)."""
    overrides = stock_hubert_overrides(data, shape, label_rate, run_dir=f"{save_dir}/hydra") + [
        f"optimization.max_update={updates}",
        f"checkpoint.save_dir={save_dir}",
        *extra,
    ]
    return hydra_train_command(fairseq_hubert_config_dir(), "hubert_base_librispeech", overrides)


def pretrain_tiny_hubert(data: str, save_dir: str, shape: Shape = TINY_HUBERT, updates: int = 4) -> str:
    """A small HuBERT pretrained for a few updates on CPU by stock fairseq; its ``checkpoint_last.pt``."""
    extra = cpu_overrides(max_tokens=100000) + ["common.log_interval=1"]
    out = run(hubert_pretraining_command(data, save_dir, shape, 50, updates, extra))
    path = os.path.join(save_dir, "checkpoint_last.pt")
    if out.returncode != 0 or not os.path.exists(path):
        raise RuntimeError("stock HuBERT pretraining failed:\n" + out.stdout[-3000:] + out.stderr[-3000:])
    return path


# ----- logs -----


def records(output: str, kind: str) -> List[Dict[str, str]]:
    """fairseq's JSON log records of one kind ('train_inner', 'valid', 'train')."""
    return [json.loads(m.group(2)) for m in _RECORD.finditer(output) if m.group(1) == kind]


_SHOWN = ("num_updates", "loss", "distill_loss", "expected_sparsity", "target_sparsity", "eval_sparsity")


def _short(kind: str, record: Dict[str, str]) -> str:
    prefix = "valid_" if kind == "valid" else ("train_" if kind == "train" else "")
    parts = [f"{key}={record[prefix + key]}" for key in _SHOWN if prefix + key in record]
    return f"[{kind}] " + " ".join(parts)
