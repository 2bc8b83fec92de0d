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


def uniform_text(report: Dict[str, Any]) -> str:
    """What the uniform column is."""
    u = report.get("uniform")
    if not u:
        return "No uniform cut of the teacher (the same heads and FFN units in every layer) is that small."
    return (
        f"Uniform: what a uniform cut of the teacher to the pruned student's size keeps ({u['params']:,} "
        "parameters): the same heads and FFN units in every layer, every conv channel (the arithmetic of the "
        "comparison's uniformly thinned student, examples/comparison/students.py)."
    )


def _uniform(report: Dict[str, Any], key: str, i: int) -> str:
    u = report.get("uniform")
    return f"{u[key][i]}" if u else "-"


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
        uniform_text(report),
        "",
        "| layer | heads kept | uniform heads | FFN units kept | uniform FFN units |",
        "|---|---|---|---|---|",
    ]
    t = report["teacher"]
    for i, (h, f) in enumerate(zip(s["heads"], s["ffn_dims"])):
        lines.append(
            f"| {i + 1} | {h} / {t['heads'][i]} | {_uniform(report, 'heads', i)} | {f} / {t['ffn_dims'][i]} | "
            f"{_uniform(report, 'ffn_dims', i)} |"
        )
    lines += [
        "",
        "| conv layer | channels kept | uniform channels |",
        "|---|---|---|",
        *(
            f"| {i + 1} | {k} / {o} | {_uniform(report, 'conv_channels', i)} |"
            for i, (k, o) in enumerate(zip(s["conv_channels"], t["conv_channels"]))
        ),
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
        uniform_text(report),
        "layer  heads  uniform  ffn units  uniform",
    ]
    for i, (h, f) in enumerate(zip(s["heads"], s["ffn_dims"])):
        heads, ffn = f"{h}/{t['heads'][i]}", f"{f}/{t['ffn_dims'][i]}"
        lines.append(
            f"{i + 1:>5}  {heads:>5}  {_uniform(report, 'heads', i):>7}  {ffn:>9}  "
            f"{_uniform(report, 'ffn_dims', i):>7}"
        )
    lines.append("conv layer  channels  uniform")
    for i, (k, o) in enumerate(zip(s["conv_channels"], t["conv_channels"])):
        channels = f"{k}/{o}"
        lines.append(f"{i + 1:>10}  {channels:>8}  {_uniform(report, 'conv_channels', i):>7}")
    return "\n".join(lines)


def figures(report: Dict[str, Any], curve: List[Dict[str, float]], folder: str) -> List[str]:
    """architecture.png (kept vs original per layer) and training.png (expected and eval-mask sparsity vs
    target, and the distillation loss, over the stage-1 updates)."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's imports leave the root at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, t, u = report["student"], report["teacher"], report.get("uniform")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        (axes[0], "heads", "attention heads", "transformer layer"),
        (axes[1], "ffn_dims", "FFN units", "transformer layer"),
        (axes[2], "conv_channels", "conv channels", "CNN layer"),
    )
    for ax, key, title, xlabel in panels:
        layers = range(1, len(t[key]) + 1)
        ax.bar(layers, t[key], color="#d9d9d9", label="teacher")
        ax.bar(layers, s[key], color="#3b75af", label="kept")
        if u:
            ax.plot(layers, u[key], "k.-", label="uniform cut, same size")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.legend()
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
