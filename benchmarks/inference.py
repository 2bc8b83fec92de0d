"""Inference: the exported model against its teacher on the same audio, next to their parameter and MAC ratios.

    python benchmarks/inference.py                               # CPU, batch 1 x 10 s, 1 and 2 threads
    python benchmarks/inference.py --device cuda                 # GPU, batch 8 x 10 s, fp16
    python benchmarks/inference.py --teacher T.pt --model M.pt   # your own teacher and exported model
    python benchmarks/inference.py --latency-table cost.json     # + what a dphubert-profile table predicts

Without ``--model`` the exported architectures are the ones ``benchmarks/make_structure.py`` produced by actual
stage-1 runs on a HuBERT Base-shaped teacher (``benchmarks/structures/``, with how each was made and its curves):
``sp75`` at parameter target 0.75 (the paper's), ``macs61`` at MACs target 0.61 (``criterion.target_metric=macs``:
the paper's student costs 0.39 of its teacher's compute, the CNN's gates started as ``configs/compute/macs.yaml``
does), ``latency60`` at latency target 0.60 (``criterion.target_metric=latency`` against a ``dphubert-profile``
table of this CPU at 1 thread, ``structures/cpu_1thread_latency_table.json``); random weights; the teacher is a HuBERT Base built
from fairseq's own recipe. The rows ``rounded hXfY`` are the first structure exported with ``--round-heads X
--round-ffn Y`` (kept heads and FFN
units rounded up to multiples; the extra units are zero, so the output is unchanged). Times are the median of
``--repeat`` forward passes under ``torch.inference_mode``, teacher and students interleaved; MACs are counted
analytically (``dphubert_fairseq/macs.py``).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
from harness import (
    REPO,
    SHAPES,
    machine,
    random_teacher_in,
    synchronize,
    table,
    write_json,
)

import dphubert_fairseq as dp
from dphubert_fairseq.latency import block_report, load_table
from dphubert_fairseq.macs import count_macs
from dphubert_fairseq.models.dphubert import DPHuBERTModel, as_config
from dphubert_fairseq.param_count import static_sizes
from dphubert_fairseq.pruning import rounded_config
from dphubert_fairseq.teacher import config_from_fairseq

STRUCTURES = [
    os.path.join(REPO, "benchmarks", "structures", name)
    # params target 0.75; MACs target 0.61; latency target 0.60 (a table of this CPU at 1 thread)
    for name in ("hubert_base_sp75.json", "hubert_base_macs61.json", "hubert_base_latency60.json")
]


def audio(batch: int, seconds: float) -> torch.Tensor:
    from fairseq_runs.speech import SAMPLE_RATE, generated_audio, read_speech_clips

    clips = read_speech_clips() or generated_audio(seconds * batch)
    speech = np.concatenate(clips)
    samples = int(seconds * SAMPLE_RATE)
    speech = np.tile(speech, 1 + batch * samples // len(speech))[: batch * samples]
    return torch.from_numpy(speech.reshape(batch, samples).copy())


def interleaved_times(models: Dict[str, torch.nn.Module], source, device, warmup, repeat) -> Dict[str, float]:
    """Median seconds per forward of each model, the models taking turns so that drift hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i in range(warmup + repeat):
            for name, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                dp.teacher_hidden_states(model, source)
                synchronize(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_report(
    path: str, models, teacher_cfg, timing, batch: int, seconds: float, dtype: torch.dtype
) -> Dict[str, float]:
    """Print what the table at ``path`` predicts per block kind for every model and, at the table's thread
    count (on the GPU for a GPU's table), the predicted against the measured fraction of the teacher's time;
    returns the predicted seconds."""
    table = load_table(path, where="--latency-table")
    gpu = table.device.startswith("cuda")
    key = "gpu" if gpu else f"{table.threads} thread{'s' if table.threads > 1 else ''}"
    measured = timing.get(key, {})
    print(f"\n{path}: timed on {table.device}, {table.batch} x {table.seconds:g} s in {table.dtype}")
    if (table.batch, table.seconds, getattr(torch, table.dtype)) != (batch, seconds, dtype):
        run = f"{batch} x {seconds:g} s in {str(dtype).removeprefix('torch.')}"
        print(f"  this run: {run}; the table was made for other inputs")
    configs = {name: teacher_cfg if name == "teacher" else as_config(m.cfg) for name, m in models.items()}
    print(f"{path}: predicted seconds per block kind; measured at {key}" if measured else "")
    print(block_report(table, {name: (cfg, measured.get(name)) for name, cfg in configs.items()}))
    predicted = {name: float(table.predict(cfg, static_sizes(cfg))) for name, cfg in configs.items()}
    for name in models:
        if name != "teacher" and measured:
            print(
                f"{name}: predicted {predicted[name] / table.teacher_seconds():.3f} of the teacher's time, "
                f"measured {measured[name] / measured['teacher']:.3f}"
            )
    return predicted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--teacher", help="a native fairseq HuBERT / wav2vec2 checkpoint (default: random Base)"
    )
    parser.add_argument("--model", help="an exported dphubert checkpoint (default: the recorded structure)")
    parser.add_argument(
        "--structure",
        nargs="+",
        default=[path for path in STRUCTURES if os.path.exists(path)],
        help="structure JSONs from make_structure.py (default: the params-target and the MACs-target one)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rounding", nargs="*", default=["2:64", "4:128"], help="HEADS:FFN multiples to compare"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/results/inference.json")
    parser.add_argument(
        "--latency-table",
        help="a dphubert-profile table: also print what it predicts per block kind for every model, next to "
        "the measured time at its thread count",
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    batch = args.batch or (8 if gpu else 1)

    if args.teacher:
        teacher = dp.load_teacher(args.teacher)
    else:
        work = tempfile.mkdtemp(prefix="dphubert-bench-")
        teacher = dp.load_teacher(random_teacher_in(work, SHAPES["base"]))
    teacher_cfg = config_from_fairseq(teacher)
    models = {"teacher": teacher.eval()}
    provenance = {}
    if args.model:
        exported = dp.load_model(args.model)
        models["exported"] = exported.eval()
        provenance["exported"] = {"model": os.path.abspath(args.model)}
    else:
        for path in args.structure:
            with open(path) as f:
                recorded = json.load(f)
            name = "exported " + os.path.splitext(os.path.basename(path))[0].replace("hubert_base_", "")
            models[name] = DPHuBERTModel(as_config(recorded["model_config"])).eval()
            provenance[name] = recorded["produced_by"]
        exported = models[next(name for name in models if name.startswith("exported"))]
    for spec in args.rounding:
        heads, ffn = (int(v) for v in spec.split(":"))
        cfg = rounded_config(
            exported.cfg,
            heads,
            ffn,
            max(teacher_cfg.encoder_attention_heads),
            max(teacher_cfg.encoder_ffn_embed_dims),
        )
        models[f"rounded h{heads}f{ffn}"] = DPHuBERTModel(cfg).eval()

    source = audio(batch, args.seconds)
    dtype = torch.float16 if gpu else torch.float32
    for model in models.values():
        model.to(device=args.device, dtype=dtype)
    source = source.to(device=args.device, dtype=dtype)

    teacher_params = dp.count_params(teacher)
    teacher_macs = count_macs(teacher_cfg, source.size(1)).total
    info = {}
    for name, model in models.items():
        cfg = teacher_cfg if name == "teacher" else model.cfg
        info[name] = {
            "params": dp.count_params(model),
            "macs_per_item": count_macs(cfg, source.size(1)).as_dict(),
        }
        info[name]["param_ratio"] = info[name]["params"] / teacher_params
        info[name]["macs_ratio"] = info[name]["macs_per_item"]["total"] / teacher_macs

    settings = [None] if gpu else args.threads
    timing = {}
    for threads in settings:
        if threads:
            torch.set_num_threads(threads)
        key = "gpu" if gpu else f"{threads} thread{'s' if threads > 1 else ''}"
        timing[key] = interleaved_times(models, source, args.device, args.warmup, args.repeat)

    header = ["model", "params", "param ratio", "GMACs", "MACs ratio"]
    for key in timing:
        header += [f"ms ({key})", "time ratio", "time/MACs"]
    rows = []
    for name in models:
        row = [
            name,
            f"{info[name]['params']:,}",
            f"{info[name]['param_ratio']:.3f}",
            f"{batch * info[name]['macs_per_item']['total'] / 1e9:.1f}",
            f"{info[name]['macs_ratio']:.3f}",
        ]
        for key, times in timing.items():
            ratio = times[name] / times["teacher"]
            row += [f"{1000 * times[name]:.0f}", f"{ratio:.3f}", f"{ratio / info[name]['macs_ratio']:.2f}"]
        rows.append(row)
    where = "GPU fp16" if gpu else "CPU fp32"
    print(f"\n{where}, batch {batch} x {args.seconds:g} s, median of {args.repeat}")
    print(table(rows, header))
    print("time/MACs: the time ratio over the MACs ratio (1.00 = the speed-up the MAC count promises)")
    predicted = (
        latency_report(args.latency_table, models, teacher_cfg, timing, batch, args.seconds, dtype)
        if args.latency_table
        else None
    )
    write_json(
        args.json,
        {
            "machine": machine(),
            "batch": batch,
            "seconds": args.seconds,
            "structure": provenance,
            "models": info,
            "seconds_per_forward": timing,
            "latency_table": None
            if predicted is None
            else {"path": args.latency_table, "predicted": predicted},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
