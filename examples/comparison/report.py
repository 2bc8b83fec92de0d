"""The comparison's report: per model kind, the mean and spread over seeds of every measure; a Markdown table,
the JSON of every run, a figure, plain statements of which differences are outside the seed-to-seed noise,
and what DPHuBERT's gates kept (``structure``)."""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import structure as learned

LABELS = {
    "teacher": "teacher (upper line)",
    "dphubert": "DPHuBERT (stage 1 + 2)",
    "dphubert_long_ramp": "DPHuBERT, long ramp (2/3 of stage 1), stage 2 1/3 of stage 1",
    "dphubert_importance_init": "DPHuBERT, gates started from unit importance (option)",
    "distilhubert": "DistilHuBERT-style (2 layers + heads)",
    "uniform": "uniformly thinned (magnitude)",
    "random_structure": "DPHuBERT structure, random init",
    "largest_in_structure": "DPHuBERT structure, teacher's largest units, trained as the baselines",
    "largest_in_structure_stage2": "DPHuBERT structure, teacher's largest units, trained as its stage 2",
    "dphubert_10pct": "DPHuBERT, 10% of the audio",
    "distilhubert_10pct": "DistilHuBERT-style, 10% of the audio",
    "mfcc": "MFCC (probes only)",
}
#: the phoneme probe's measures (``ctc_probe.phoneme_recognition``), lower is better
PER_KEYS = ("per", "per_held_out_voices", "per_train_voices")
#: the teacher must beat MFCCs on PER by this much (absolute, mean over probe seeds) for the probe to mean
#: anything: otherwise it measures acoustic detail passed through, not what the teacher learned
PER_MARGIN = 0.05
ORDER = list(LABELS)
STRUCTURE_FIGURE = "structure.png"
#: pairs compared in the statements: (DPHuBERT variant, baseline), and the recipe's proportions against the long ramp
PAIRS = [
    ("dphubert", "dphubert_long_ramp"),
    ("dphubert", "distilhubert"),
    ("dphubert", "uniform"),
    ("dphubert", "random_structure"),
    ("dphubert_10pct", "distilhubert_10pct"),
    ("dphubert_importance_init", "dphubert"),
]
#: the ablations, one step each from DPHuBERT to the uniform student: (from, to, what the step changes)
ABLATION_STEPS = [
    (
        "dphubert",
        "largest_in_structure_stage2",
        "the weights kept: the units and weights DPHuBERT's stage 1 gave, or the teacher's units of largest "
        "magnitude, in the same structure with the same training after it (DPHuBERT's stage 2)",
    ),
    (
        "largest_in_structure_stage2",
        "largest_in_structure",
        "the training after the structure settles: DPHuBERT's stage 2 (a third of the budget at half the "
        "learning rate), or the whole budget as the baselines train",
    ),
    (
        "largest_in_structure",
        "uniform",
        "the structure: DPHuBERT's per-layer sizes, or the same sizes in every layer, with the same selection "
        "rule and training",
    ),
]


def measure_values(row: Dict, layers: Sequence[int]) -> Dict[str, float]:
    """The scalar measures of one row (absent ones left out)."""
    out = {}
    for key in ("params", "macs", "cpu_seconds", "train_seconds"):
        if key in row:
            out[key] = float(row[key])
    for layer in layers:
        if "layers" in row:
            out[f"cos@{layer}"] = row["layers"][str(layer)]["cos"]
            out[f"l1@{layer}"] = row["layers"][str(layer)]["l1"]
    for probe in ("keyword", "speaker"):
        out[f"{probe}_accuracy"] = row["probes"][probe]["accuracy"]
    for key in PER_KEYS if "phonemes" in row else ():
        out[key] = row["phonemes"][key]
    return out


def resolutions(rows: List[Dict]) -> Dict[str, float]:
    """The smallest step each probe's accuracy can take: one test item."""
    return {
        f"{probe}_accuracy": 1.0 / max(row["probes"][probe]["test_items"] for row in rows)
        for probe in ("keyword", "speaker")
    }


def aggregate(rows: List[Dict], layers: Sequence[int]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{kind: {measure: {mean, std, min, max, n}}}``; std is the sample standard deviation over seeds (0 for
    one run)."""
    by_kind: Dict[str, List[Dict[str, float]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(measure_values(row, layers))
    out = {}
    for kind, values in by_kind.items():
        out[kind] = {}
        for key in values[0]:
            xs = np.array([v[key] for v in values])
            out[kind][key] = {
                "mean": float(xs.mean()),
                "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0,
                "min": float(xs.min()),
                "max": float(xs.max()),
                "n": int(len(xs)),
            }
    return out


def statements(
    summary: Dict, layers: Sequence[int], resolution: Optional[Dict[str, float]] = None
) -> List[str]:
    """For each pair and measure: the difference of the means, and whether it is larger than the two kinds'
    standard deviations together and than the measure's ``resolution`` (a probe's one test item): outside
    the noise, or not."""
    resolution = resolution or {}
    lines = []
    measures = ["keyword_accuracy", "speaker_accuracy"] + [f"cos@{layer}" for layer in layers]
    measures = [key for key in PER_KEYS[:2] if key in summary.get("dphubert", {})] + measures
    for ours, other in PAIRS:
        if ours not in summary or other not in summary:
            continue
        parts = []
        for key in measures:
            a, b = summary[ours][key], summary[other][key]
            diff = a["mean"] - b["mean"]
            if min(a["n"], b["n"]) < 2:
                verdict = "one seed, no spread to judge"
            elif abs(diff) > max(a["std"] + b["std"], resolution.get(key, 0.0)):
                verdict = "outside the noise"
            else:
                verdict = "inside the noise"
            parts.append(f"{key} {diff:+.3f} ({verdict})")
        lines.append(f"- {LABELS[ours]} minus {LABELS[other]}: " + "; ".join(parts))
    return lines


def last_cos(stats: Dict) -> Optional[str]:
    """The key of the cosine similarity at the deepest target layer in one kind's summary (None: none)."""
    layers = [int(key.split("@")[1]) for key in stats if key.startswith("cos@")]
    return f"cos@{max(layers)}" if layers else None


def ablation_lines(summary: Dict) -> List[str]:
    """The ablation steps (``ABLATION_STEPS``) present in ``summary``: each step's change of the mean PER and
    of the cosine at the deepest target layer, outside the noise when larger than the two kinds' standard
    deviations together; the steps add up to the uniform student's value minus DPHuBERT's."""
    lines = []
    for a, b, text in ABLATION_STEPS:
        if a not in summary or b not in summary or "per" not in summary[a]:
            continue
        parts = []
        for key, name in (("per", "PER"), (last_cos(summary[a]), last_cos(summary[a]))):
            if key is None:
                continue
            x, y = summary[a][key], summary[b][key]
            diff, noise = y["mean"] - x["mean"], x["std"] + y["std"]
            verdict = (
                "one seed" if min(x["n"], y["n"]) < 2 else ("outside" if abs(diff) > noise else "inside")
            )
            parts.append(
                f"{name} {x['mean']:.3f} -> {y['mean']:.3f} ({diff:+.3f}; {verdict} the noise of {noise:.3f})"
            )
        lines.append(f"- {text}: " + "; ".join(parts))
    if not lines:
        return []
    return [
        "",
        "## Where DPHuBERT gains or loses: the ablations",
        "",
        "One step at a time from DPHuBERT to the uniform student, each seed's ablations built from that seed's "
        "DPHuBERT structure (PER: lower is better; cosine to the teacher: higher is better):",
        "",
        *lines,
    ]


def students_text(result: Dict) -> str:
    """How the students spent their updates: ``result['schedules']``, or (results written before it was
    recorded) the size's two DPHuBERT stages."""
    size = result["size"]
    head = f"Students: target sparsity {size['target_sparsity']}; "
    tail = f"; {size['seeds']} seed(s) each (mean ± sample standard deviation)."
    schedules = result.get("schedules")
    if not schedules:
        total = size["stage1_updates"] + size["stage2_updates"]
        return (
            head + f"DPHuBERT {size['stage1_updates']} stage-1 + {size['stage2_updates']} stage-2 updates, "
            f"every baseline {total} updates on the same audio" + tail
        )
    totals = {s["stage1"] + s["stage2"] for s in schedules.values()}
    parts = [f"every student {' / '.join(map(str, sorted(totals)))} updates on the same audio"]
    for kind, s in schedules.items():
        if s["stage1"]:
            parts.append(
                f"{LABELS[kind]}: {s['stage1']} stage-1 updates (the target ramped over the first {s['ramp']}) "
                f"+ {s['stage2']} stage-2, {s['proportions']}"
            )
    return head + "; ".join(parts) + tail


def per_validity(summary: Dict) -> List[str]:
    """Whether the phoneme probe can tell models apart: the teacher's PER against MFCCs' (over probe seeds),
    overall and on voices no model heard; empty for results without the probe."""
    if "per" not in summary.get("teacher", {}) or "per" not in summary.get("mfcc", {}):
        return []
    t, m = summary["teacher"], summary["mfcc"]
    margin = m["per"]["mean"] - t["per"]["mean"]
    voices = m["per_held_out_voices"]["mean"] - t["per_held_out_voices"]["mean"]
    verdict = (
        "the probe needs what the teacher learned, so its PER can rank the students"
        if margin >= PER_MARGIN
        else f"below the {PER_MARGIN:.2f} it needs: the PER column cannot rank the students"
    )
    return [
        f"Phoneme probe (a linear CTC head on the frozen model's frames, layers combined by learned softmax "
        f"weights, as SUPERB's PR; espeak-ng's phonemes; PER on held-out sentences): the teacher "
        f"{_cell(t['per'], '.3f')} against MFCCs {_cell(m['per'], '.3f')} over {t['per']['n']} probe seeds, "
        f"a margin of {margin:.3f} ({voices:.3f} on the new voices): {verdict}."
    ]


def _cell(stat: Optional[Dict[str, float]], fmt: str, scale: float = 1.0) -> str:
    if stat is None:
        return ""
    text = format(stat["mean"] * scale, fmt)
    return text + (f" ± {format(stat['std'] * scale, fmt)}" if stat["n"] > 1 else "")


def markdown(result: Dict, summary: Dict) -> str:
    layers = result["target_layers"]
    t = result["teacher"]
    lines = [
        "# DPHuBERT against its baselines, at one parameter count",
        "",
        f"`{result['command']}`, commit `{result['commit']}`, {result['date']}; wall time "
        f"{result['wall_seconds'] / 60:.0f} min ({result['jobs']} fairseq runs at a time)"
        + (
            f"; this report rendered from its results.json by commit `{result['report_commit']}`."
            if result.get("report_commit")
            else "."
        ),
        "",
        f"Data: {result['data']}.",
        f"Teacher: a 12-layer HuBERT (width {t['shape']['dim']}, {t['shape']['heads']} heads, FFN {t['shape']['ffn']}) "
        f"pretrained by stock fairseq for {t['updates']} updates: validation loss {t['loss_bits']:.3f} bits per "
        f"frame (masked frames {t['masked_bits']:.3f}, unmasked {t['unmasked_bits']:.3f}) against "
        f"{t['prior_bits']:.3f} for predicting the label prior; accuracy on masked frames "
        f"{t['masked_accuracy']:.3f} against {t['prior_accuracy']:.3f} for the most frequent label.",
        students_text(result),
        "",
        "| model | parameters | MACs, 10 s | CPU ms, 10 s | "
        + " | ".join(f"cos@{layer}" for layer in layers)
        + " | "
        + " | ".join(f"L1@{layer}" for layer in layers)
        + " | PER | PER, new voices | keyword acc. | speaker acc. |",
        "|---" * (8 + 2 * len(layers)) + "|",
    ]
    for kind in ORDER:
        if kind not in summary:
            continue
        s = summary[kind]
        cells = [
            LABELS[kind],
            _cell(s.get("params"), ",.0f"),
            _cell(s.get("macs"), ".1f", 1e-6) + ("M" if "macs" in s else ""),
            _cell(s.get("cpu_seconds"), ".1f", 1e3),
            *[_cell(s.get(f"cos@{layer}"), ".3f") for layer in layers],
            *[_cell(s.get(f"l1@{layer}"), ".3f") for layer in layers],
            _cell(s.get("per"), ".3f"),
            _cell(s.get("per_held_out_voices"), ".3f"),
            _cell(s["keyword_accuracy"], ".3f"),
            _cell(s["speaker_accuracy"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *per_validity(summary)]
    lines += [
        "",
        "Differences of the means (DPHuBERT variant minus baseline, or the recipe's proportions minus the long "
        "ramp); outside the noise when larger than the two "
        "standard deviations added and, for a probe, than one test item "
        + ", ".join(
            f"{key.split('_')[0]} {r:.3f} ({1 / r:.0f} items)" for key, r in result["resolution"].items()
        )
        + ":",
        "",
        *result["statements"],
        "",
        "![comparison](comparison.png)",
        "",
    ]
    lines += ablation_lines(summary)
    if result.get("structure"):
        lines += ["", *learned.markdown(result["structure"], LABELS, STRUCTURE_FIGURE)]
    return "\n".join(lines)


def figure(summary: Dict, layers: Sequence[int], path: str) -> None:
    logging.getLogger("matplotlib").setLevel(
        logging.WARNING
    )  # fairseq's logging setup lets its DEBUG through
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ORDER if k in summary]
    panels = [("per", "phone error rate, held-out sentences", "PER probe (lower is better)")] * (
        any("per" in summary[k] for k in kinds)
    )
    panels += [(f"{p}_accuracy", "accuracy on held-out items", f"{p} probe") for p in ("keyword", "speaker")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 5.5))
    for ax, (key, ylabel, title) in zip(axes, panels):
        shown = [k for k in kinds if key in summary[k]]
        stats = [summary[k][key] for k in shown]
        ax.bar(range(len(shown)), [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=3)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([LABELS[k] for k in shown], rotation=40, ha="right", fontsize=6)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (mean ± std over seeds)", fontsize=9)
        if key != "per":
            ax.set_ylim(0, 1)
    ax = axes[-1]
    for kind in kinds:
        if f"cos@{layers[0]}" not in summary[kind] or kind == "teacher":
            continue
        stats = [summary[kind][f"cos@{layer}"] for layer in layers]
        ax.errorbar(
            layers,
            [s["mean"] for s in stats],
            yerr=[s["std"] for s in stats],
            capsize=3,
            marker="o",
            label=LABELS[kind],
        )
    ax.set_xticks(list(layers))
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("cosine similarity to the teacher")
    ax.set_title("layer similarity, held-out audio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Dict, folder: str) -> List[str]:
    """``results.json`` (every run and the summary), ``results.md`` and ``comparison.png`` in ``folder``, and
    ``structure.png`` when the result has a ``structure`` section."""
    layers = result["target_layers"]
    summary = aggregate(result["rows"], layers)
    resolution = resolutions(result["rows"])
    result = dict(
        result, summary=summary, resolution=resolution, statements=statements(summary, layers, resolution)
    )
    paths = [os.path.join(folder, name) for name in ("results.json", "results.md", "comparison.png")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown(result, summary))
    figure(summary, layers, paths[2])
    if result.get("structure"):
        paths.append(os.path.join(folder, STRUCTURE_FIGURE))
        learned.figure(result["structure"], LABELS, paths[-1])
    return paths
