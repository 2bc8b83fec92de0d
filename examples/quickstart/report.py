"""The quickstart's report: numbers in the terminal, Markdown and JSON, and two figures."""

import json
import os
from typing import Any, Dict, List

TEACHER_TEXT = {
    "hubert": "Teacher: a HuBERT pretrained here by stock fairseq (hubert_pretraining).",
    "wavlm": "Teacher: a WavLM-shaped checkpoint with RANDOM weights, in WavLM's release layout (the "
    "mechanics of DPWavLM only; a random teacher teaches nothing).",
}


def target_params(report: Dict[str, Any]) -> int:
    """The parameter count the target sparsity asks for."""
    return round((1.0 - report["target_sparsity"]) * report["teacher"]["params"])


def markdown(report: Dict[str, Any]) -> str:
    s = report["student"]
    lines = [
        "# DPHuBERT quickstart report",
        "",
        f"Data: {report['data']['description']}; {report['data']['train_utterances']} training and "
        f"{report['data']['valid_utterances']} validation utterances, {report['data']['seconds']:.0f} s.",
        "",
        TEACHER_TEXT[report["teacher"].get("kind", "hubert")],
        "",
        "| | teacher | pruned student |",
        "|---|---|---|",
        f"| parameters | {report['teacher']['params']:,} | {s['params']:,} |",
        f"| MACs of a {s['macs_seconds']:g} s utterance | {report['teacher']['macs']:,} | {s['macs']:,} "
        f"({s['macs'] / report['teacher']['macs']:.1%}) |",
        f"| forward time, {report['timing']['audio_seconds']:.0f} s of audio | "
        f"{report['timing']['teacher_seconds'] * 1000:.1f} ms | "
        f"{report['timing']['student_seconds'] * 1000:.1f} ms |",
        "",
        f"Target sparsity {report['target_sparsity']:.4f} (about {target_params(report):,} parameters); "
        f"reached {s['sparsity']:.4f}: the exported model has {s['params']:,} parameters. Final distillation "
        f"loss (stage 2, validation) {report['final_distill_loss']:.4f}. Wall time of the whole run: "
        f"{report['wall_seconds']:.0f} s.",
        "",
        "| layer | heads kept | FFN units kept |",
        "|---|---|---|",
    ]
    for i, (h, f) in enumerate(zip(s["heads"], s["ffn_dims"])):
        lines.append(
            f"| {i + 1} | {h} / {report['teacher']['heads'][i]} | {f} / {report['teacher']['ffn_dims'][i]} |"
        )
    lines += [
        "",
        "CNN channels kept: "
        + ", ".join(f"{k}/{o}" for k, o in zip(s["conv_channels"], report["teacher"]["conv_channels"])),
        "",
        "![architecture](architecture.png)",
        "",
        "![training](training.png)",
        "",
    ]
    return "\n".join(lines)


def terminal(report: Dict[str, Any]) -> str:
    s, t = report["student"], report["teacher"]
    lines = [
        f"teacher {t['params']:,} parameters -> student {s['params']:,} "
        f"(target sparsity {report['target_sparsity']:.4f}, about {target_params(report):,} parameters; "
        f"reached {s['sparsity']:.4f})",
        f"MACs of a {s['macs_seconds']:g} s utterance: teacher {t['macs']:,} -> student {s['macs']:,} "
        f"({s['macs'] / t['macs']:.1%})",
        f"forward on {report['timing']['audio_seconds']:.0f} s of audio: teacher "
        f"{report['timing']['teacher_seconds'] * 1000:.1f} ms, "
        f"student {report['timing']['student_seconds'] * 1000:.1f} ms",
        f"final distillation loss {report['final_distill_loss']:.4f}",
        "layer  heads      ffn units",
    ]
    for i, (h, f) in enumerate(zip(s["heads"], s["ffn_dims"])):
        lines.append(f"{i + 1:>5}  {h:>2}/{t['heads'][i]:<2}     {f:>4}/{t['ffn_dims'][i]}")
    lines.append(
        "conv channels: " + " ".join(f"{k}/{o}" for k, o in zip(s["conv_channels"], t["conv_channels"]))
    )
    return "\n".join(lines)


def figures(report: Dict[str, Any], curve: List[Dict[str, float]], folder: str) -> List[str]:
    """architecture.png (kept vs original per layer) and training.png (expected and eval-mask sparsity vs
    target, and the distillation loss, over the stage-1 updates)."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's imports leave the root at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, t = report["student"], report["teacher"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in ((axes[0], "heads", "attention heads"), (axes[1], "ffn_dims", "FFN units")):
        layers = range(1, len(t[key]) + 1)
        ax.bar(layers, t[key], color="#d9d9d9", label="teacher")
        ax.bar(layers, s[key], color="#3b75af", label="kept")
        ax.set_xlabel("transformer layer")
        ax.set_title(title)
        ax.legend()
    layers = range(1, len(t["conv_channels"]) + 1)
    axes[2].bar(layers, t["conv_channels"], color="#d9d9d9", label="teacher")
    axes[2].bar(layers, s["conv_channels"], color="#3b75af", label="kept")
    axes[2].set_xlabel("CNN layer")
    axes[2].set_title("conv channels")
    axes[2].legend()
    fig.suptitle(f"pruned architecture: {s['params']:,} of {t['params']:,} parameters")
    fig.tight_layout()
    arch = os.path.join(folder, "architecture.png")
    fig.savefig(arch, dpi=110)
    plt.close(fig)

    fig, left = plt.subplots(figsize=(8, 4.5))
    updates = [c["update"] for c in curve]
    left.plot(updates, [c["expected_sparsity"] for c in curve], label="expected sparsity", color="#3b75af")
    left.plot(
        updates,
        [c["eval_sparsity"] for c in curve],
        label="eval-mask sparsity (what an export keeps)",
        color="#55a868",
    )
    left.plot(
        updates, [c["target_sparsity"] for c in curve], "--", label="target", color="#3b75af", alpha=0.6
    )
    left.set_xlabel("stage-1 update")
    left.set_ylabel("sparsity")
    right = left.twinx()
    right.plot(updates, [c["distill_loss"] for c in curve], label="distillation loss", color="#c44e52")
    right.set_ylabel("distillation loss")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, loc="center right")
    left.set_title("stage 1: distillation and pruning")
    fig.tight_layout()
    training = os.path.join(folder, "training.png")
    fig.savefig(training, dpi=110)
    plt.close(fig)
    return [arch, training]


def write(report: Dict[str, Any], curve: List[Dict[str, float]], folder: str) -> List[str]:
    paths = figures(report, curve, folder)
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump({**report, "stage1_curve": curve}, f, indent=2)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(markdown(report))
    return [os.path.join(folder, "report.md"), os.path.join(folder, "report.json"), *paths]
