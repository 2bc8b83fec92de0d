"""``python -m examples.comparison [--out OUT] [--size default|full|long|tiny] [--jobs N] [--kinds KIND ...]
[--seeds N] [--report-only]`` (or ``bash examples/comparison.sh [OUT] [OPTIONS]``):
DPHuBERT against the baselines it claims to beat, all at one parameter count, on the same audio and updates,
measured on held-out audio; a table (Markdown + JSON) and a figure in OUT (default ./dphubert_comparison).

Phases: speech (espeak-ng sentences and the LibriVox clips), k-means labels, a small HuBERT teacher pretrained
by stock fairseq (cached in OUT/teacher: a second run with the same size skips it), the students (every seed,
``--jobs`` fairseq runs at a time), the measures, the report.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from typing import Dict, List, Sequence

import numpy as np
import torch

from fairseq_runs import (
    CONFIGS,
    REPO,
    composite_schedule,
    export_command,
    hubert_pretraining_command,
    hydra_train_command,
    optimizer_overrides,
    records,
    run_length,
    short_utterance_overrides,
)
from fairseq_runs.kmeans_labels import LABEL_RATE, label_prior, write_kmeans_labels
from fairseq_runs.phased_run import PhasedRun, exit_code
from fairseq_runs.speech import SAMPLE_RATE, write_manifests

from . import corpus as speech
from . import ctc_probe, measures, phonemes, structure, students
from .plan import (
    AS_STAGE2_OF,
    FROM_DPHUBERT_STRUCTURE,
    KINDS,
    LABEL_CLUSTERS,
    LITTLE_DATA_KINDS,
    OPTIMIZER,
    PROPORTIONS,
    SIZES,
    STAGE1_COMMON,
    STAGE1_OVERRIDES,
    TARGET_LAYERS,
    TEACHER,
    TEACHER_OVERRIDES,
    Schedule,
    Size,
)
from .report import write_report


def git_commit() -> str:
    """This checkout's commit, with '+changes' when the work tree differs from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


class Comparison(PhasedRun):
    """The six phases; ``jobs`` fairseq runs at a time in the students' phase."""

    def __init__(self, out: str, size: Size, jobs: int, command: str, kinds: Sequence[str] = KINDS) -> None:
        super().__init__(out, phases=6)
        self.size, self.jobs, self.command = size, jobs, command
        self.kinds = [kind for kind in KINDS if kind in kinds]
        self.commit = git_commit()  # the code that runs, taken before anything else can change

    def run_quietly(self, cmd: List[str], log: str, name: str = "", parallel: bool = True) -> str:
        """``logged`` with only validation records shown, prefixed with ``name``. ``parallel``: it runs next to
        others (one thread each when ``--jobs`` > 1)."""
        one_thread = parallel and self.jobs > 1
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if one_thread else None

        def show(line: str) -> None:
            if "[valid]" in line or not name:
                self.say(f"    {name}{': ' if name else ''}{line.strip()}")

        return self.logged(cmd, log, show=show, env=env)

    # ----- data and teacher -----

    def speech_and_teacher(self):
        size = self.size
        self.begin("speech: espeak-ng sentences, held-out sentences and keywords, LibriVox clips")
        corpus = speech.make_corpus(size.train_sentences, size.held_out_sentences, renditions=size.renditions)
        self.say("    " + corpus.description)
        key = size.teacher_key(corpus.description)
        cache = self.path("teacher.json")
        cached = json.load(open(cache)) if os.path.exists(cache) else None
        teacher = self.path("teacher", "checkpoint_last.pt")
        needed = [teacher] + [
            self.path(d, f"{s}.tsv") for d in ("data", "data_10pct") for s in ("train", "valid")
        ]
        if cached and cached["key"] == key and all(os.path.exists(p) for p in needed):
            self.begin("labels: cached with the teacher")
            self.begin(f"teacher: cached ({os.path.relpath(teacher)}, {json.dumps(key['shape'])})")
            return corpus, teacher, cached["quality"]
        data = self.path("data")
        n_valid = len(corpus.valid)
        write_manifests(
            corpus.train + corpus.valid, data, valid_fraction=n_valid / (len(corpus.train) + n_valid)
        )
        self.write_little_data(data)
        self.begin("labels: k-means of MFCC features (HuBERT's first iteration)")
        write_kmeans_labels(data, clusters=LABEL_CLUSTERS)
        self.begin(
            f"teacher: pretraining a {TEACHER.layers}-layer HuBERT with stock fairseq ({size.teacher_updates} updates)"
        )
        extra = short_utterance_overrides(size.max_tokens) + [
            "common.log_interval=100",
            f"optimization.lr=[{size.teacher_lr}]",
            f"lr_scheduler.warmup_updates={max(1, size.teacher_updates // 10)}",
            f"dataset.validate_interval_updates={max(1, size.teacher_updates // 3)}",
            "dataset.validate_interval=1000",
            *TEACHER_OVERRIDES,
        ]
        shutil.rmtree(self.path("teacher"), ignore_errors=True)  # fairseq would resume a stale checkpoint
        output = self.run_quietly(
            hubert_pretraining_command(
                data, self.path("teacher"), TEACHER, LABEL_RATE, size.teacher_updates, extra
            ),
            "teacher.log",
            parallel=False,
        )
        quality = measures.teacher_quality(records(output, "valid")[-1], label_prior(data))
        self.say(
            f"    teacher: {quality['loss_bits']:.3f} bits per frame (masked {quality['masked_bits']:.3f}), "
            f"label prior {quality['prior_bits']:.3f} bits"
        )
        with open(cache, "w") as f:
            json.dump({"key": key, "quality": quality}, f, indent=2)
        return corpus, teacher, quality

    def write_little_data(self, data: str) -> None:
        """``OUT/data_10pct``: a random tenth of the training utterances (the same files), the same valid set."""
        little = self.path("data_10pct")
        os.makedirs(little, exist_ok=True)
        with open(os.path.join(data, "train.tsv")) as f:
            root, *lines = f.read().splitlines()
        keep = max(2, round(self.size.little_fraction * len(lines)))
        chosen = sorted(np.random.default_rng(0).choice(len(lines), keep, replace=False))
        with open(os.path.join(little, "train.tsv"), "w") as f:
            f.write("\n".join([root] + [lines[i] for i in chosen]) + "\n")
        with open(os.path.join(data, "valid.tsv")) as src, open(
            os.path.join(little, "valid.tsv"), "w"
        ) as dst:
            dst.write(src.read())

    # ----- students -----

    def distil(
        self, name: str, config: str, card: List[str], updates: int, extra: List[str], seed: int
    ) -> str:
        """One fairseq run of ``configs/<config>.yaml`` of ``updates`` updates into a fresh ``OUT/runs/<name>``
        (fairseq would resume a checkpoint left there by an earlier comparison); its output. Its learning-rate
        decay ends at its last update (the configs' ``total_num_update`` follows ``optimization.max_update``)."""
        shutil.rmtree(self.path("runs", name), ignore_errors=True)
        overrides = [
            *card,
            f"checkpoint.save_dir={self.path('runs', name)}",
            *short_utterance_overrides(self.size.max_tokens),
            *run_length(updates, max(1, updates // 10)),
            f"common.seed={seed}",
            "common.tensorboard_logdir=null",
            *optimizer_overrides(config, OPTIMIZER),
            *extra,
        ]
        return self.run_quietly(hydra_train_command(CONFIGS, config, overrides), f"{name}.log", name)

    def export(self, name: str, out: str) -> Dict[str, object]:
        """``dphubert-export`` of run ``name`` to ``out``; its summary (sizes, exactness)."""
        summary = out[: -len(".pt")] + ".json"
        checkpoint = self.path("runs", name, "checkpoint_last.pt")
        self.run_quietly(export_command(checkpoint, out, summary), f"{name}.export.log")
        with open(summary) as f:
            return json.load(f)

    def dphubert(
        self,
        name: str,
        data: str,
        teacher: str,
        seed: int,
        schedule: Schedule,
        stage1_extra: Sequence[str] = (),
    ) -> Dict[str, object]:
        """Stage 1 (target sparsity; ``stage1_extra``: more overrides), export, stage 2, export, as ``schedule``
        splits the updates; what the stage-1 gates kept (``structure.seed_record``, from its training
        checkpoint, which stays in OUT/runs)."""
        size = self.size
        card = [f"task.data={data}", f"task.teacher_path={teacher}"]
        stage1 = self.distil(
            f"{name}_stage1",
            "dphubert",
            card,
            schedule.stage1,
            [
                f"criterion.target_sparsity={size.target_sparsity}",
                f"criterion.sparsity_warmup_updates={schedule.ramp}",
                *composite_schedule(size.lrs, schedule.stage1_warmup),
                *STAGE1_COMMON,
                *stage1_extra,
            ],
            seed,
        )
        pruned = self.path("models", f"{name}_stage1.pt")
        exported = self.export(f"{name}_stage1", pruned)
        kept = structure.seed_record(self.path("runs", f"{name}_stage1", "checkpoint_last.pt"), pruned)
        self.distil(
            f"{name}_stage2",
            "dphubert_final",
            card + [f"task.student_path={pruned}"],
            schedule.stage2,
            [
                f"optimization.lr=[{size.lrs['default'] / 2}]",
                f"lr_scheduler.warmup_updates={schedule.stage2_warmup}",
            ],
            seed,
        )
        model = self.path("models", f"{name}.pt")
        self.export(f"{name}_stage2", model)
        logged = records(stage1, "train_inner")
        last = logged[-1] if logged else {}
        gates = {
            key: float(last[key])
            for key in ("expected_sparsity", "eval_sparsity", "projection_offset")
            if key in last
        }
        return {
            "model": model,
            "structure": pruned,
            "stage1_structure": kept,
            # how stage 1 ended: the gates as its last logged update saw them (before that update's landing
            # step), the sparsity its export kept and how exactly the export reproduces the gated model
            "stage1_end": {
                **gates,
                "export_sparsity": exported["sparsity"],
                "export_max_abs_deviation": exported["max_abs_deviation"],
            },
        }

    def baseline(
        self,
        name: str,
        data: str,
        teacher: str,
        student: str,
        seed: int,
        prediction_heads: bool,
        kind: str = "",
    ) -> Dict[str, object]:
        """Distil a built student (``students``) for as many updates as DPHuBERT's two stages together; a kind
        of ``AS_STAGE2_OF``: as that DPHuBERT kind's stage 2 (its updates, warm-up and learning rate)."""
        size = self.size
        schedule, lr = size.schedule("uniform"), size.lrs["default"]  # every baseline's
        if kind in AS_STAGE2_OF:
            schedule, lr = size.schedule(AS_STAGE2_OF[kind]), lr / 2
        layers = (
            ",".join(map(str, TARGET_LAYERS))
            if prediction_heads
            else "0;" + ",".join(map(str, TARGET_LAYERS))
        )
        self.distil(
            name,
            "dphubert_final",
            [f"task.data={data}", f"task.teacher_path={teacher}", f"task.student_path={student}"],
            schedule.stage2,
            [
                f"optimization.lr=[{lr}]",
                f"lr_scheduler.warmup_updates={schedule.stage2_warmup}",
                f'criterion.distill_layers="{layers}"',
                f"criterion.prediction_heads={str(prediction_heads).lower()}",
                # DistilHuBERT's own heads (linear, GELU, linear), the paper's baseline
                f"criterion.prediction_head={'distilhubert' if prediction_heads else 'linear'}",
            ],
            seed,
        )
        model = self.path("models", f"{name}.pt")
        self.export(name, model)
        return {"model": model}

    def train_students(self, teacher_path: str) -> List[Dict[str, object]]:
        from dphubert_fairseq import count_params, load_model, load_teacher, save_model

        size = self.size
        data, little = self.path("data"), self.path("data_10pct")
        os.makedirs(self.path("models"), exist_ok=True)
        teacher = students.teacher_as_student(load_teacher(teacher_path))
        target = round((1 - size.target_sparsity) * count_params(teacher))
        built = {
            "distilhubert": save_model(
                students.distilhubert_student(teacher, target), self.path("models", "distilhubert_init.pt")
            ),
            "uniform": save_model(
                students.uniform_student(teacher, target), self.path("models", "uniform_init.pt")
            ),
        }

        def dphubert(kind: str):
            """A DPHuBERT kind's run: its data, schedule and stage-1 overrides (``plan``)."""
            source = little if kind in LITTLE_DATA_KINDS else data
            extra = list(STAGE1_OVERRIDES.get(kind, ()))
            return lambda n, s: self.dphubert(n, source, teacher_path, s, size.schedule(kind), extra)

        runs = {
            **{kind: dphubert(kind) for kind in PROPORTIONS},
            "distilhubert": lambda n, s: self.baseline(n, data, teacher_path, built["distilhubert"], s, True),
            "uniform": lambda n, s: self.baseline(n, data, teacher_path, built["uniform"], s, False),
            "distilhubert_10pct": lambda n, s: self.baseline(
                n, little, teacher_path, built["distilhubert"], s, True
            ),
        }
        seeds = range(1, size.seeds + 1)
        # DPHuBERT first: every DPHuBERT run starts before any random_structure run, which waits for it
        jobs = [
            {"kind": kind, "seed": seed, "run": runs[kind]}
            for group in (tuple(PROPORTIONS), ("distilhubert", "uniform", "distilhubert_10pct"))
            for seed in seeds
            for kind in group
            if kind in self.kinds
        ]
        futures: Dict[tuple, concurrent.futures.Future] = {}

        def from_structure(kind: str):
            """The run of a kind built from DPHuBERT's structure of the same seed (its stage-1 export)."""

            def run(name: str, seed: int) -> Dict[str, object]:
                pruned = futures[("dphubert", seed)].result()["structure"]
                if kind == "random_structure":
                    model = students.random_structure(load_model(pruned), seed)
                else:
                    model = students.largest_in_structure(teacher_path, structure.exported_sizes(pruned))
                init = save_model(model, self.path("models", f"{name}_init.pt"))
                return self.baseline(name, data, teacher_path, init, seed, False, kind)

            return run

        # last: each waits for its DPHuBERT structure
        jobs += [
            {"kind": kind, "seed": seed, "run": from_structure(kind)}
            for seed in seeds
            for kind in FROM_DPHUBERT_STRUCTURE
            if kind in self.kinds
        ]

        def run(job: Dict[str, object]) -> Dict[str, object]:
            name = f"{job['kind']}_seed{job['seed']}"
            start = time.time()
            result = job["run"](name, job["seed"])
            seconds = time.time() - start
            self.say(f"    done: {name} in {seconds:.0f} s")
            return {"kind": job["kind"], "seed": job["seed"], "name": name, "seconds": seconds, **result}

        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            for job in jobs:  # in order (see above)
                futures[(job["kind"], job["seed"])] = pool.submit(run, job)
            return [futures[(job["kind"], job["seed"])].result() for job in jobs]

    # ----- measures -----

    def measure(self, corpus, teacher_path: str, trained: List[Dict[str, object]]) -> List[Dict[str, object]]:
        """Every row's measures. The phoneme probes, most of the time, train ``--jobs`` at a time in worker
        processes (one thread each) while this process extracts the next rows' features and runs the rest."""
        from dphubert_fairseq import load_teacher
        from dphubert_fairseq.checkpoint_io import load_model_and_extra_state

        torch.set_num_threads(1)
        torch.manual_seed(0)
        teacher = students.teacher_as_student(load_teacher(teacher_path))
        audio = torch.from_numpy(np.concatenate(corpus.held_out)[: 10 * SAMPLE_RATE]).unsqueeze(0)
        kws_train, speaker_train = measures.probe_splits(
            corpus.word_labels, speech.HELD_OUT_VOICES, speech.KEYWORDS[6:]
        )
        keywords = [w["keyword"] for w in corpus.word_labels]
        voices = [w["voice"] for w in corpus.word_labels]

        def probes(features: np.ndarray) -> Dict[str, object]:
            return {
                "keyword": measures.linear_probe(features, keywords, kws_train),
                "speaker": measures.linear_probe(features, voices, speaker_train),
            }

        targets = phonemes.sentence_phonemes(corpus)
        rows: List[Dict[str, object]] = []
        pending: List[tuple] = []  # (row, its phoneme probe's future), in submission order

        def settle(keep: int) -> None:
            """Wait for the oldest probes until at most ``keep`` are pending (each holds a model's features)."""
            while len(pending) > keep:
                row, future = pending.pop(0)
                row["phonemes"] = future.result()
                name = row["kind"] + (
                    f", probe seed {row['seed']}" if "params" not in row else f"_seed{row['seed']}"
                )
                self.say(f"    {name}: PER {row['phonemes']['per']:.3f}")

        context = multiprocessing.get_context("spawn")  # no fork of a process with torch's threads running
        with concurrent.futures.ProcessPoolExecutor(
            self.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:

            def phoneme_recognition(row: Dict[str, object], extract, seed: int) -> None:
                """Queue the phoneme probe (PER) on ``extract``'s frame features of the sentences for ``row``."""
                settle(self.jobs)
                future = pool.submit(
                    ctc_probe.phoneme_recognition,
                    extract(corpus.train_sentence_audio),
                    extract(corpus.held_out),
                    targets,
                    seed,
                    self.size.phoneme_probe_steps,
                )
                rows.append(row)
                pending.append((row, future))

            # the upper and lower lines, one row per probe seed: their PER margin is what makes the probe valid
            teacher_row = {
                "kind": "teacher",
                **measures.size_and_cost(teacher, audio),
                "layers": {str(l): {"l1": 0.0, "cos": 1.0} for l in TARGET_LAYERS},
                "probes": probes(measures.pooled_layers(teacher, corpus.words)),
            }
            for row, extract in (
                (
                    {"kind": "mfcc", "probes": probes(measures.pooled_mfcc(corpus.words))},
                    ctc_probe.frame_mfcc,
                ),
                (teacher_row, lambda clips: ctc_probe.frame_layers(teacher, clips)),
            ):
                for seed in range(self.size.phoneme_probe_seeds):
                    phoneme_recognition({**row, "seed": seed}, extract, seed)
            for run in trained:
                model, extra = load_model_and_extra_state(run["model"])
                proj = measures.projections(extra, model.encoder_embed_dim)
                similarity = measures.layer_similarity(teacher, model, proj, corpus.held_out, TARGET_LAYERS)
                row = {
                    "kind": run["kind"],
                    "seed": run["seed"],
                    **measures.size_and_cost(model, audio),
                    "layers": {str(l): v for l, v in similarity.items()},
                    "probes": probes(measures.pooled_layers(model, corpus.words)),
                    "train_seconds": run["seconds"],
                    **({"stage1_end": run["stage1_end"]} if "stage1_end" in run else {}),
                    "heads": list(model.cfg.encoder_attention_heads),
                    "ffn_dims": list(model.cfg.encoder_ffn_embed_dims),
                }
                self.say(
                    f"    {run['name']}: {row['params']:,} parameters, cos@{TARGET_LAYERS[-1]} "
                    f"{similarity[TARGET_LAYERS[-1]]['cos']:.3f}, "
                    f"keywords {row['probes']['keyword']['accuracy']:.3f}, "
                    f"speaker {row['probes']['speaker']['accuracy']:.3f}"
                )
                phoneme_recognition(row, lambda clips: ctc_probe.frame_layers(model, clips), int(run["seed"]))
            settle(0)
        return rows

    def learned_structure(self, teacher_path: str, trained: List[Dict[str, object]]) -> Dict[str, object]:
        """``structure.summarize`` of the DPHuBERT runs, against the teacher and the uniform student."""
        from dphubert_fairseq import load_teacher

        records: Dict[str, Dict[str, Dict[str, object]]] = {}
        for run in trained:
            if "stage1_structure" in run:
                records.setdefault(run["kind"], {})[str(run["seed"])] = run["stage1_structure"]
        teacher = structure.sizes(students.teacher_as_student(load_teacher(teacher_path)))
        uniform = self.path("models", "uniform_init.pt")
        return structure.summarize(
            records, teacher, structure.exported_sizes(uniform) if os.path.exists(uniform) else None
        )

    def run(self) -> Dict[str, object]:
        corpus, teacher_path, quality = self.speech_and_teacher()
        self.begin(
            f"students: {len(self.kinds)} kinds x {self.size.seeds} seed(s), {self.jobs} fairseq run(s) at a time"
        )
        trained = self.train_students(teacher_path)
        self.begin("measures on held-out audio, and what DPHuBERT's gates kept")
        rows = self.measure(corpus, teacher_path, trained)
        learned = self.learned_structure(teacher_path, trained)
        self.begin("report")
        result = {
            "command": self.command,
            "commit": self.commit,
            "date": time.strftime("%Y-%m-%d"),
            "size": asdict(self.size),
            "jobs": self.jobs,
            "threads": {"training": 1 if self.jobs > 1 else torch.get_num_threads(), "measures": 1},
            "data": corpus.description,
            "teacher": {"shape": asdict(TEACHER), **quality},
            "target_layers": list(TARGET_LAYERS),
            "schedules": {kind: self.size.schedule_record(kind) for kind in self.kinds},
            "rows": rows,
            "structure": learned,
            "wall_seconds": time.time() - self.started,
        }
        for path in write_report(result, self.out):
            self.say(f"wrote {os.path.relpath(path)}")
        return result


def rerender(out: str) -> int:
    """Write the report of ``OUT/results.json`` again with this checkout's report code, which it records."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        print(f"--report-only: {path} does not exist; run the comparison into {out} first", file=sys.stderr)
        return 1
    with open(path) as f:
        result = json.load(f)
    result["report_commit"] = git_commit()
    for written in write_report(result, out):
        print(f"wrote {os.path.relpath(written)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.comparison", description=__doc__)
    parser.add_argument("--out", default="dphubert_comparison", help="folder for every output (created)")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="default",
        help="'default': the paper's claims, the committed results (36-44 min on 2 quiet cores); 'full': every kind, "
        "with the ablations and the option (52-67 min); 'long': four times the student updates; 'tiny': for tests",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="fairseq runs at a time (one thread each when > 1)"
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, help="the students to train (default: the size's kinds)"
    )
    parser.add_argument("--seeds", type=int, help="seeds per student (default: the size's)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="render OUT/results.md and OUT/comparison.png again from OUT/results.json (nothing is run)",
    )
    args = parser.parse_args(argv)
    kinds = args.kinds or SIZES[args.size].kinds
    needs = [kind for kind in FROM_DPHUBERT_STRUCTURE if kind in kinds]
    if needs and "dphubert" not in kinds:
        parser.error(f"--kinds: {', '.join(needs)} need(s) dphubert (built from DPHuBERT's structure)")
    if args.report_only:
        return rerender(args.out)
    size = SIZES[args.size] if args.seeds is None else replace(SIZES[args.size], seeds=max(1, args.seeds))
    command = "python -m examples.comparison " + " ".join(argv if argv is not None else sys.argv[1:])
    return exit_code(Comparison(args.out, size, max(1, args.jobs), command.strip(), kinds).run, "comparison")


if __name__ == "__main__":
    sys.exit(main())
