"""What DPHuBERT's gates learned: per DPHuBERT seed, the heads, FFN units and conv channels its stage 1 kept in
every layer, and whether the seeds keep the same units or different ones.

The sizes are read from the stage-1 export's config; which units were kept is not in it, so the kept sets are
read from the stage-1 training checkpoint's gates (their deterministic eval masks, what the export folds: a
unit is kept where its mask is non-zero). Two seeds' kept sets are compared with the Jaccard index
``|A & B| / |A | B|`` per layer, next to its expectation for random sets of the same sizes. Every seed starts
from the same teacher weights, so unit ``i`` of a layer is the same unit in every seed.

Everything here is JSON-able (the comparison's ``results.json`` holds it under ``structure``); the report
renders a table and a figure from it alone.
"""

import itertools
import logging
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Set

import numpy as np

#: the kinds of unit, in the table's order, and their names in the report
UNITS = ("heads", "ffn_units", "conv_channels")
UNIT_TEXT = {"heads": "attention heads", "ffn_units": "FFN units", "conv_channels": "conv channels"}

Sizes = Dict[str, List[int]]


def sizes(model) -> Sizes:
    """Per layer, the heads and FFN units of a ``dphubert`` model's config (0 where a block is removed), and
    per conv layer its channels."""
    from dphubert_fairseq.conv_spec import parse_conv_layers

    cfg = model.cfg
    return {
        "heads": [int(h) if u else 0 for h, u in zip(cfg.encoder_attention_heads, cfg.use_attention)],
        "ffn_units": [int(f) if u else 0 for f, u in zip(cfg.encoder_ffn_embed_dims, cfg.use_ffn)],
        "conv_channels": [c for c, _, _ in parse_conv_layers(cfg.conv_feature_layers)],
    }


def exported_sizes(path: str) -> Sizes:
    """``sizes`` of an exported (or built) model file."""
    from dphubert_fairseq import load_model

    return sizes(load_model(path))


def _kept(gate, n: int, block_gate=None) -> List[int]:
    """Units ``0..n-1`` whose eval mask is non-zero (all of them without a gate); none when ``block_gate``,
    the whole block's gate, is closed."""
    if block_gate is not None and float(block_gate.deterministic_mask()[0]) == 0.0:
        return []
    if gate is None:
        return list(range(n))
    return [int(i) for i in np.flatnonzero(gate.deterministic_mask().numpy() > 0)]


def kept_units(model) -> Dict[str, List[List[int]]]:
    """The units a gated ``dphubert`` model keeps, as ``prune`` keeps them: per layer the kept heads and FFN
    units, per conv layer the kept channels (indices)."""
    heads, ffn = [], []
    for layer in model.encoder.layers:
        attn, block = layer.self_attn, layer.ffn
        heads.append([] if attn is None else _kept(attn.head_gate, attn.num_heads, attn.layer_gate))
        ffn.append([] if block is None else _kept(block.unit_gate, block.ffn_dim, block.layer_gate))
    conv = [_kept(b.gate, b.out_channels) for b in model.feature_extractor.blocks]
    return {"heads": heads, "ffn_units": ffn, "conv_channels": conv}


def kept_units_of_checkpoint(path: str) -> Dict[str, List[List[int]]]:
    """``kept_units`` of the gated model in a stage-1 training checkpoint."""
    from dphubert_fairseq.export import model_from_training_checkpoint

    model, _ = model_from_training_checkpoint(path)
    return kept_units(model)


def as_bits(kept: Sequence[int], n: int) -> str:
    """A kept set of units ``0..n-1`` as a string of ``n`` '0'/'1' (compact in JSON)."""
    chosen = set(kept)
    return "".join("1" if i in chosen else "0" for i in range(n))


def from_bits(bits: str) -> Set[int]:
    return {i for i, b in enumerate(bits) if b == "1"}


def seed_record(training_checkpoint: str, exported: str) -> Dict[str, object]:
    """One DPHuBERT seed's stage 1: the sizes of its export, its kept sets (``as_bits`` per layer, the length
    the teacher's unit count), and whether the kept sets' sizes are the export's."""
    from dphubert_fairseq.export import model_from_training_checkpoint

    model, _ = model_from_training_checkpoint(training_checkpoint)
    kept = kept_units(model)
    full = sizes(model)  # the gated model's config: the teacher's sizes
    exported_ = exported_sizes(exported)
    counts = {unit: [len(k) for k in kept[unit]] for unit in UNITS}
    return {
        "sizes": exported_,
        "kept": {unit: [as_bits(k, n) for k, n in zip(kept[unit], full[unit])] for unit in UNITS},
        "kept_sets_match_export": counts == exported_,
    }


def jaccard(a: Set[int], b: Set[int]) -> float:
    """``|a & b| / |a | b|``; 1 for two empty sets (they are the same)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def chance_jaccard(n: int, a: int, b: int) -> float:
    """The expected Jaccard index of two independent random subsets of ``n`` units of sizes ``a`` and ``b``:
    their intersection ``k`` is hypergeometric, ``P(k) = C(a, k) C(n - a, b - k) / C(n, b)``."""
    if a + b == 0:
        return 1.0
    total = math.comb(n, b)
    return sum(
        math.comb(a, k) * math.comb(n - a, b - k) / total * k / (a + b - k)
        for k in range(max(0, a + b - n), min(a, b) + 1)
    )


def overlap(kept: Sequence[Mapping[str, List[str]]]) -> Dict[str, Dict[str, object]]:
    """Per kind of unit, over every pair of seeds (``kept``: their ``kept`` records) and every layer: the mean
    Jaccard index and the mean chance expectation (and both per layer). None with fewer than two seeds."""
    pairs = list(itertools.combinations(kept, 2))
    out = {}
    for unit in UNITS:
        if not pairs:
            out[unit] = {"pairs": 0, "jaccard": None, "chance": None, "per_layer": []}
            continue
        per_layer = []
        for layer in range(len(kept[0][unit])):
            values, chances = [], []
            for first, second in pairs:
                a, b = from_bits(first[unit][layer]), from_bits(second[unit][layer])
                values.append(jaccard(a, b))
                chances.append(chance_jaccard(len(first[unit][layer]), len(a), len(b)))
            per_layer.append({"jaccard": float(np.mean(values)), "chance": float(np.mean(chances))})
        out[unit] = {
            "pairs": len(pairs),
            "jaccard": float(np.mean([v["jaccard"] for v in per_layer])),
            "chance": float(np.mean([v["chance"] for v in per_layer])),
            "per_layer": per_layer,
        }
    return out


def spread(per_seed: Sequence[Sizes]) -> Dict[str, Dict[str, List[float]]]:
    """Per kind of unit and layer: mean, sample standard deviation (0 for one seed), min and max over seeds."""
    out = {}
    for unit in UNITS:
        xs = np.array([s[unit] for s in per_seed], dtype=float)
        out[unit] = {
            "mean": xs.mean(0).tolist(),
            "std": (xs.std(0, ddof=1) if len(xs) > 1 else np.zeros(xs.shape[1])).tolist(),
            "min": xs.min(0).tolist(),
            "max": xs.max(0).tolist(),
        }
    return out


def summarize(
    records: Mapping[str, Mapping[str, Dict[str, object]]], teacher: Sizes, uniform: Optional[Sizes]
) -> Dict[str, object]:
    """The ``structure`` section: ``records`` is ``{kind: {seed: seed_record}}``; ``teacher`` and ``uniform``
    (the uniformly thinned student, None when it was not built) are ``sizes``."""
    kinds = {}
    for kind, seeds in records.items():
        ordered = [seeds[s] for s in sorted(seeds, key=int)]
        kinds[kind] = {
            "seeds": {str(s): seeds[s] for s in sorted(seeds, key=int)},
            "spread": spread([r["sizes"] for r in ordered]),
            "overlap": overlap([r["kept"] for r in ordered]),
            "kept_sets_match_export": all(r["kept_sets_match_export"] for r in ordered),
        }
    return {"teacher": teacher, "uniform": uniform, "kinds": kinds}


def _total(per_seed: Sequence[Sizes], unit: str) -> str:
    """The units of one kind summed over layers: mean ± std over seeds."""
    totals = [sum(s[unit]) for s in per_seed]
    text = f"{np.mean(totals):,.0f}"
    return text + (f" ± {np.std(totals, ddof=1):,.0f}" if len(totals) > 1 else "")


def _overlap_cell(value: Dict[str, object]) -> str:
    if not value["pairs"]:
        return "one seed"
    return f"{value['jaccard']:.2f} ({value['chance']:.2f})"


def markdown(structure: Dict[str, object], labels: Mapping[str, str], figure: str) -> List[str]:
    """The report's section: kept units summed over layers per model, the seeds' overlap, the figure."""
    teacher, uniform = structure["teacher"], structure["uniform"]
    lines = [
        "## What the gates learned",
        "",
        "Units kept by DPHuBERT's stage 1 (its export; summed over layers, mean ± std over seeds), and how "
        "much two seeds' kept sets overlap: the Jaccard index |A ∩ B| / |A ∪ B| of the kept units, averaged "
        "over layers and seed pairs, with in brackets its expectation for random sets of the same sizes "
        "(what it would be if the seeds chose at random). Per layer in the figure.",
        "",
        "| model | "
        + " | ".join(UNIT_TEXT[u] for u in UNITS)
        + " | "
        + " | ".join(f"{UNIT_TEXT[u]}: overlap (chance)" for u in UNITS)
        + " |",
        "|---" * (1 + 2 * len(UNITS)) + "|",
        "| teacher | " + " | ".join(f"{sum(teacher[u]):,}" for u in UNITS) + " |" + " |" * len(UNITS),
    ]
    if uniform:
        lines.append(
            f"| {labels.get('uniform', 'uniform')} | "
            + " | ".join(f"{sum(uniform[u]):,}" for u in UNITS)
            + " |"
            + " |" * len(UNITS)
        )
    for kind, data in structure["kinds"].items():
        per_seed = [r["sizes"] for r in data["seeds"].values()]
        cells = [_total(per_seed, u) for u in UNITS]
        cells += [_overlap_cell(data["overlap"][u]) for u in UNITS]
        lines.append(f"| {labels.get(kind, kind)} | " + " | ".join(cells) + " |")
    if not all(d["kept_sets_match_export"] for d in structure["kinds"].values()):
        lines += ["", "WARNING: some kept sets read from the gates differ in size from their export."]
    lines += ["", f"![structure]({figure})", ""]
    return lines


def figure(structure: Dict[str, object], labels: Mapping[str, str], path: str) -> None:
    """Per layer, the heads and FFN units each DPHuBERT kind kept (bars: mean over seeds, whiskers: min to
    max) against the teacher's (grey) and the uniformly thinned student's (black line); per conv layer, the
    channels."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(
        logging.WARNING
    )  # fairseq's logging setup lets its DEBUG through
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, uniform, kinds = structure["teacher"], structure["uniform"], structure["kinds"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    width = 0.8 / max(1, len(kinds))
    for ax, unit in zip(axes, UNITS):
        positions = np.arange(1, len(teacher[unit]) + 1)
        ax.bar(positions, teacher[unit], width=0.9, color="#e3e3e3", label="teacher")
        for i, (kind, data) in enumerate(kinds.items()):
            stat = data["spread"][unit]
            mean = np.array(stat["mean"])
            whiskers = [mean - np.array(stat["min"]), np.array(stat["max"]) - mean]
            ax.bar(
                positions - 0.4 + width * (i + 0.5),
                mean,
                width=width,
                yerr=whiskers,
                capsize=2,
                label=f"{labels.get(kind, kind)} ({len(data['seeds'])} seed(s))",
            )
        if uniform:
            ax.plot(positions, uniform[unit], "k.-", label=labels.get("uniform", "uniform"))
        ax.set_xticks(positions)
        ax.set_xlabel("conv layer" if unit == "conv_channels" else "transformer layer")
        ax.set_title(f"{UNIT_TEXT[unit]} kept (mean, min to max over seeds)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
