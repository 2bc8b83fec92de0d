"""``python -m examples.quickstart [--out OUT] [--size default|tiny] [--teacher hubert|wavlm]`` from the
repository root (or ``bash examples/quickstart.sh [OUT] [OPTIONS]`` from anywhere): the whole pipeline on an
embedded default, with a report. Every output lands in OUT (default ./dphubert_quickstart).

``--teacher wavlm`` distils a WavLM-shaped teacher (DPWavLM) instead of a HuBERT pretrained here: a checkpoint
in WavLM's release layout made by WavLM's own code (s3prl's copy) with *random weights*. It shows that the
pipeline takes WavLM checkpoints as released; what the student learns from a random teacher means nothing."""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from dphubert_fairseq.conv_spec import parse_conv_layers
from dphubert_fairseq.macs import architecture_size
from fairseq_runs import (
    CONFIGS,
    Shape,
    composite_schedule,
    export_command,
    hubert_pretraining_command,
    hydra_train_command,
    records,
    run_length,
    short_utterance_overrides,
)
from fairseq_runs.kmeans_labels import LABEL_RATE, write_kmeans_labels
from fairseq_runs.phased_run import PhasedRun, exit_code
from fairseq_runs.speech import (
    SAMPLE_RATE,
    gather_speech,
    generated_audio,
    read_speech_clips,
    write_manifests,
)
from fairseq_runs.timing import forward_seconds
from fairseq_runs.wavlm import wavlm_config, write_wavlm_checkpoint

from ..comparison.students import uniform_cut
from . import report as reporting


@dataclass
class Size:
    """How big the quickstart is. 'default' takes a few minutes on 2 CPU cores; 'tiny' is for the tests."""

    seconds_of_audio: float
    synthesised: bool
    layers: int
    dim: int
    heads: int
    ffn: int
    conv: str
    teacher_updates: int
    stage1_updates: int
    stage2_updates: int
    target_sparsity: float
    max_tokens: int
    sparsity_warmup_fraction: float = 2 / 3  # of stage 1; at this scale a faster ramp overshoots the target
    lrs: Dict[str, float] = field(default_factory=lambda: {"default": 5e-4, "gates": 0.1, "lagrangian": 0.1})


SIZES = {
    "default": Size(
        300,
        True,
        12,
        64,
        4,
        256,
        "[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2",
        200,
        300,
        100,
        0.75,
        160000,
    ),
    "tiny": Size(
        20, False, 12, 32, 4, 64, "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", 4, 16, 4, 0.5, 64000
    ),
}


def uniform_reference(teacher_cfg, params: int) -> Optional[Dict[str, object]]:
    """What a uniform cut of the teacher to ``params`` parameters keeps (the comparison's uniformly thinned
    student's arithmetic, ``uniform_cut``): per layer the same heads and FFN units, every conv channel. None
    when no uniform cut is that small."""
    try:
        cut = uniform_cut(teacher_cfg, params)
    except ValueError:
        return None
    return {
        "method": "uniform_cut",
        "params": cut.params,
        "heads": cut.heads,
        "ffn_dims": cut.ffn_dims,
        "conv_channels": [c for c, _, _ in parse_conv_layers(teacher_cfg.conv_feature_layers)],
    }


def teacher_shape(size: Size) -> Shape:
    """The teacher's HuBERT shape at this size."""
    return Shape(
        size.layers, size.dim, size.ffn, size.heads, size.conv, conv_pos=32, conv_pos_groups=8, final_dim=32
    )


TEACHERS = ("hubert", "wavlm")


class Quickstart(PhasedRun):
    def __init__(self, out: str, size: Size, teacher: str = "hubert") -> None:
        super().__init__(out, phases=7)
        self.size = size
        self.teacher_kind = teacher

    def distil(
        self, config: str, name: str, card: List[str], updates: int, log_every: int, schedule: List[str]
    ) -> str:
        """One run of ``configs/<config>.yaml`` at the quickstart's size, into ``OUT/<name>``; its output."""
        overrides = [
            *card,
            f"checkpoint.save_dir={self.path(name)}",
            *short_utterance_overrides(self.size.max_tokens),
            *run_length(updates, log_every),
            *schedule,
        ]
        return self.logged(hydra_train_command(CONFIGS, config, overrides), f"{name}.log")

    def export(self, checkpoint: str, out: str, log: str) -> None:
        output = self.logged(export_command(checkpoint, out), log)
        self.say("    " + output.strip().splitlines()[0])

    def teacher(self, data: str) -> str:
        """Phases 2 and 3: the teacher's labels and the teacher; its checkpoint."""
        size = self.size
        if self.teacher_kind == "wavlm":
            self.begin("labels: none needed (the WavLM teacher is not pretrained here)")
            self.begin(f"teacher: a {size.layers}-layer WavLM Base-shaped checkpoint with RANDOM weights")
            path = self.path("teacher", "wavlm_random.pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_wavlm_checkpoint(path, wavlm_config(teacher_shape(size)))
            self.say(f"    {path}: WavLM's release layout, made by WavLM's own code; not a trained model")
            return path
        self.begin("labels: k-means of MFCC features (HuBERT's first iteration)")
        write_kmeans_labels(data)
        self.begin(
            f"teacher: pretraining a {size.layers}-layer HuBERT with stock fairseq (hubert_pretraining)"
        )
        teacher_dir = self.path("teacher")
        extra = short_utterance_overrides(size.max_tokens) + [
            "common.log_interval=25",
            "lr_scheduler.warmup_updates=20",
            "dataset.validate_interval=1000",
        ]
        self.logged(
            hubert_pretraining_command(
                data, teacher_dir, teacher_shape(size), LABEL_RATE, size.teacher_updates, extra
            ),
            "teacher.log",
        )
        return os.path.join(teacher_dir, "checkpoint_last.pt")

    def run(self) -> Dict:
        size, data = self.size, self.path("data")
        self.begin("speech: gathering and writing manifests")
        utterances, description = gather_speech(
            size.seconds_of_audio, log=self.say, synthesised=size.synthesised
        )
        n_train, n_valid = write_manifests(utterances, data)
        seconds = sum(len(u) for u in utterances) / SAMPLE_RATE
        self.say(f"    {description}: {n_train} train + {n_valid} valid utterances, {seconds:.0f} s")

        teacher = self.teacher(data)
        self.begin(
            f"stage 1: distillation + pruning to sparsity {size.target_sparsity} "
            "(fairseq-hydra-train --config-dir configs --config-name dphubert)"
        )
        card = [f"task.data={data}", f"task.teacher_path={teacher}"]
        stage1 = self.distil(
            "dphubert",
            "stage1",
            card,
            size.stage1_updates,
            size.stage1_updates // 30,
            [
                f"criterion.target_sparsity={size.target_sparsity}",
                f"criterion.sparsity_warmup_updates={max(1, int(size.stage1_updates * size.sparsity_warmup_fraction))}",
                *composite_schedule(size.lrs, max(1, size.stage1_updates // 60)),
            ],
        )

        self.begin("export of stage 1 (dphubert-export)")
        pruned1 = self.path("stage1_pruned.pt")
        self.export(self.path("stage1", "checkpoint_last.pt"), pruned1, "export1.log")

        self.begin("stage 2: distilling the pruned model (--config-name dphubert_final), then export")
        stage2 = self.distil(
            "dphubert_final",
            "stage2",
            card + [f"task.student_path={pruned1}"],
            size.stage2_updates,
            size.stage2_updates // 10,
            [
                f"optimization.lr=[{size.lrs['default'] / 2}]",
                f"lr_scheduler.warmup_updates={max(1, size.stage2_updates // 10)}",
            ],
        )
        final = self.path("dphubert.pt")
        self.export(self.path("stage2", "checkpoint_last.pt"), final, "export2.log")

        self.begin("report")
        result = self.report(teacher, final, stage1, stage2, description, n_train, n_valid, seconds)
        return result

    def report(
        self, teacher_path, final_path, stage1, stage2, description, n_train, n_valid, seconds
    ) -> Dict:
        from dphubert_fairseq import count_params, load_model, load_teacher, teacher_hidden_states
        from dphubert_fairseq.export import summarize
        from dphubert_fairseq.teacher import config_from_fairseq

        teacher, student = load_teacher(teacher_path), load_model(final_path)
        teacher_cfg = config_from_fairseq(teacher)
        original = {
            "kind": self.teacher_kind,
            "params": count_params(teacher),
            "macs": architecture_size(teacher_cfg, "macs"),
            "heads": list(teacher_cfg.encoder_attention_heads),
            "ffn_dims": list(teacher_cfg.encoder_ffn_embed_dims),
            "conv_channels": [c for c, _, _ in parse_conv_layers(teacher_cfg.conv_feature_layers)],
        }
        # time both models on the same audio: 10 s of the real speech (or of the generated audio)
        clips = read_speech_clips() or generated_audio(10.0)
        audio = torch.from_numpy(np.concatenate(clips)[: SAMPLE_RATE * 10]).unsqueeze(0)
        timing = {
            "audio_seconds": audio.size(1) / SAMPLE_RATE,
            "threads": torch.get_num_threads(),
            "teacher_seconds": forward_seconds(teacher, audio, teacher_hidden_states),
            "student_seconds": forward_seconds(student, audio, teacher_hidden_states),
        }
        valid2 = records(stage2, "valid")
        curve = [
            {
                "update": int(r["num_updates"]),
                "expected_sparsity": float(r["expected_sparsity"]),
                "eval_sparsity": float(r["eval_sparsity"]),
                "target_sparsity": float(r["target_sparsity"]),
                "distill_loss": float(r["distill_loss"]),
            }
            for r in records(stage1, "train_inner")
        ]
        result = {
            "data": {
                "description": description,
                "train_utterances": n_train,
                "valid_utterances": n_valid,
                "seconds": seconds,
            },
            "teacher": original,
            "student": summarize(student),
            "uniform": uniform_reference(teacher_cfg, count_params(student)),
            "target_sparsity": self.size.target_sparsity,
            "final_distill_loss": float(valid2[-1]["valid_distill_loss"]) if valid2 else float("nan"),
            "timing": timing,
            "wall_seconds": time.time() - self.started,
            "outputs": {"model": final_path, "teacher": teacher_path},
        }
        written = reporting.write(result, curve, self.out)
        self.say(reporting.terminal(result))
        self.say("wrote " + ", ".join(os.path.relpath(p, os.getcwd()) for p in written))
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.quickstart", description=__doc__)
    parser.add_argument("--out", default="dphubert_quickstart", help="folder for every output (created)")
    parser.add_argument("--size", choices=sorted(SIZES), default="default", help="'tiny' is for tests")
    parser.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="hubert",
        help="'hubert': pretrained here with stock fairseq; 'wavlm': a WavLM checkpoint with random weights, "
        "made by WavLM's own code (needs the 'superb' extra)",
    )
    args = parser.parse_args(argv)
    return exit_code(Quickstart(args.out, SIZES[args.size], args.teacher).run, "quickstart")


if __name__ == "__main__":
    sys.exit(main())
