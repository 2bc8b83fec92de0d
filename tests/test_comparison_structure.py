"""What the comparison reads of DPHuBERT's learned structure (``examples/comparison/structure.py``): the kept
units of a gated student are the ones its export keeps, per layer and by index; the overlap of two kept sets
and its chance level; the section of the report."""

import json

import pytest
import torch
from helpers import randomise_gates

import dphubert_fairseq as dp
from dphubert_fairseq.conv_spec import parse_conv_layers
from dphubert_fairseq.export import export
from examples.comparison import report, structure

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")


@pytest.fixture(scope="module")
def stage1(tiny_teachers, tmp_path_factory):
    """A gated student with random gates saved as a stage-1 training checkpoint, and its export."""
    folder = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    gated = randomise_gates(dp.student_from_teacher(tiny_teachers["hubert_base"], prune_units=ALL_UNITS))
    training = dp.save_model(gated, str(folder / "checkpoint_last.pt"))
    exported = str(folder / "stage1.pt")
    export(training, exported)
    return gated.eval(), training, exported


def test_the_sizes_read_are_the_exported_configs(stage1):
    _, training, exported = stage1
    record = structure.seed_record(training, exported)
    cfg = dp.load_model(exported).cfg
    assert record["sizes"] == {
        "heads": [h if u else 0 for h, u in zip(cfg.encoder_attention_heads, cfg.use_attention)],
        "ffn_units": [f if u else 0 for f, u in zip(cfg.encoder_ffn_embed_dims, cfg.use_ffn)],
        "conv_channels": [c for c, _, _ in parse_conv_layers(cfg.conv_feature_layers)],
    }
    # the kept sets read from the gates have the export's sizes, and the teacher's unit count as length
    assert record["kept_sets_match_export"]
    for unit in structure.UNITS:
        assert [bits.count("1") for bits in record["kept"][unit]] == record["sizes"][unit]
    assert [len(bits) for bits in record["kept"]["heads"]] == [4, 4, 4]
    # the corner cases happened: no heads in layer 0, layer 2's attention block and layer 0's FFN removed,
    # conv channels removed
    assert record["sizes"]["heads"][0] == 0 and record["sizes"]["heads"][2] == 0
    assert record["sizes"]["ffn_units"][0] == 0 and not cfg.use_attention[2]
    assert sum(record["sizes"]["conv_channels"]) < 7 * 24
    assert json.loads(json.dumps(record)) == record


def test_the_kept_units_are_the_ones_the_export_keeps(stage1):
    gated, training, exported = stage1
    kept = structure.kept_units_of_checkpoint(training)
    assert kept == structure.kept_units(gated)
    pruned = dp.load_model(exported)
    d = gated.cfg.attention_head_dim
    for i, layer in enumerate(pruned.encoder.layers):
        source = gated.encoder.layers[i]
        if kept["heads"][i]:
            rows = torch.tensor([h * d + j for h in kept["heads"][i] for j in range(d)])
            assert torch.equal(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight[rows])
        if kept["ffn_units"][i]:
            units = torch.tensor(kept["ffn_units"][i])
            assert torch.equal(layer.ffn.fc1.weight, source.ffn.fc1.weight[units])
    channels = torch.tensor(kept["conv_channels"][0])
    assert torch.equal(
        pruned.feature_extractor.blocks[0].conv.weight,
        gated.feature_extractor.blocks[0].conv.weight[channels],
    )


def test_jaccard_and_its_chance_level():
    assert structure.jaccard({1, 2, 5}, {1, 2, 5}) == 1.0
    assert structure.jaccard({0, 1}, {2, 3}) == 0.0
    assert structure.jaccard(set(), set()) == 1.0
    assert structure.jaccard({0, 1, 2}, {1, 2, 3}) == pytest.approx(2 / 4)
    # two random pairs of 4 units: the intersection is 0, 1 or 2 units with probabilities 1/6, 4/6, 1/6
    assert structure.chance_jaccard(4, 2, 2) == pytest.approx(4 / 6 * 1 / 3 + 1 / 6)
    assert structure.chance_jaccard(4, 3, 3) == pytest.approx(3 / 4 * 2 / 4 + 1 / 4)
    assert structure.chance_jaccard(8, 8, 8) == 1.0 and structure.chance_jaccard(8, 0, 3) == 0.0
    rng = torch.Generator().manual_seed(0)
    draws = [
        structure.jaccard(
            set(torch.randperm(40, generator=rng)[:9].tolist()),
            set(torch.randperm(40, generator=rng)[:15].tolist()),
        )
        for _ in range(20000)
    ]
    assert sum(draws) / len(draws) == pytest.approx(structure.chance_jaccard(40, 9, 15), abs=0.005)


def _record(heads, ffn, conv, n_heads=4, n_ffn=8, n_conv=6):
    kept = {"heads": heads, "ffn_units": ffn, "conv_channels": conv}
    full = {"heads": n_heads, "ffn_units": n_ffn, "conv_channels": n_conv}
    return {
        "sizes": {u: [len(k) for k in kept[u]] for u in structure.UNITS},
        "kept": {u: [structure.as_bits(k, full[u]) for k in kept[u]] for u in structure.UNITS},
        "kept_sets_match_export": True,
    }


def test_summary_overlap_and_report_section(tmp_path):
    same = _record([[0, 1], [2]], [[0, 1, 2], [5]], [[0, 1, 2]])
    other = _record([[2, 3], [2]], [[0, 1, 2], [6]], [[3, 4, 5]])
    teacher = {"heads": [4, 4], "ffn_units": [8, 8], "conv_channels": [6]}
    uniform = {"heads": [2, 2], "ffn_units": [3, 3], "conv_channels": [6]}
    section = structure.summarize({"dphubert": {"1": same, "2": other, "3": same}}, teacher, uniform)
    data = section["kinds"]["dphubert"]
    heads = data["overlap"]["heads"]
    # pairs (1,2), (1,3), (2,3): layer 0 Jaccard 0, 1, 0; layer 1 always 1
    assert heads["pairs"] == 3
    assert [v["jaccard"] for v in heads["per_layer"]] == pytest.approx([1 / 3, 1.0])
    assert heads["per_layer"][0]["chance"] == pytest.approx(structure.chance_jaccard(4, 2, 2))
    assert heads["per_layer"][1]["chance"] == pytest.approx(structure.chance_jaccard(4, 1, 1))
    assert data["overlap"]["conv_channels"]["jaccard"] == pytest.approx(1 / 3)
    assert data["spread"]["ffn_units"]["mean"] == [3.0, 1.0] and data["spread"]["heads"]["max"] == [2.0, 1.0]
    one = structure.summarize({"dphubert": {"1": same}}, teacher, None)
    assert one["kinds"]["dphubert"]["overlap"]["heads"]["jaccard"] is None

    lines = "\n".join(structure.markdown(section, report.LABELS, "structure.png"))
    assert "| teacher | 8 | 16 | 6 |" in lines and f"| {report.LABELS['uniform']} | 4 | 6 | 6 |" in lines
    assert (
        f"| {report.LABELS['dphubert']} | 3 ± 0 | 4 ± 0 | 3 ± 0 | 0.67 (" in lines
        and "![structure](structure.png)" in lines
    )
    assert "one seed" in "\n".join(structure.markdown(one, report.LABELS, "structure.png"))
    structure.figure(section, report.LABELS, str(tmp_path / "structure.png"))
    assert (tmp_path / "structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
