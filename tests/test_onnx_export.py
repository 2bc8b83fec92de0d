"""ONNX export (``formats/onnx_export.py``, ``dphubert-export --onnx``): pruned models of every kind written
as ONNX, loaded with onnxruntime and compared with the torch model on padded batches of real speech at
lengths and batch sizes the export did not trace; a check that fails leaves no file."""

import json
import os
import re
import sys

import helpers
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import assert_one_line, padded_batch, randomise_gates

import dphubert_fairseq as dp
from dphubert_fairseq import export as export_cli
from dphubert_fairseq.formats import onnx_export, onnx_int8

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")
ATOL = 1e-4


def gated_student(path, wavlm: bool = False):
    """A gated student of ``path`` with random gates and every corner case: a 0-head attention (layer 0), a
    0-unit FFN (layer 1), removed blocks, removed CNN channels; layer 2 loses both blocks (a pre-LN layer then
    passes its input on: two outputs are one tensor). WavLM: layer 0 has no attention at all, so the bias
    table reaches layers 1 and 2 without it."""
    student = randomise_gates(dp.student_from_teacher(path, prune_units=ALL_UNITS))
    layers = student.encoder.layers
    with torch.no_grad():
        layers[2].ffn.layer_gate.log_alpha.fill_(-10.0)
        if wavlm:
            layers[0].self_attn.layer_gate.log_alpha.fill_(-10.0)
            layers[1].self_attn.head_gate.log_alpha.copy_(torch.tensor([-10.0, 3.0, -10.0, 0.5]))
            layers[2].self_attn.layer_gate.log_alpha.fill_(5.0)
    return student.eval()


def session_of(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_states(session, source, mask):
    return session.run(None, {"source": source.numpy(), "padding_mask": mask.numpy()})


def max_diff(session, model, source, mask) -> float:
    """Max abs difference of every hidden state between the file (onnxruntime) and the model (torch)."""
    outputs = onnx_states(session, source, mask)
    with torch.no_grad():
        expected = model.hidden_states(source, mask)
    assert len(outputs) == len(expected) == model.cfg.encoder_layers + 1
    worst = 0.0
    for got, want in zip(outputs, expected):
        assert got.shape == tuple(want.shape)
        assert np.abs(want.numpy()).mean() > 0.01  # a real signal, not zeros
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
    return worst


def check_batches(model, speech, unequal_batch):
    """Padded batches of real speech at lengths and batch sizes the export neither traced (2 clips of 1.0 and
    0.75 s) nor checked (its probe): the unequal batch (3 clips); a length whose samples split evenly into its
    frames (HuBERT's rule then cuts nothing off: the other branch of the model's code); and one clip, nothing
    padded (wav2vec2's rule then gives no mask at all)."""
    normalize = model.cfg.normalize
    whole = onnx_export._samples(model, 2.0, whole_frames=True)
    assert whole % onnx_export.num_frames(model, whole) == 0 and whole != 32000
    return {
        "unequal": padded_batch(unequal_batch, normalize),
        "whole frames": padded_batch([speech[1][:whole], speech[0][:20000]], normalize),
        "unpadded": padded_batch([speech[2][:24000]], normalize),
    }


@pytest.mark.parametrize("shape", ["hubert_base", "hubert_large", "wav2vec2_large", "data2vec_base"])
def test_onnx_export_reproduces_pruned_models(tiny_teachers, speech, unequal_batch, tmp_path, shape):
    pruned = dp.prune(gated_student(tiny_teachers[shape]))
    cfg = pruned.cfg
    assert cfg.encoder_attention_heads[0] == 0 and cfg.encoder_ffn_embed_dims[1] == 0
    assert cfg.use_attention[2] == 0 and cfg.use_ffn[2] == 0 and cfg.feature_norm_removed_channels > 0
    path = tmp_path / f"{shape}.onnx"
    report = onnx_export.export_onnx(pruned, str(path))
    assert report.max_abs_diff <= ATOL and report.opset == onnx_export.OPSET
    assert report.checked_on.startswith("a built-in speech-like probe")
    session = session_of(path)
    for name, (source, mask) in check_batches(pruned, speech, unequal_batch).items():
        assert max_diff(session, pruned, source, mask) <= ATOL, name
    if cfg.layer_norm_first:  # layer 3 passes layer 2's output on
        source, mask = padded_batch(unequal_batch, cfg.normalize)
        outputs = onnx_states(session, source, mask)
        assert np.array_equal(outputs[2], outputs[3])


def test_onnx_export_reproduces_a_pruned_wavlm(wavlm_teachers, speech, unequal_batch, tmp_path):
    """WavLM's relative position buckets are computed from the number of frames: the file traced at 49 frames
    is right at 100 (beyond the tiny table's max distance of 64)."""
    pruned = dp.prune(gated_student(wavlm_teachers["wavlm_base"], wavlm=True))
    assert pruned.cfg.use_attention == [0, 1, 1]
    assert pruned.encoder.layers[1].self_attn.head_index.tolist() == [1, 3]
    path = tmp_path / "wavlm.onnx"
    assert onnx_export.export_onnx(pruned, str(path)).max_abs_diff <= ATOL
    session = session_of(path)
    for name, (source, mask) in check_batches(pruned, speech, unequal_batch).items():
        assert max_diff(session, pruned, source, mask) <= ATOL, name


def test_onnx_file_interface(tiny_teachers, tmp_path):
    """Inputs, outputs, dynamic axes and metadata, as docs/outputs.md documents them."""
    pruned = dp.prune(gated_student(tiny_teachers["hubert_large"]))
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(pruned, str(path))
    session = session_of(path)
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["source", "padding_mask"]
    assert inputs["source"].type == "tensor(float)" and inputs["padding_mask"].type == "tensor(bool)"
    assert inputs["source"].shape == ["batch", "samples"] == inputs["padding_mask"].shape
    outputs = session.get_outputs()
    assert [o.name for o in outputs] == [f"hidden_state_{i}" for i in range(4)]
    assert all(o.shape == ["batch", "frames", 32] for o in outputs)
    meta = session.get_modelmeta().custom_metadata_map
    assert (
        meta["normalize"] == "true" and meta["sample_rate"] == "16000" and meta["frame_padding"] == "hubert"
    )
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary file left beside it


def test_a_failed_check_fails_loudly_and_writes_nothing(tiny_teachers, tmp_path, monkeypatch):
    pruned = dp.prune(gated_student(tiny_teachers["hubert_base"]))
    path = tmp_path / "model.onnx"
    with pytest.raises(dp.DPHuBERTError) as err:
        onnx_export.export_onnx(pruned, str(path), atol=0.0)
    assert_one_line(
        str(err.value), starts_with=str(path), contains=["max abs diff", "hidden_state_", "not written"]
    )
    assert os.listdir(tmp_path) == []

    # a file already there stays as it was; the message names the output that deviates and by how much
    path.write_bytes(b"the last good export")
    real = onnx_export.TraceableHiddenStates.forward

    def off_in_the_last_layer(wrapper, source, padding_mask):  # what gets traced, not what it is checked on
        states = real(wrapper, source, padding_mask)
        return states[:-1] + (states[-1] + 1e-3,)

    monkeypatch.setattr(onnx_export.TraceableHiddenStates, "forward", off_in_the_last_layer)
    with pytest.raises(dp.DPHuBERTError) as err:
        onnx_export.export_onnx(pruned, str(path))
    assert_one_line(
        str(err.value), contains=[str(path), "max abs diff 0.001 in hidden_state_3", "above 0.0001"]
    )
    assert path.read_bytes() == b"the last good export" and os.listdir(tmp_path) == ["model.onnx"]


def test_a_gated_model_must_be_pruned_first(tiny_teachers, tmp_path):
    with pytest.raises(dp.ConfigError) as err:
        onnx_export.export_onnx(gated_student(tiny_teachers["hubert_base"]), str(tmp_path / "m.onnx"))
    assert_one_line(str(err.value), contains=["prune it first"])
    assert os.listdir(tmp_path) == []


def _gated_checkpoint(tiny_teachers, tmp_path) -> str:
    """A checkpoint dphubert-export reads as a stage-1 one: a gated student written by ``save_model``."""
    return dp.save_model(gated_student(tiny_teachers["hubert_base"]), str(tmp_path / "gated.pt"))


def test_export_cli_writes_a_checked_onnx_file(tiny_teachers, speech, tmp_path, capsys):
    checkpoint = _gated_checkpoint(tiny_teachers, tmp_path)
    wavs = []
    for i, seconds in enumerate((1.2, 0.7)):
        wavs.append(str(tmp_path / f"{i}.wav"))
        sf.write(wavs[-1], speech[i][: int(seconds * 16000)].numpy(), 16000)
    out, onnx_path, summary_path = (str(tmp_path / n) for n in ("pruned.pt", "pruned.onnx", "summary.json"))
    argv = [checkpoint, out, "--onnx", onnx_path, "--onnx-audio", *wavs, "--json", summary_path]
    assert export_cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(summary_path))["onnx"]
    assert summary["path"] == onnx_path and summary["max_abs_diff"] <= ATOL and summary["opset"] == 17
    assert summary["checked_on"] == "2 audio files (1.20 s, 0.70 s), padded"
    assert f"onnx: {onnx_path} checked with onnxruntime on 2 audio files (1.20 s, 0.70 s), padded" in printed
    pruned = dp.load_model(out)
    source, mask = padded_batch([speech[0][:20800], speech[1][:30000]])
    assert max_diff(session_of(onnx_path), pruned, source, mask) <= ATOL

    # one file: paired with its own beginning; without audio: the built-in probe
    assert export_cli.main([checkpoint, out, "--onnx", onnx_path, "--onnx-audio", wavs[0]]) == 0
    assert "on 0.wav (1.20 s) and its first 0.72 s, padded" in capsys.readouterr().out
    assert export_cli.main([checkpoint, out, "--onnx", onnx_path]) == 0
    assert "on a built-in speech-like probe (" in capsys.readouterr().out


def test_export_cli_writes_a_checked_int8_file(tiny_teachers, speech, tmp_path, capsys):
    """``--int8``: the ONNX file with int8 linear layers and CNN next to the fp32 one, every hidden state
    compared with torch fp32 on the check batch and reported; the file runs on other batches and stays close."""
    checkpoint = _gated_checkpoint(tiny_teachers, tmp_path)
    out, onnx_path, summary_path = (str(tmp_path / n) for n in ("pruned.pt", "pruned.onnx", "summary.json"))
    assert export_cli.main([checkpoint, out, "--onnx", onnx_path, "--int8", "--json", summary_path]) == 0
    printed = capsys.readouterr().out
    int8_path = str(tmp_path / "pruned.int8.onnx")
    summary = json.load(open(summary_path))["onnx_int8"]
    pruned = dp.load_model(out)
    names = [f"hidden_state_{i}" for i in range(pruned.cfg.encoder_layers + 1)]
    assert summary["path"] == int8_path and sorted(summary["outputs"]) == names
    assert summary["floor"] == onnx_int8.MIN_COSINE <= summary["min_cosine"] < 1.0
    assert summary["min_cosine"] == min(o["cosine"] for o in summary["outputs"].values())
    assert summary["max_abs_diff"] > 0  # int8 is not the fp32 file
    assert f"onnx int8: {int8_path} checked with onnxruntime on a built-in speech-like probe" in printed
    assert summary["cnn_int8"] and printed.count("; linear layers and CNN int8\n") == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary file or folder
    graph = onnx.load(int8_path).graph
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in graph.node)
    assert {i.name for i in graph.input} == {"source", "padding_mask"} and [
        o.name for o in graph.output
    ] == names
    source, mask = padded_batch([speech[0][:20800], speech[1][:30000]])
    outputs = onnx_states(session_of(int8_path), source, mask)
    with torch.no_grad():
        expected = pruned.hidden_states(source, mask)
    for got, want in zip(outputs, expected):
        cosine = float(np.sum(got * want.numpy()) / (np.linalg.norm(got) * np.linalg.norm(want.numpy())))
        assert cosine > 0.98


def test_an_int8_file_below_the_floor_is_refused_and_not_written(tiny_teachers, tmp_path):
    pruned = dp.prune(gated_student(tiny_teachers["hubert_base"]))
    fp32 = tmp_path / "m.onnx"
    onnx_export.export_onnx(pruned, str(fp32))
    path = tmp_path / "m.int8.onnx"
    path.write_bytes(b"the last good export")
    source, mask, described = onnx_export.probe_batch(pruned)
    with pytest.raises(dp.DPHuBERTError) as err:
        onnx_int8.quantize_int8(str(fp32), str(path), pruned, (source, mask, described), min_cosine=1.0)
    assert_one_line(
        str(err.value),
        starts_with=str(path),
        contains=["cosine", "hidden_state_", "below the floor 1.0", "not written"],
    )
    # six decimals, as the summary line has: 0.98996 must not read 0.9900 against a floor of 0.99
    assert re.search(r"cosine 0\.\d{6} to torch fp32", str(err.value)), str(err.value)
    assert path.read_bytes() == b"the last good export"
    assert sorted(os.listdir(tmp_path)) == ["m.int8.onnx", "m.onnx"]  # the quantiser's work folder is gone


def test_quantize_int8_names_the_file_it_cannot_use(tmp_path):
    """A missing, corrupt or empty fp32 file, or a destination whose folder cannot take the quantiser's work
    folder: one line naming the file, and nothing left behind."""
    check = (torch.zeros(1, 16000), torch.zeros(1, 16000, dtype=torch.bool), "nothing")
    out = tmp_path / "m.int8.onnx"
    (tmp_path / "corrupt.onnx").write_bytes(b"not an ONNX file")
    (tmp_path / "empty.onnx").write_bytes(b"")
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    value = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1])  # noqa: E731
    graph = onnx.helper.make_graph([node], "g", [value("x")], [value("y")])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "relu.onnx"))
    (tmp_path / "a_file").write_bytes(b"")
    for fp32, path, starts_with, contains in (
        (
            "missing.onnx",
            out,
            "{fp32}: ",
            "cannot read the ONNX file to quantise (No such file or directory)",
        ),
        ("corrupt.onnx", out, "{fp32}: ", "not a readable ONNX file"),
        ("empty.onnx", out, "{path}: ", "onnxruntime cannot quantise {fp32}: "),
        (
            "relu.onnx",
            tmp_path / "a_file" / "m.int8.onnx",
            "{path}: ",
            "cannot quantise {fp32} in a work folder",
        ),
    ):
        fp32, before = str(tmp_path / fp32), sorted(os.listdir(tmp_path))
        with pytest.raises(dp.DPHuBERTError) as err:
            onnx_int8.quantize_int8(fp32, str(path), None, check)
        names = dict(fp32=fp32, path=path)
        assert_one_line(
            str(err.value), starts_with=starts_with.format(**names), contains=[contains.format(**names)]
        )
        assert sorted(os.listdir(tmp_path)) == before


def test_a_refused_int8_file_leaves_every_output_as_it_was(tiny_teachers, tmp_path, capsys, monkeypatch):
    """``--int8`` below the floor: the checkpoint, the ONNX file and the int8 file of an earlier export all stay
    as they were (no new fp32 files beside an old int8 one), one line says why, no temporary file is left."""
    checkpoint = _gated_checkpoint(tiny_teachers, tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    old = {name: f"{name} of an earlier model".encode() for name in ("p.pt", "p.onnx", "p.int8.onnx")}
    for name, data in old.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(onnx_int8, "MIN_COSINE", 1.0)  # the documented floor; no int8 file reaches 1.0
    argv = [checkpoint, str(folder / "p.pt"), "--onnx", str(folder / "p.onnx"), "--int8"]
    argv += ["--json", str(folder / "s.json")]
    assert export_cli.main(argv) == 2
    captured = capsys.readouterr()
    message = captured.err.strip().splitlines()[-1]
    assert_one_line(
        message,
        starts_with=f"dphubert-export: error: {folder / 'p.int8.onnx'}: ",
        contains=["below the floor 1.0", "nothing was written"],
    )
    assert sorted(os.listdir(folder)) == sorted(old)  # no summary, no temporary file or work folder
    assert all((folder / name).read_bytes() == data for name, data in old.items())
    assert "wrote" not in captured.out


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--int8"], "--int8 needs --onnx"),
        (["--onnx-audio", "{wav}"], "--onnx-audio needs --onnx"),
        (["--onnx", "{out}"], "is the output checkpoint's path too"),
        (["--onnx", "{dir}"], "is a directory"),
        (["--onnx", "{dir}/m.onnx", "--onnx-audio", "{dir}/missing.wav"], "cannot read it"),
        (
            ["--onnx", "{dir}/m.onnx", "--onnx-audio", "{wav8k}"],
            "sampled at 8000 Hz but the model expects 16000",
        ),
    ],
)
def test_export_cli_refuses_bad_onnx_arguments(tiny_teachers, tmp_path, capsys, extra, expected):
    checkpoint = _gated_checkpoint(tiny_teachers, tmp_path)
    wav, wav8k = str(tmp_path / "a.wav"), str(tmp_path / "b.wav")
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    sf.write(wav8k, np.zeros(8000, dtype=np.float32), 8000)
    out = str(tmp_path / "pruned.pt")
    names = dict(wav=wav, wav8k=wav8k, out=out, dir=str(tmp_path))
    assert export_cli.main([checkpoint, out, *[e.format(**names) for e in extra]]) == 2
    message = capsys.readouterr().err.strip()
    assert_one_line(message, starts_with="dphubert-export: error: ", contains=[expected])
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "m.onnx")


@pytest.mark.slow
def test_dphubert_export_onnx_command(tiny_teachers, tmp_path):
    """The installed command, as a user runs it, on a stage-1-like checkpoint."""
    checkpoint = _gated_checkpoint(tiny_teachers, tmp_path)
    out, onnx_path, summary_path = (str(tmp_path / n) for n in ("pruned.pt", "pruned.onnx", "summary.json"))
    proc = helpers.export(checkpoint, out, summary_path, extra=["--onnx", onnx_path])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"onnx: {onnx_path} checked with onnxruntime on a built-in speech-like probe" in proc.stdout
    assert json.load(open(summary_path))["onnx"]["max_abs_diff"] <= ATOL
    session = session_of(onnx_path)
    source, mask = padded_batch([torch.randn(20000) * 0.1, torch.randn(9000) * 0.1])
    outputs = session.run(None, {"source": source.numpy(), "padding_mask": mask.numpy()})
    with torch.no_grad():
        expected = dp.load_model(out).hidden_states(source, mask)
    assert max(float(np.abs(o - e.numpy()).max()) for o, e in zip(outputs, expected)) <= ATOL


@pytest.mark.slow
def test_onnx_inference_benchmark(tmp_path):
    """benchmarks/onnx_inference.py at its smallest settings: both models exported, checked and timed."""
    out = tmp_path / "onnx_inference.json"
    args = ["--seconds", "1", "--threads", "1", "--warmup", "0", "--repeat", "1", "--json", str(out)]
    proc = helpers.run([sys.executable, os.path.join("benchmarks", "onnx_inference.py"), *args], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ORT/torch" in proc.stdout and "student/teacher" in proc.stdout
    result = json.load(open(out))
    models = result["models"]
    assert models["teacher"]["params"] == 94_370_944 > models["student"]["params"]
    for name in ("teacher", "student"):
        assert (
            models[name]["check"]["max_abs_diff"] <= ATOL and models[name]["max_abs_diff_bench_input"] <= ATOL
        )
    int8 = models["student int8"]  # checked against torch fp32 as the export checks it, and smaller
    assert int8["check"]["min_cosine"] >= int8["check"]["floor"] == onnx_int8.MIN_COSINE
    assert 0.9 < int8["min_cosine_bench_input"] <= 1.0
    # The linear layers and the CNN after its first layer become int8; the positional convolution (~5M of
    # this student's ~24M weights) stays fp32.
    assert int8["check"]["cnn_int8"] and int8["bytes"] < 0.45 * models["student"]["bytes"]
    assert "student int8/fp32" in proc.stdout
    times = result["seconds_per_forward"]["1 thread"]
    assert set(times) == {f"{m} {r}" for m in ("teacher", "student") for r in ("torch", "onnxruntime")} | {
        "student int8 onnxruntime"
    }
