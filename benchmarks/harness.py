"""What the benchmarks share: trainers built as ``fairseq_cli.train`` builds them on configs composed as
``fairseq-hydra-train`` composes them (``fairseq_runs.compose``), a fixed batch of audio, and meters for time
and peak memory. What the benchmarks share with the tests and the quickstart lives in ``fairseq_runs``.

Benchmarks are scripts, not tests: each prints a table and writes JSON, and every ratio is taken within one
invocation on one machine. Measurements that must not share a process (peak memory) run in worker
subprocesses of the same invocation.
"""

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # this checkout's plugin, whatever the environment's editable install points to

from fairseq_runs import Shape, checkout_env, compose, fairseq_hubert_config_dir, optimizer_overrides  # noqa: E402,F401
from fairseq_runs import stock_hubert_overrides as _stock_hubert_overrides  # noqa: E402

# hydra's notices about fairseq's config conventions (version_base 1.1, schema matched by name)
warnings.filterwarnings("ignore", module="hydra")
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema")
warnings.filterwarnings("ignore", message="(?s).*version_base")

SAMPLE_RATE = 16000
LABEL_RATE = 50


# ----- model shapes (fairseq_runs.Shape) -----


SHAPES: Dict[str, Shape] = {
    # HuBERT Base (fairseq's hubert_base_librispeech.yaml)
    "base": Shape(12, 768, 3072, 12, "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"),
    # a quarter-width Base for CPU: same depth, heads of 64, CNN of 128 channels
    "small": Shape(12, 192, 768, 3, "[(128,10,5)] + [(128,3,2)] * 4 + [(128,2,2)] * 2", 64, 8),
}


# ----- configs and trainers, as fairseq-hydra-train builds them -----


def build_trainer(cfg, load_data: bool = True):
    """(trainer, task) as ``fairseq_cli.train.main`` builds them, with the training split loaded."""
    from fairseq import tasks
    from fairseq.trainer import Trainer

    task = tasks.setup_task(cfg.task)
    if load_data:
        task.load_dataset(cfg.dataset.train_subset, combine=False, epoch=1)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task


def update_config(
    kind: str, data: str, teacher: str, shape: Shape, common: Sequence[str], extra: Sequence[str] = ()
):
    """The composed config of one kind of update on ``data``: ``stock`` (fairseq's
    ``hubert_base_librispeech.yaml`` for ``shape``) or ``dphubert`` (stage 1, ``configs/dphubert.yaml``, distilling
    ``teacher``), with the ``common`` overrides (device, batch) and, for stage 1, ``extra``."""
    if kind == "stock":
        if "common.amp=true" in common:
            # fairseq's HuBERT does not train under common.amp: autocast hands apply_mask fp16 features while
            # mask_emb stays fp32, and the index put refuses the mix; its own recipe trains in fp16
            common = [o for o in common if o.split("=")[0] not in ("common.amp", "common.fp16")]
            common += ["common.amp=false", "common.fp16=true"]
        return compose(
            fairseq_hubert_config_dir(),
            "hubert_base_librispeech",
            stock_hubert_overrides(data, shape) + list(common),
        )
    return compose(
        os.path.join(REPO, "configs"),
        "dphubert",
        [
            f"task.data={data}",
            f"task.teacher_path={teacher}",
            "task.check_audio_files=false",
            "hydra.run.dir=" + tempfile.mkdtemp(prefix="dphubert-bench-hydra-"),
            *extra,
        ]
        + list(common),
    )


def teacher_forward(trainer, task, sample, precision: str) -> Callable[[], object]:
    """The stage-1 teacher's no-grad forward on ``sample``, as the training step runs it (under AMP in CUDA
    autocast), to be timed."""
    prepared = trainer._prepare_sample(sample)[0]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    def forward():
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "amp"):
            return task.teacher_hidden_states(prepared["net_input"], dtype)

    return forward


def device_overrides(device: str, precision: str) -> List[str]:
    """One process, the given device and precision ('fp32', 'amp', 'fp16' or 'bf16')."""
    out = [
        "distributed_training.distributed_world_size=1",
        "distributed_training.nprocs_per_node=1",
        "dataset.num_workers=0",
        "dataset.required_batch_size_multiple=1",
        "common.log_interval=1000000",
        "common.fp16=" + str(precision == "fp16").lower(),
        "common.bf16=" + str(precision == "bf16").lower(),
        "common.amp=" + str(precision == "amp").lower(),
        "checkpoint.save_dir=" + tempfile.mkdtemp(prefix="dphubert-bench-ckpt-"),
    ]
    if device == "cpu":
        out.append("common.cpu=true")
    return out


def batch_overrides(batch: int, seconds: float) -> List[str]:
    samples = int(seconds * SAMPLE_RATE)
    return [
        f"dataset.max_tokens={batch * samples}",
        f"dataset.batch_size={batch}",
        f"task.max_sample_size={samples}",
        f"task.min_sample_size={samples}",
    ]


# ----- data -----


def write_audio(folder: str, count: int, seconds: float, seed: int = 0) -> str:
    """``count`` clips of exactly ``seconds`` (noise shaped like speech levels; content does not change cost),
    listed in ``train.tsv`` / ``valid.tsv``, with random 50 Hz labels ``*.km`` and ``dict.km.txt`` for stock
    HuBERT. Returns ``folder``."""
    return write_clips(folder, [seconds] * count, seed)


def write_clips(folder: str, seconds: Sequence[float], seed: int = 0) -> str:
    """``write_audio`` with one length per clip, in manifest order. Returns ``folder``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "wav"), exist_ok=True)
    lines, lengths = [], [int(s * SAMPLE_RATE) for s in seconds]
    for i, samples in enumerate(lengths):
        name = f"wav/{i}.wav"
        sf.write(
            os.path.join(folder, name), (0.1 * rng.standard_normal(samples)).astype("float32"), SAMPLE_RATE
        )
        lines.append(f"{name}\t{samples}\n")
    labels = [
        " ".join(str(v) for v in rng.integers(0, 100, samples * LABEL_RATE // SAMPLE_RATE)) + "\n"
        for samples in lengths
    ]
    for split in ("train", "valid"):
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.write(folder + "\n")
            f.writelines(lines)
        with open(os.path.join(folder, f"{split}.km"), "w") as f:
            f.writelines(labels)
    with open(os.path.join(folder, "dict.km.txt"), "w") as f:
        f.writelines(f"{i} 1\n" for i in range(100))
    return folder


def first_batch(task, split: str, batch: int):
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(batch)])


# ----- teachers -----


def stock_hubert_overrides(data: str, shape: Shape) -> List[str]:
    """Overrides of fairseq's own ``hubert_base_librispeech.yaml`` for this data (labels at 50 Hz) and shape."""
    return _stock_hubert_overrides(data, shape, LABEL_RATE, tempfile.mkdtemp(prefix="dphubert-bench-hydra-"))


def fairseq_wav2vec2_config_dir() -> str:
    """fairseq's own wav2vec 2.0 pretraining recipes (``wav2vec2_base_librispeech.yaml``), next to HuBERT's."""
    examples = os.path.dirname(os.path.dirname(os.path.dirname(fairseq_hubert_config_dir())))
    return os.path.join(examples, "wav2vec", "config", "pretraining")


def stock_wav2vec2_overrides(data: str, shape: Shape) -> List[str]:
    """Overrides of fairseq's own ``wav2vec2_base_librispeech.yaml`` for this data and shape."""
    # that recipe has some of the shape's keys and lacks others: '++' sets a key either way
    reshaped = ["++" + o.lstrip("+") for o in shape.hubert_overrides()]
    return [
        f"task.data={data}",
        "hydra.run.dir=" + tempfile.mkdtemp(prefix="dphubert-bench-hydra-"),
        *reshaped,
    ]


#: kind -> (fairseq's recipe folder, recipe name, its overrides for (data, shape))
TEACHER_RECIPES = {
    "hubert": (fairseq_hubert_config_dir, "hubert_base_librispeech", stock_hubert_overrides),
    "wav2vec2": (fairseq_wav2vec2_config_dir, "wav2vec2_base_librispeech", stock_wav2vec2_overrides),
}


def save_random_teacher(path: str, data: str, shape: Shape, seed: int = 1, kind: str = "hubert") -> str:
    """A HuBERT (``kind`` 'hubert') or wav2vec 2.0 ('wav2vec2') of ``shape`` with random weights, built from
    fairseq's own Base recipe and written by its trainer exactly as a pretraining run writes
    ``checkpoint_last.pt``."""
    config_dir, config_name, overrides = TEACHER_RECIPES[kind]
    torch.manual_seed(seed)
    cfg = compose(config_dir(), config_name, overrides(data, shape) + device_overrides("cpu", "fp32"))
    trainer, _ = build_trainer(cfg, load_data=False)
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(path, {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "val_loss": 1.0})
    return path


def random_teacher_in(work: str, shape: Shape) -> str:
    """``work/teacher.pt``: ``save_random_teacher`` of ``shape``, its label audio written under ``work``."""
    return save_random_teacher(
        os.path.join(work, "teacher.pt"), write_audio(os.path.join(work, "labels"), 1, 2.0), shape
    )


# ----- one measured update per worker -----


def trainer_on_batch(cfg, batch: int, seconds: float):
    """(trainer, task, sample): the trainer of ``cfg`` and the first training batch, checked to be ``batch``
    items of ``seconds`` each (the fixed batch every worker of a benchmark times)."""
    trainer, task = build_trainer(cfg)
    sample = first_batch(task, "train", batch)
    if sample["net_input"]["source"].shape != (batch, int(seconds * SAMPLE_RATE)):
        raise RuntimeError(f"unexpected batch {tuple(sample['net_input']['source'].shape)}")
    return trainer, task, sample


def time_updates(trainer, sample, memory: "PeakMemory", device: str, warmup: int, repeat: int):
    """(step, figures): ``trainer.train_step`` on ``sample`` timed (``time_calls``) with the peak memory of the
    timed updates (``memory``, made before any model was built); ``step`` runs one more update."""
    step = lambda: trainer.train_step([sample])  # noqa: E731
    memory.start()
    seconds = time_calls(step, device, warmup, repeat)
    return step, {"update_seconds": seconds, "peak_memory_bytes": memory.peak_bytes()}


def gathering_summary(model) -> Dict[str, object]:
    """How the gated blocks of ``model`` compute the units whose sample is 0 (``criterion.inactive_compute``):
    each kind of block's measured break-even, and how many gates leave units out at the fraction an update
    computes on average (their expected size) among the gates that could."""
    gated = [g for g in model.gates().values() if g.n > 1 and g.num_active > 0]
    with torch.no_grad():
        gathering = sum(float(g.l0_norm()) / g.n < g.gather_below for g in gated)
    return {
        "break_evens": {repr(k): v for k, v in model.break_evens().items()},
        "gates_gathering": gathering,
        "gates": len(gated),
    }


def worker_args(args, teacher: str) -> List[str]:
    """The arguments every worker of a benchmark shares: device, precision, batch, timing, the teacher and the
    thread count of the invocation ``args``."""
    shared = ["--device", args.device, "--precision", args.precision, "--batch", str(args.batch)]
    shared += ["--warmup", str(args.warmup), "--repeat", str(args.repeat), "--teacher", teacher]
    return shared + (["--threads", str(args.threads)] if args.threads else [])


# ----- meters -----


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, warmup: int, repeat: int) -> Dict[str, float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: median, mean and min of ``repeat``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times)}


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """``--warmup`` and ``--repeat`` (``time_calls``'s, per measurement) and ``--rounds`` (``round_order``,
    ``fold_round``), as the update benchmarks take them."""
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every kind this many times, interleaved (every other round backwards), and take the median of "
        "the rounds' medians",
    )


def round_order(n: int, round_: int) -> List[int]:
    """The order a benchmark's ``n`` measurements run in at round ``round_`` (``--rounds``): as planned, and
    backwards every other round, so that a machine slowing down or speeding up over a run does not favour
    the kinds measured first."""
    return list(range(n)) if round_ % 2 == 0 else list(range(n - 1, -1, -1))


def fold_round(kept: Optional[Dict], measured: Dict, keys: Sequence[str]) -> Dict:
    """One more round of a worker's result folded into ``kept`` (``None`` for the first round: ``measured``
    becomes it): each timing of ``keys`` (``time_calls``'s) keeps every round's median in ``rounds`` and its
    ``median`` becomes the median of those; everything else stays the first round's."""
    if kept is None:
        kept = measured
        for key in keys:
            kept[key]["rounds"] = []
    for key in keys:
        kept[key]["rounds"].append(measured[key]["median"])
        kept[key]["median"] = statistics.median(kept[key]["rounds"])
    return kept


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakMemory:
    """Peak memory of what runs between ``start()`` and ``peak_bytes()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (every live tensor: weights, optimizer state, activations).
    CPU: the process's resident-set high-water mark (reset through ``/proc/self/clear_refs``) less its
    resident size before any model was built (``floor``), so that it too counts every tensor the run holds
    and not the libraries. Needs one process per measurement (freed heap stays resident).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.floor = 0 if device == "cuda" else _proc_status_kib("VmRSS") * 1024

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024 - self.floor


# ----- gate states -----


def encode_active(active: torch.Tensor) -> str:
    """A gate's ``active`` set ``(n,)`` bool as a hex string of its bits (little-endian per byte)."""
    return np.packbits(active.cpu().numpy().astype(np.uint8), bitorder="little").tobytes().hex()


def decode_active(text: str, n: int) -> torch.Tensor:
    """The ``(n,)`` bool set ``encode_active`` wrote."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), bitorder="little")[:n]
    return torch.from_numpy(bits.astype(bool))


#: the step of a quantised gate logit (``encode_logits``): P(gate > 0) moves by at most 2.5% per step
LOGIT_STEP = 0.1


def encode_logits(log_alpha: torch.Tensor) -> str:
    """A gate's logits ``(n,)`` as base64 of int8 multiples of ``LOGIT_STEP`` (clamped to +-12.7, where
    P(gate > 0) is within 1e-5 of 0 or 1)."""
    steps = torch.round(log_alpha.detach().float().cpu() / LOGIT_STEP).clamp(-127, 127).to(torch.int8)
    return base64.b64encode(steps.numpy().tobytes()).decode("ascii")


def decode_logits(text: str, n: int) -> torch.Tensor:
    """The ``(n,)`` float32 logits ``encode_logits`` wrote; raises ValueError unless it holds ``n`` of them."""
    data = base64.b64decode(text.encode("ascii"), validate=True)
    if len(data) != n:
        raise ValueError(f"{len(data)} logits recorded, {n} expected")
    return torch.from_numpy(np.frombuffer(data, dtype=np.int8).astype(np.float32) * LOGIT_STEP)


# ----- workers and output -----


def run_worker(script: str, args: Sequence[str]) -> Dict:
    """Run ``script ARGS`` (a worker) in a fresh Python; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=checkout_env(), cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(script)} worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {"torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return info


def write_json(path: Optional[str], result: Dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
