"""What the tests share: paths, a subprocess runner, teachers made by stock fairseq, real-speech manifests,
small checks and model set-ups. Test modules import this module (and conftest's fixtures), never each other.

Running fairseq (``run``, ``hydra_train``, ``export``, ``compose``, the override lists, reading log records) is
``fairseq_runs``'s, shared with the quickstart and the benchmarks; it is re-exported here. ``run`` always puts
this checkout first on ``PYTHONPATH`` and drops ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""

import glob
import os
import socket
import sys
from argparse import Namespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dphubert_fairseq.models.dphubert import DPHuBERTConfig, pad_waveforms  # noqa: E402
from dphubert_fairseq.teacher import import_data2vec  # noqa: E402
from fairseq_runs import (  # noqa: E402,F401  (re-exported for the tests)
    CONFIGS,
    CPU_OVERRIDES,
    TINY_HUBERT,
    Shape,
    bin_or_module,
    checkout_env,
    compose,
    composite_schedule,
    cpu_overrides,
    export,
    hydra_train,
    hydra_train_command,
    pretrain_tiny_hubert,
    records,
    run,
    schedule_overrides,
    start,
    wavlm,  # noqa: E402
)
from fairseq_runs.speech import LIBRIVOX  # noqa: E402,F401

logged = records  # fairseq's JSON log records of one kind ('train_inner', 'valid', 'train')


# ----- small checks -----


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(message: str, starts_with: Optional[str] = None, contains: Sequence[str] = ()) -> None:
    """The error message is one line (no traceback, no wrapped text), starting and containing as asked."""
    assert "\n" not in message, message
    if starts_with is not None:
        assert message.startswith(starts_with), message
    for part in contains:
        assert part in message, message


# ----- models and batches -----


def padded_batch(clips, normalize: bool = False):
    """(B, L) batch right-padded with zeros and its (B, L) padding mask (True = padding)."""
    if normalize:
        clips = [(c - c.mean()) / (c.std() + 1e-5) for c in clips]
    return pad_waveforms([c.float() for c in clips])


def tiny_student_config(**overrides) -> DPHuBERTConfig:
    """A tiny student's config: 3 layers of width 32 (4 heads of 8, FFN 64), a CNN of 24 channels, heads and
    FFN units gated; ``overrides`` on top."""
    values = dict(
        conv_feature_layers="[(24,10,5)] + [(24,3,2)] * 4 + [(24,2,2)] * 2",
        encoder_layers=3,
        encoder_embed_dim=32,
        attention_head_dim=8,
        encoder_attention_heads=[4] * 3,
        encoder_ffn_embed_dims=[64] * 3,
        use_attention=[1] * 3,
        use_ffn=[1] * 3,
        conv_pos=16,
        conv_pos_groups=4,
        prune_units=["head", "interm"],
    )
    values.update(overrides)
    return DPHuBERTConfig(**values)


def randomise_gates(model, seed=0):
    """Random gate logits: a mix of closed gates and open ones with soft values well below 1, plus the
    corner cases: every head of layer 0 and every FFN unit of layer 1 closed, and, when whole-layer gates
    exist, the attention block of layer 2 and the FFN block of layer 0 closed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates().values():
            gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 2.0 - 0.5)
        layers = model.encoder.layers
        if layers[0].self_attn.head_gate is not None:
            layers[0].self_attn.head_gate.log_alpha.fill_(-10.0)
        if layers[1].ffn.unit_gate is not None:
            layers[1].ffn.unit_gate.log_alpha.fill_(-10.0)
        if layers[0].self_attn.layer_gate is not None:
            layers[0].self_attn.layer_gate.log_alpha.fill_(5.0)  # open: the bias-only block must survive
            layers[1].ffn.layer_gate.log_alpha.fill_(5.0)
            layers[2].self_attn.layer_gate.log_alpha.fill_(-10.0)
            layers[0].ffn.layer_gate.log_alpha.fill_(-10.0)
    return model


# ----- teachers made by stock fairseq, saved as its trainer saves them -----
# The configuration goes through fairseq's own command-line parser (what ``fairseq-train`` does), the model,
# task and criterion through fairseq's builders, and the file through ``Trainer.save_checkpoint``. Weights are
# random; LayerNorm and bias parameters are perturbed away from their 1 / 0 initial values so that tests which
# depend on them (pruned biases, LayerNorm folding) can fail.

#: (kind, large_shape) of every supported teacher shape
TEACHER_SHAPES = {
    "hubert_base": ("hubert", False),
    "hubert_large": ("hubert", True),
    "wav2vec2_base": ("wav2vec2", False),
    "wav2vec2_large": ("wav2vec2", True),
    "data2vec_base": ("data2vec_audio", False),  # a 3-layer positional convolution
}

TINY = [
    "--encoder-layers",
    "3",
    "--encoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--encoder-attention-heads",
    "4",
    "--conv-feature-layers",
    "[(24,10,5)] + [(24,3,2)] * 4 + [(24,2,2)] * 2",
    "--conv-pos",
    "16",
    "--conv-pos-groups",
    "4",
]
#: the projection HuBERT / wav2vec2 pretraining predicts through (data2vec has none)
FINAL_DIM = {"tiny": ["--final-dim", "16"], "base": ["--final-dim", "256"]}
LARGE_SHAPE = ["--layer-norm-first", "--extractor-mode", "layer_norm", "--normalize"]


def _write_label_dir(folder: str, num_labels: int = 10) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dict.km.txt"), "w") as f:
        f.writelines(f"{i} 1\n" for i in range(num_labels))


def training_args(kind: str, folder: str, size: str = "tiny", large_shape: bool = False) -> Namespace:
    """fairseq-train's parsed arguments for a HuBERT or wav2vec2 pretraining run."""
    from fairseq import options

    _write_label_dir(folder)
    argv: List[str] = [folder, "--cpu", "--optimizer", "adam", "--lr", "1e-4", "--max-tokens", "100000"]
    if kind == "hubert":
        argv += [
            "--task",
            "hubert_pretraining",
            "--arch",
            "hubert",
            "--criterion",
            "hubert",
            "--labels",
            '["km"]',
            "--label-dir",
            folder,
            "--label-rate",
            "50",
            "--pred-masked-weight",
            "1",
        ]
    elif kind == "wav2vec2":
        argv += ["--task", "audio_pretraining", "--arch", "wav2vec2", "--criterion", "wav2vec"]
    elif kind == "data2vec_audio":  # fairseq's example model (its whole user dir would need torchvision)
        import_data2vec()
        argv += ["--task", "audio_pretraining", "--arch", "data2vec_audio", "--criterion", "model"]
        argv += ["--pos-conv-depth", "3"]
    else:
        raise ValueError(kind)
    argv += (TINY if size == "tiny" else []) + (FINAL_DIM[size] if kind != "data2vec_audio" else [])
    if large_shape:
        argv += LARGE_SHAPE + (["--conv-bias"] if kind == "wav2vec2" else [])
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, argv)


def build(kind: str, folder: str, size: str = "tiny", large_shape: bool = False, seed: int = 0):
    """(cfg, task, model, criterion) as fairseq's train.py builds them, with perturbed norms and biases."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    torch.manual_seed(seed)
    cfg = convert_namespace_to_omegaconf(training_args(kind, folder, size, large_shape))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "log_alpha" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, task, model, criterion


def save_with_trainer(path: str, cfg, task, model, criterion, num_updates: int = 0) -> str:
    """Write a checkpoint with fairseq's ``Trainer`` (as ``checkpoint_utils.save_checkpoint`` does)."""
    from fairseq.trainer import Trainer

    trainer = Trainer(cfg, task, model, criterion)
    trainer.set_num_updates(num_updates)
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(path, {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "val_loss": 1.0})
    return path


def make_teacher(path: str, kind: str, size: str = "tiny", large_shape: bool = False, seed: int = 0) -> str:
    folder = os.path.join(os.path.dirname(path), "labels")
    cfg, task, model, criterion = build(kind, folder, size, large_shape, seed)
    if kind == "data2vec_audio":
        # a trained data2vec checkpoint holds its EMA teacher, which fairseq's loader insists on: it is made at
        # the first update
        model.set_num_updates(1)
        return save_with_trainer(path, cfg, task, model, criterion, num_updates=1)
    return save_with_trainer(path, cfg, task, model, criterion)


# ----- WavLM teachers, made by WavLM's own code (fairseq_runs.wavlm) -----

#: WavLM shapes, tiny: Base (and Base+, the same architecture) and Large (pre-LayerNorm, LayerNorm extractor)
WAVLM_SHAPES = {"wavlm_base": False, "wavlm_large": True}
#: 32 buckets up to distance 64: a 2 s clip (about 100 frames) uses the log-spaced and the shared buckets too
TINY_WAVLM = Shape(
    3, 32, 64, 4, "[(24,10,5)] + [(24,3,2)] * 4 + [(24,2,2)] * 2", conv_pos=16, conv_pos_groups=4
)


def _tiny_wavlm_config(large_shape: bool):
    import pytest

    pytest.importorskip("s3prl", reason="WavLM's code (s3prl, the 'superb' extra) is needed")
    return wavlm.wavlm_config(TINY_WAVLM, large_shape, num_buckets=32, max_distance=64)


def build_wavlm(large_shape: bool = False, seed: int = 0):
    """A tiny WavLM made by WavLM's own code (skips the test when s3prl, the 'superb' extra, is missing)."""
    return wavlm.build_wavlm(_tiny_wavlm_config(large_shape), seed)


def make_wavlm_teacher(path: str, large_shape: bool = False, seed: int = 0) -> str:
    """The same, saved in the layout WavLM's authors release (``{"cfg": flat dict, "model": state dict}``)."""
    return wavlm.write_wavlm_checkpoint(path, _tiny_wavlm_config(large_shape), seed)


def make_legacy_wav2vec2(path: str, folder: str, size: str = "tiny", large_shape: bool = False) -> str:
    """An old wav2vec2 release: configuration as an argparse Namespace in ``args``, no ``cfg``."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = training_args("wav2vec2", folder, size, large_shape)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    state = {
        "args": args,
        "model": model.state_dict(),
        "optimizer_history": [
            {
                "criterion_name": "Wav2vecCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 400000,
            }
        ],
        "extra_state": {"train_iterator": {"epoch": 1}, "val_loss": None},
        "last_optimizer_state": None,
    }
    torch.save(state, path)
    return path


def counted_modules(model) -> list:
    """The modules the project's parameter count covers, in a fairseq HubertModel / Wav2Vec2Model."""
    parts = [model.feature_extractor, model.layer_norm, model.encoder]
    if model.post_extract_proj is not None:
        parts.append(model.post_extract_proj)
    return parts


def direct_count(modules, exclude: Optional[str] = None) -> int:
    return sum(
        p.numel() for m in modules for n, p in m.named_parameters() if exclude is None or exclude not in n
    )


def counted_student_params(model) -> int:
    """Direct sum over a dphubert model's parameters, less what the count leaves out by convention: gate
    logits (training only) and the mask embedding (used only by fine-tuning masking)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.endswith("log_alpha") and not n.startswith("masking.")
    )


# ----- data and tasks -----


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
        for first in range(0, len(wav) - step + 1, step):
            name = f"{os.path.basename(f)[:-4]}_{first // step}.wav"
            sf.write(os.path.join(audio_dir, name), wav[first : first + step], rate)
            entries.append((name, step))
    rng = np.random.default_rng(0)
    splits = {"train": entries[valid_chunks:], "valid": entries[:valid_chunks]}
    for split, items in splits.items():
        with open(os.path.join(folder, f"{split}.tsv"), "w") as tsv, open(
            os.path.join(folder, f"{split}.km"), "w"
        ) as km:
            tsv.write(audio_dir + "\n")
            for name, n in items:
                tsv.write(f"{name}\t{n}\n")
                frames = (n - 400) // 320 + 1
                km.write(" ".join(str(x) for x in rng.integers(0, 10, frames)) + "\n")
    with open(os.path.join(folder, "dict.km.txt"), "w") as d:
        d.writelines(f"{i} 1\n" for i in range(10))
    return folder


def distill_task(data, teacher, **task_cfg):
    """The ``dphubert_distill`` task as ``setup_task`` makes it for manifests in ``data`` and ``teacher``."""
    from omegaconf import OmegaConf

    from dphubert_fairseq.tasks import DPHuBERTDistillConfig, DPHuBERTDistillTask

    cfg = OmegaConf.structured(
        DPHuBERTDistillConfig(data=str(data), teacher_path=str(teacher), tpu=False, seed=1, **task_cfg)
    )
    return DPHuBERTDistillTask.setup_task(cfg)


def landing_student(data, teacher, prune_units: Sequence[str], **criterion_overrides):
    """(task, model, criterion): a stage-1 student of ``teacher`` with ``prune_units`` gated and a criterion
    that lands at every update (a 10-update run whose target, 0.5, is reached after one), distilling layers
    0-3 of a tiny teacher; ``criterion_overrides`` on top."""
    from omegaconf import OmegaConf

    from dphubert_fairseq.criterions import DPHuBERTDistillCriterion, DPHuBERTDistillCriterionConfig

    task = distill_task(data, teacher)
    model = task.build_model(
        OmegaConf.structured(DPHuBERTConfig(_name="dphubert", prune_units=list(prune_units)))
    )
    settings = dict(
        distill_layers="0;1,2,3",
        target_sparsity=0.5,
        sparsity_warmup_updates=1,
        target_projection_start=0.0,
        max_update=10,
    )
    settings.update(criterion_overrides)
    return task, model, DPHuBERTDistillCriterion(DPHuBERTDistillCriterionConfig(**settings), task)


def tiny_run_overrides(data, teacher, save_dir, max_update: int, log_interval: int = 1) -> List[str]:
    """Stage-1 command-line overrides for a short CPU run of a 3-layer tiny teacher (distilling layers 1-3)."""
    return [
        f"task.data={data}",
        f"task.teacher_path={teacher}",
        f"checkpoint.save_dir={save_dir}",
        'criterion.distill_layers="0;1,2,3"',
        *CPU_OVERRIDES,
        "dataset.max_tokens=48000",
        f"common.log_interval={log_interval}",
        "common.tensorboard_logdir=null",
        f"optimization.max_update={max_update}",
    ]


CTC_RECIPES = {
    # stock fairseq fine-tuning recipes: (config folder under fairseq/examples, config name, extra overrides)
    "wav2vec_ctc": ("wav2vec/config/finetuning", "base_10m", []),
    "hubert_ctc": (
        "hubert/config/finetune",
        "base_10h",
        ["task.label_dir={data}", "common.tensorboard_logdir=null"],
    ),
}


def stock_ctc_command(recipe: str, data: str, pruned: str, out_dir: str) -> List[str]:
    """fairseq-hydra-train with fairseq's own CTC recipe ``recipe`` (``CTC_RECIPES``) on the exported model
    ``pruned``, the plugin loaded through common.user_dir: 4 CPU updates on the letter labels of ``data``
    (``write_letter_labels``), validated and saved at the end, in ``out_dir``."""
    import fairseq

    folder, name, extra = CTC_RECIPES[recipe]
    return bin_or_module("fairseq-hydra-train", "fairseq_cli.hydra_train") + [
        "--config-dir",
        os.path.join(os.path.dirname(fairseq.__file__), "examples", folder),
        "--config-name",
        name,
        f"task.data={data}",
        f"model.w2v_path={pruned}",
        f"common.user_dir={REPO}/dphubert_fairseq",
        f"checkpoint.save_dir={out_dir}",
        f"hydra.run.dir={out_dir}/hydra",
        "dataset.valid_subset=valid",
        "common.fp16=false",
        "common.cpu=true",
        "distributed_training.distributed_world_size=1",
        "dataset.num_workers=0",
        "dataset.max_tokens=48000",
        "dataset.required_batch_size_multiple=1",
        "optimization.max_update=4",
        "optimization.update_freq=[1]",
        "model.freeze_finetune_updates=0",
        "dataset.validate_after_updates=0",
        "dataset.validate_interval_updates=4",
        "common.log_interval=1",
        "checkpoint.save_interval_updates=4",
        *[e.format(data=data) for e in extra],
        # the recipes' channel spans (64) are sized for D=768; fairseq's span sampler fails on this D=32 model
        "model.mask_channel_length=8",
    ]


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
