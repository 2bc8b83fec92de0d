"""Helpers of the pipeline tests: real-speech manifests, a teacher pretrained by stock fairseq's own trainer,
and runs of fairseq-hydra-train / dphubert-export as a user types them."""

import glob
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile as sf

from dphubert_fairseq.quickstart.runs import composite_schedule, console_script, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from benchmarks.harness import compose  # noqa: E402,F401  (configs composed as fairseq-hydra-train does)

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


bin_or_module = console_script  # the console script next to this interpreter, else python -m


def run(cmd: Sequence[str], cwd: str = REPO, env: Optional[Dict[str, str]] = None, timeout: int = 600):
    # the checkout under test comes first, whatever checkout the environment's editable install points at
    full_env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    )
    full_env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    full_env.update(env or {})
    return subprocess.run(list(cmd), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def distill_task(data, teacher, **task_cfg):
    """The ``dphubert_distill`` task as ``setup_task`` makes it for manifests in ``data`` and ``teacher``."""
    from omegaconf import OmegaConf

    from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

    cfg = OmegaConf.structured(
        DPHuBERTDistillConfig(data=str(data), teacher_path=str(teacher), tpu=False, seed=1, **task_cfg)
    )
    return DPHuBERTDistillTask.setup_task(cfg)


def write_speech_manifests(folder: str, chunk_seconds: float = 1.5, valid_chunks: int = 4) -> str:
    """Cut the LibriVox clips of pocketsphinx-testdata into chunks; write them and train/valid manifests
    (fairseq's format) plus random k-means-like labels ``*.km`` for a HuBERT teacher. Returns the folder."""
    files = sorted(glob.glob(os.path.join(LIBRIVOX, "*.wav")))
    if not files:
        raise FileNotFoundError("pocketsphinx-testdata is not installed")
    audio_dir = os.path.join(folder, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    entries = []
    for f in files:
        wav, rate = sf.read(f, dtype="float32")
        step = int(chunk_seconds * rate)
        for start in range(0, len(wav) - step + 1, step):
            name = f"{os.path.basename(f)[:-4]}_{start // step}.wav"
            sf.write(os.path.join(audio_dir, name), wav[start : start + step], rate)
            entries.append((name, step))
    rng = np.random.default_rng(0)
    splits = {"train": entries[valid_chunks:], "valid": entries[:valid_chunks]}
    for split, items in splits.items():
        with (
            open(os.path.join(folder, f"{split}.tsv"), "w") as tsv,
            open(os.path.join(folder, f"{split}.km"), "w") as km,
        ):
            tsv.write(audio_dir + "\n")
            for name, n in items:
                tsv.write(f"{name}\t{n}\n")
                frames = (n - 400) // 320 + 1
                km.write(" ".join(str(x) for x in rng.integers(0, 10, frames)) + "\n")
    with open(os.path.join(folder, "dict.km.txt"), "w") as d:
        d.writelines(f"{i} 1\n" for i in range(10))
    return folder


def hubert_pretrain_configs() -> str:
    import fairseq

    return os.path.join(os.path.dirname(fairseq.__file__), "examples", "hubert", "config", "pretrain")


def pretrain_tiny_hubert(data: str, save_dir: str, layers: int = 12, updates: int = 4) -> str:
    """A small HuBERT pretrained for a few updates by stock fairseq (hubert_pretraining task, fairseq's own
    HuBERT Base recipe, shrunk); returns its checkpoint_last.pt."""
    cmd = bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train") + [
        "--config-dir",
        hubert_pretrain_configs(),
        "--config-name",
        "hubert_base_librispeech",
        f"task.data={data}",
        f"task.label_dir={data}",
        "task.labels=[km]",
        "model.label_rate=50",
        "task.min_sample_size=8000",
        "common.fp16=false",
        "common.cpu=true",
        "common.tensorboard_logdir=null",
        "common.log_interval=1",
        "distributed_training.distributed_world_size=1",
        "distributed_training.nprocs_per_node=1",
        "dataset.num_workers=0",
        "dataset.max_tokens=100000",
        "dataset.required_batch_size_multiple=1",
        f"optimization.max_update={updates}",
        f"checkpoint.save_dir={save_dir}",
        f"hydra.run.dir={save_dir}/hydra",
        f"+model.encoder_layers={layers}",
        "+model.encoder_embed_dim=32",
        "+model.encoder_ffn_embed_dim=64",
        "+model.encoder_attention_heads=4",
        "+model.conv_pos=16",
        "+model.conv_pos_groups=4",
        'model.conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"',
        "model.final_dim=16",
    ]
    out = run(cmd)
    path = os.path.join(save_dir, "checkpoint_last.pt")
    if out.returncode != 0 or not os.path.exists(path):
        raise RuntimeError("stock HuBERT pretraining failed:\n" + out.stdout[-3000:] + out.stderr[-3000:])
    return path


CPU_OVERRIDES = [
    "common.fp16=false",
    "common.cpu=true",
    "distributed_training.distributed_world_size=1",
    "distributed_training.nprocs_per_node=1",
    "dataset.num_workers=0",
    "task.min_sample_size=8000",
    "dataset.required_batch_size_multiple=1",
]


def schedule_overrides(
    config: str, warmup: int, lrs: Dict[str, float], total: Optional[int] = None
) -> List[str]:
    """Learning rate(s) and warm-up of a config; the linear decay ends at optimization.max_update, or at
    ``total`` for a run stopped early on purpose."""
    if config == "dphubert":
        return composite_schedule(lrs, warmup, total)
    out = [f"lr_scheduler.warmup_updates={warmup}", f"optimization.lr=[{lrs['default']}]"]
    return out + ([f"lr_scheduler.total_num_update={total}"] if total is not None else [])


def hydra_train(config: str, overrides: Sequence[str], env=None, timeout: int = 600):
    """``fairseq-hydra-train --config-dir configs --config-name CONFIG OVERRIDES`` from the repository root."""
    cmd = bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train")
    return run(
        cmd + ["--config-dir", "configs", "--config-name", config, *overrides], env=env, timeout=timeout
    )


logged = records  # fairseq's JSON log records of one kind ('train_inner', 'valid', 'train')


def export(checkpoint: str, out: str, json_path: Optional[str] = None, extra: Sequence[str] = ()):
    cmd = bin_or_module("dphubert-export", "dphubert_fairseq.export") + [checkpoint, out, *extra]
    if json_path:
        cmd += ["--json", json_path]
    return run(cmd)


def write_letter_labels(folder: str, text: str = "A TINY LABELLED SET") -> None:
    """Letter transcripts (fairseq's ``.ltr`` format) for every manifest in ``folder``, and ``dict.ltr.txt``."""
    letters = " ".join(text.replace(" ", "|")) + " |"
    for tsv in glob.glob(os.path.join(folder, "*.tsv")):
        with open(tsv) as f:
            count = sum(1 for line in f) - 1
        with open(tsv[:-4] + ".ltr", "w") as f:
            f.writelines(letters + "\n" for _ in range(count))
    symbols = sorted(set(letters.split()))
    with open(os.path.join(folder, "dict.ltr.txt"), "w") as f:
        f.writelines(f"{s} 1\n" for s in symbols)


def tensorboard_scalars(folder: str) -> Dict[str, Dict[str, List[float]]]:
    """``{run: {tag: values}}`` of the TensorBoard event files under ``folder`` (one sub-folder per run,
    e.g. ``train_inner``, ``valid``), read record by record (TFRecord framing, tensorboardX's protobufs)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: Dict[str, Dict[str, List[float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*", "events.out.tfevents.*"))):
        run_tags = out.setdefault(os.path.basename(os.path.dirname(path)), {})
        with open(path, "rb") as f:
            while True:
                header = f.read(12)  # uint64 length, uint32 masked crc of the length
                if len(header) < 12:
                    break
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)  # crc of the data
                for value in event.summary.value:
                    run_tags.setdefault(value.tag, []).append(value.simple_value)
    return out
