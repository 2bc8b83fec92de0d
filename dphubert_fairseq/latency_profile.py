"""``dphubert-profile``: time a teacher's blocks on this device and fit the latency table that
``criterion.target_metric=latency`` trains against (``latency.py``).

    dphubert-profile --teacher hubert_base_ls960.pt --device cpu --threads 1 --seconds 10 --out cost.json
    dphubert-profile --teacher hubert_base_ls960.pt --device cuda --batch 8 --dtype float16 --out gpu.json
    dphubert-profile --table cost.json --report pruned.pt [other.pt ...]

The teacher itself and ``--variants - 1`` architectures of its shape with other sizes (conv channels, heads
and FFN units drawn per layer, seeded) are built with random weights and run on one utterance of
``--seconds`` (``--batch`` copies of it, in ``--dtype``: by default one, in fp32; inference mode), in turns
with the teacher checkpoint's own model; forward
hooks time every conv block, the feature projection, every attention and every FFN (the median of
``--repeat`` rounds after one warm-up round). Each block kind's costs
are fitted to its (size, seconds) points, with every coefficient >= 0; what no hook covers (positional
convolution, LayerNorms between blocks) is one constant. The fit's largest relative error on the measured
totals is printed and kept in the table. ``--report`` prints what a table predicts per block kind for
exported models, which says where their time goes.
"""

import argparse
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoint_io import load_model
from .conv_spec import format_conv_layers, parse_conv_layers, receptive_field
from .latency import DTYPES, LatencyTable, Measurement, block_report, fit_table, load_table
from .models.dphubert import DPHuBERTConfig, DPHuBERTModel, as_config
from .param_count import static_sizes
from .teacher import load_teacher_and_config, teacher_hidden_states

#: The smallest fraction of the teacher's conv channels and FFN units a profiled variant draws.
SMALLEST = 0.125
#: The fewest architectures a table is fitted on (the teacher's included).
MIN_VARIANTS = 4


def _drawn(rng: np.random.Generator, full: int, zero: bool = False) -> int:
    """A size between ``SMALLEST * full`` and ``full``, any integer (not multiples of 64: a pruned model's
    sizes are not, and on a CPU odd channel counts cost more per MAC than aligned ones); 0 one time in nine
    when ``zero``."""
    if zero and rng.random() < 1 / 9:
        return 0
    return int(rng.integers(max(1, round(SMALLEST * full)), full + 1))


def variant_configs(teacher_cfg: DPHuBERTConfig, count: int, seed: int = 0) -> List[DPHuBERTConfig]:
    """The teacher's architecture (ungated) and ``count - 1`` others of its shape: per layer, conv channels,
    heads and FFN units drawn (``_drawn``; heads from 0 to the teacher's), a reproducible draw."""
    base = dataclasses.replace(teacher_cfg, prune_units=[])
    configs = [base]
    rng = np.random.default_rng(seed)
    conv = parse_conv_layers(teacher_cfg.conv_feature_layers)
    for _ in range(count - 1):
        layers = []
        for i, (channels, kernel, stride) in enumerate(conv):
            fixed = i == len(conv) - 1 and not teacher_cfg.post_extract_proj  # the encoder's width
            kept = channels if fixed else _drawn(rng, channels)
            layers.append((kept, kernel, stride))
        configs.append(
            dataclasses.replace(
                base,
                conv_feature_layers=format_conv_layers(layers),
                encoder_attention_heads=[
                    int(rng.integers(0, h + 1)) for h in teacher_cfg.encoder_attention_heads
                ],
                encoder_ffn_embed_dims=[
                    _drawn(rng, f, zero=True) for f in teacher_cfg.encoder_ffn_embed_dims
                ],
            )
        )
    return configs


class BlockTimer:
    """Wall-clock seconds of named modules' forward calls (forward pre- and post-hooks), summed per name;
    nothing is timed (or synchronised) while ``enabled`` is False."""

    def __init__(self, modules: Dict[str, nn.Module], sync: Callable[[], None]) -> None:
        self.sync = sync
        self.enabled = True
        self.seconds: Dict[str, float] = {name: 0.0 for name in modules}
        self._started: Dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, name: str):
        def hook(module, args):
            if self.enabled:
                self.sync()
                self._started[name] = time.perf_counter()

        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            if self.enabled:
                self.sync()
                self.seconds[name] += time.perf_counter() - self._started.pop(name)

        return hook

    def reset(self) -> None:
        self.seconds = {name: 0.0 for name in self.seconds}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def timed_modules(model: DPHuBERTModel) -> Dict[str, nn.Module]:
    """The modules a measurement times, named ``conv.i``, ``projection.norm``, ``projection.linear``,
    ``attention.i``, ``ffn.i`` (blocks a layer does not have are left out)."""
    modules: Dict[str, nn.Module] = {f"conv.{i}": b for i, b in enumerate(model.feature_extractor.blocks)}
    modules["projection.norm"] = model.layer_norm
    if model.post_extract_proj is not None:
        modules["projection.linear"] = model.post_extract_proj
    for i, layer in enumerate(model.encoder.layers):
        if layer.self_attn is not None:
            modules[f"attention.{i}"] = layer.self_attn
        if layer.ffn is not None:
            modules[f"ffn.{i}"] = layer.ffn
    return modules


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@torch.inference_mode()
def measure(
    configs: Sequence[DPHuBERTConfig],
    device: torch.device,
    seconds: float,
    repeat: int,
    teacher: Optional[nn.Module] = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tuple[List[Measurement], Optional[float]]:
    """Time architectures (random weights, in ``dtype``) on ``batch`` utterances of ``seconds`` of noise
    (``(batch, samples)``): per-block and total
    medians of ``repeat`` rounds after a warm-up round, every model run once per round, in turns, so that a
    drift of the machine's speed hits all alike (a table is read as ratios); with the ``teacher`` checkpoint's
    own model among them (``teacher_hidden_states``, as the benchmarks time it), its median seconds too. On a
    GPU, where timing a block means waiting for it (which a forward pass otherwise does not), each
    architecture's total comes from a second pass without the blocks timed, as the teacher's is taken."""
    torch.manual_seed(0)
    models = [DPHuBERTModel(cfg).eval().to(device, dtype) for cfg in configs]
    if teacher is not None:
        teacher = teacher.eval().to(device, dtype)
    samples = int(round(seconds * configs[0].sample_rate))
    source = torch.randn(batch, samples, device=device).to(dtype)
    sync = synchronizer(device)
    timers = [BlockTimer(timed_modules(model), sync) for model in models]
    runs: List[List[Dict[str, float]]] = [[] for _ in models]
    teacher_times: List[float] = []
    for round_ in range(repeat + 1):
        for model, timer, model_runs in zip(models, timers, runs):
            timer.reset()
            sync()
            start = time.perf_counter()
            model(source)
            sync()
            total = time.perf_counter() - start
            if device.type == "cuda":
                timer.enabled = False
                start = time.perf_counter()
                model(source)
                sync()
                total = time.perf_counter() - start
                timer.enabled = True
            if round_:
                model_runs.append({**timer.seconds, "total": total})
        if teacher is not None:
            sync()
            start = time.perf_counter()
            teacher_hidden_states(teacher, source)
            sync()
            if round_:
                teacher_times.append(time.perf_counter() - start)
    for timer in timers:
        timer.remove()
    measurements = []
    for cfg, model, model_runs in zip(configs, models, runs):
        median = {name: statistics.median(run[name] for run in model_runs) for name in model_runs[0]}
        layers = cfg.encoder_layers
        measurements.append(
            Measurement(
                cfg=cfg,
                conv=[median[f"conv.{i}"] for i in range(len(model.feature_extractor.blocks))],
                projection=median["projection.norm"] + median.get("projection.linear", 0.0),
                attention=[median.get(f"attention.{i}", 0.0) for i in range(layers)],
                ffn=[median.get(f"ffn.{i}", 0.0) for i in range(layers)],
                total=median["total"],
            )
        )
    return measurements, statistics.median(teacher_times) if teacher_times else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile(
    teacher_cfg: DPHuBERTConfig,
    teacher: Optional[nn.Module] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    seconds: float = 10.0,
    variants: int = 8,
    repeat: int = 5,
    log: Callable[[str], None] = print,
    batch: int = 1,
    dtype: str = "float32",
) -> LatencyTable:
    """Measure ``variants`` architectures of the teacher's shape on ``device``, on batches of ``batch``
    utterances in ``dtype`` (``DTYPES``), and fit their table; with the ``teacher`` model itself, its own time
    becomes the table's denominator."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    if repeat < 1:
        raise ValueError(f"--repeat {repeat}: at least one timed pass is needed")
    if batch < 1:
        raise ValueError(f"--batch {batch}: at least one utterance per pass is needed")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if variants < MIN_VARIANTS:
        raise ValueError(
            f"--variants {variants}: at least {MIN_VARIANTS} architectures are needed (a conv block's costs "
            "have three coefficients, fitted on one point per architecture)"
        )
    shortest = receptive_field(teacher_cfg.conv_feature_layers) / teacher_cfg.sample_rate
    if seconds < shortest:
        raise ValueError(f"--seconds {seconds:g}: shorter than the CNN's receptive field ({shortest:.4f} s)")
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    log(
        f"timing {variants} architectures of the teacher's shape{' and the teacher' if teacher else ''}, in turns,"
        f" on {batch} x {seconds:g} s in {dtype}"
    )
    measurements, measured = measure(
        variant_configs(teacher_cfg, variants), dev, seconds, repeat, teacher, batch, getattr(torch, dtype)
    )
    for i, m in enumerate(measurements):
        log(
            f"architecture {i + 1}/{variants}: {m.total:.4f} s" + (" (the teacher's shape)" if i == 0 else "")
        )
    if measured is not None:
        log(f"the teacher checkpoint's own model: {measured:.4f} s")
    return fit_table(
        teacher_cfg,
        measurements,
        device=device,
        threads=torch.get_num_threads() if dev.type == "cpu" else 0,
        seconds=seconds,
        teacher_measured=measured,
        batch=batch,
        dtype=dtype,
        device_name=device_name(dev),
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        repeat=repeat,
        dphubert_teacher_seconds=measurements[0].total,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dphubert-profile",
        description="Time a teacher's blocks on this device and fit the latency table that "
        "criterion.target_metric=latency trains against (criterion.latency_table=OUT); or, with --table and "
        "--report, print what a table predicts per block kind for exported models.",
    )
    parser.add_argument("--teacher", help="the teacher checkpoint whose shape is profiled")
    parser.add_argument("--out", help="where to write the table (JSON)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=10.0,
        help="length of the timed utterance (default 10, as MACs count)",
    )
    parser.add_argument(
        "--variants",
        type=int,
        default=8,
        help=f"architectures timed, the teacher included (default 8, at least {MIN_VARIANTS})",
    )
    parser.add_argument(
        "--batch", type=int, default=1, help="utterances per timed forward pass (default 1), as you deploy"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="the weights' and inputs' dtype (default float32; float16 or bfloat16 as you deploy, e.g. on a GPU)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed passes per architecture (median)")
    parser.add_argument("--table", help="a table written by this command, for --report")
    parser.add_argument(
        "--report", nargs="+", default=[], metavar="MODEL", help="exported models to report on"
    )
    return parser


def _report(table_path: str, models: Sequence[str]) -> str:
    table = load_table(table_path, where="--table")
    rows = {}
    for path in models:
        cfg = as_config(load_model(path).cfg)
        table.check_shape(cfg, f"--table {table_path}: {path}", pruned=True)
        rows[path] = (cfg, None)
    header = (
        f"predicted seconds per block kind ({table.device}, {table.threads} thread(s), {table.batch} x "
        f"{table.seconds:g} s of audio in {table.dtype}; the teacher: {table.teacher_seconds():.4f} s)"
    )
    lines = [header, block_report(table, rows)]
    for path, (cfg, _) in rows.items():
        ratio = float(table.predict(cfg, static_sizes(cfg))) / table.teacher_seconds()
        lines.append(f"{path}: {ratio:.3f} of the teacher's time (latency sparsity {1 - ratio:.4f})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.report:
            if not args.table:
                raise ValueError("--report needs --table (a table written by dphubert-profile --out)")
            print(_report(args.table, args.report))
            return 0
        if not args.teacher or not args.out:
            raise ValueError("give --teacher and --out to profile, or --table and --report to report")
        teacher, teacher_cfg = load_teacher_and_config(args.teacher)
        options = ("device", "threads", "seconds", "variants", "repeat", "batch", "dtype")
        table = profile(teacher_cfg, teacher, **{name: getattr(args, name) for name in options})
        table.save(args.out)
    except ValueError as err:  # every DPHuBERTError is one
        print(f"dphubert-profile: error: {err}", file=sys.stderr)
        return 2
    error = table.provenance["max_rel_error"]
    print(block_report(table, {"teacher": (teacher_cfg, table.provenance["dphubert_teacher_seconds"])}))
    print(
        f"the teacher checkpoint's own model: {table.teacher_seconds():.4f} s (the latency sparsities' denominator)"
    )
    print(f"fit: largest relative error on the {args.variants} timed architectures {error:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # python -m imports the package first: patches and registrations are in place
    sys.exit(main())
