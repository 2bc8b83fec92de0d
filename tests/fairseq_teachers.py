"""Teachers for the tests, made by stock fairseq and saved exactly as fairseq's trainer saves them.

The configuration goes through fairseq's own command-line parser (what ``fairseq-train`` does), the model,
task and criterion through fairseq's builders, and the file through ``Trainer.save_checkpoint``. Weights are
random; LayerNorm and bias parameters are perturbed away from their 1 / 0 initial values so that tests which
depend on them (pruned biases, LayerNorm folding) can fail.
"""

import os
from argparse import Namespace
from typing import List, Optional

import torch

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
    "--final-dim",
    "16",
]
BASE = ["--final-dim", "256"]
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
    else:
        raise ValueError(kind)
    argv += TINY if size == "tiny" else BASE
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
    return save_with_trainer(path, *build(kind, folder, size, large_shape, seed))


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
