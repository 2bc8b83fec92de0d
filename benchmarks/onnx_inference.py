"""ONNX inference: onnxruntime against torch on the CPU, for the teacher and the pruned student.

    python benchmarks/onnx_inference.py                            # batch 1 x 10 s, 1 and 2 threads
    python benchmarks/onnx_inference.py --seconds 2 --threads 1 --repeat 3

The teacher is a HuBERT Base built from fairseq's own recipe with random weights (``inference.py``'s), run as
its ungated ``dphubert`` copy (``student_from_teacher`` without gates: the same computation, and a model
``export_onnx`` takes); the student has the structure ``benchmarks/make_structure.py`` recorded at the paper's
parameter target 0.75 (``structures/hubert_base_sp75.json``) with random weights. Both are written with
``dphubert_fairseq/formats/onnx_export.py`` (which checks each file against torch with onnxruntime on export)
and run on the same audio with its padding mask (the student also as its int8 file, ``dphubert-export --int8``'s
``formats/onnx_int8.py``, checked against torch fp32 like the export checks it): torch fp32 under ``torch.inference_mode`` with
``torch.set_num_threads(N)``, onnxruntime's CPU provider with ``intra_op_num_threads=N`` (graph optimisations
at their default, all; idle threads not spinning, or the three sessions taking turns would take each other's
cores: on 2 cores that alone made the int8 file 1.1x slower against the fp32 one). Times are the median of ``--repeat`` forward passes after ``--warmup``, the five
(model, runtime) pairs (the student's int8 file one of them) taking turns so that drift hits all alike; every ratio is taken within this run.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from harness import (
    REPO,
    SHAPES,
    machine,
    random_teacher_in,
    table,
    write_json,
)
from inference import audio

import dphubert_fairseq as dp
from dphubert_fairseq.formats.onnx_export import cpu_session, export_onnx, probe_batch, require_onnx
from dphubert_fairseq.formats.onnx_int8 import int8_summary_line, quantize_int8
from dphubert_fairseq.models.dphubert import DPHuBERTModel, as_config

STRUCTURE = os.path.join(REPO, "benchmarks", "structures", "hubert_base_sp75.json")


def interleaved(calls: Dict[str, Callable[[], object]], warmup: int, repeat: int) -> Dict[str, float]:
    """Median seconds per call of each callable, the callables taking turns."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for i in range(warmup + repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", default=STRUCTURE, help="structure JSON from make_structure.py")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", default="benchmarks/results/onnx_inference.json")
    args = parser.parse_args()
    _, onnxruntime = require_onnx()
    work = tempfile.mkdtemp(prefix="dphubert-bench-onnx-")  # the teacher's checkpoint and both ONNX files
    try:
        return run(args, onnxruntime, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, onnxruntime, work: str) -> int:
    teacher = dp.student_from_teacher(random_teacher_in(work, SHAPES["base"]), prune_units=())
    with open(args.structure) as f:
        recorded = json.load(f)
    models: Dict[str, DPHuBERTModel] = {
        "teacher": teacher.eval(),
        "student": DPHuBERTModel(as_config(recorded["model_config"])).eval(),
    }
    exports = {}
    for name, model in models.items():
        path = os.path.join(work, f"{name}.onnx")
        report = export_onnx(model, path)
        exports[name] = {
            "path": path,
            "bytes": os.path.getsize(path),
            "check": report.summary(),
            "params": dp.count_params(model),
        }
        print(report.line())
    # the student's int8 file (dphubert-export --int8), checked against torch fp32 on the export's probe
    student = models["student"]
    int8 = quantize_int8(
        exports["student"]["path"], os.path.join(work, "student.int8.onnx"), student, probe_batch(student)
    )
    print(int8_summary_line(int8.summary()))
    exports["student int8"] = {
        "path": int8.path,
        "bytes": os.path.getsize(int8.path),
        "check": int8.summary(),
        "params": exports["student"]["params"],
    }

    source = audio(args.batch, args.seconds)
    mask = torch.zeros(source.shape, dtype=torch.bool)
    feed = {"source": source.numpy(), "padding_mask": mask.numpy()}

    timing: Dict[str, Dict[str, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        sessions = {
            name: cpu_session(onnxruntime, e["path"], threads, spinning=False) for name, e in exports.items()
        }
        calls: Dict[str, Callable[[], object]] = {}
        for name, model in models.items():
            calls[f"{name} torch"] = lambda model=model: model.hidden_states(source, mask)
            calls[f"{name} onnxruntime"] = lambda session=sessions[name]: session.run(None, feed)
        calls["student int8 onnxruntime"] = lambda session=sessions["student int8"]: session.run(None, feed)
        with torch.inference_mode():
            if threads == args.threads[0]:  # the deviation on this input, once
                for name in exports:
                    model = models[name.split()[0]]
                    got = sessions[name].run(None, feed)
                    want = model.hidden_states(source, mask)
                    exports[name]["max_abs_diff_bench_input"] = max(
                        float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)
                    )
                    exports[name]["min_cosine_bench_input"] = min(
                        float(np.sum(g * w.numpy()) / (np.linalg.norm(g) * np.linalg.norm(w.numpy())))
                        for g, w in zip(got, want)
                    )
            timing[f"{threads} thread{'s' if threads > 1 else ''}"] = interleaved(
                calls, args.warmup, args.repeat
            )

    header = ["model", "params", "ONNX MB"]
    for key in timing:
        header += [f"torch ms ({key})", f"ORT ms ({key})", "ORT/torch"]
    header += ["max abs diff", "min cosine"]
    rows = []
    for name in exports:
        row = [name, f"{exports[name]['params']:,}", f"{exports[name]['bytes'] / 2**20:.0f}"]
        for times in timing.values():
            ort_s = times[f"{name} onnxruntime"]
            if f"{name} torch" in times:
                torch_s = times[f"{name} torch"]
                row += [f"{1000 * torch_s:.0f}", f"{1000 * ort_s:.0f}", f"{ort_s / torch_s:.3f}"]
            else:  # int8: torch runs the fp32 model; its ratio is to the fp32 ONNX file's time
                row += ["", f"{1000 * ort_s:.0f}", ""]
        row += [
            f"{exports[name]['max_abs_diff_bench_input']:.1e}",
            f"{exports[name]['min_cosine_bench_input']:.4f}",
        ]
        rows.append(row)
    ratio = ["student/teacher", f"{exports['student']['params'] / exports['teacher']['params']:.3f}", ""]
    for times in timing.values():
        ratio += [
            f"{times['student torch'] / times['teacher torch']:.3f}",
            f"{times['student onnxruntime'] / times['teacher onnxruntime']:.3f}",
            "",
        ]
    rows.append(ratio + ["", ""])
    int8_ratio = [
        "student int8/fp32",
        "",
        f"{exports['student int8']['bytes'] / exports['student']['bytes']:.2f}",
    ]
    for times in timing.values():
        int8_ratio += ["", f"{times['student int8 onnxruntime'] / times['student onnxruntime']:.3f}", ""]
    rows.append(int8_ratio + ["", ""])
    print(f"\nCPU fp32, batch {args.batch} x {args.seconds:g} s, median of {args.repeat}")
    print(table(rows, header))
    print(
        "ORT/torch: onnxruntime's time over torch's for the same model; max abs diff, min cosine: "
        "onnxruntime against torch fp32 over every hidden state on this input; student int8/fp32: the int8 "
        "file's size and onnxruntime time over the fp32 file's"
    )
    write_json(
        args.json,
        {
            "machine": {**machine(), "onnxruntime": onnxruntime.__version__},
            "batch": args.batch,
            "seconds": args.seconds,
            "structure": recorded["produced_by"],
            "models": {name: {k: v for k, v in e.items() if k != "path"} for name, e in exports.items()},
            "seconds_per_forward": timing,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
