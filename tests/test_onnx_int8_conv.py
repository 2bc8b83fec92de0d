"""The CNN's convolutions as int8 matrix products (``formats/onnx_int8_conv.py``): the weight layout, the graph
against a numpy model of the same quantisation, the per-group scales against one scale per tensor, and the int8
export's fallback to a float32 CNN."""

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dphubert_fairseq as dp
from dphubert_fairseq.formats import onnx_export, onnx_int8, onnx_int8_conv

ALL_UNITS = ("conv", "head", "interm", "attlayer", "ffnlayer")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def conv_model(
    weight: np.ndarray,
    stride: int,
    bias=None,
    group: int = 1,
    then=None,
    opset: int = onnx_export.OPSET,
    names=("conv", "conv2"),
):
    """An ONNX graph of one Conv1d ``x (B, C, T) -> y (B, N, T_out)``, dynamic batch and length; ``then``
    ``(weight, stride)``: a second Conv1d on ``y``, whose output ``z`` is a second output. ``names``: the two
    Conv nodes' names."""
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(onnx.numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    nodes = [
        h.make_node(
            "Conv",
            inputs,
            ["y"],
            name=names[0],
            kernel_shape=[weight.shape[2]],
            strides=[stride],
            group=group,
        )
    ]
    outputs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", weight.shape[0], "Ty"])]
    if then is not None:
        inits.append(onnx.numpy_helper.from_array(then[0].astype(np.float32), "w2"))
        nodes.append(
            h.make_node(
                "Conv", ["y", "w2"], ["z"], name=names[1], kernel_shape=[then[0].shape[2]], strides=[then[1]]
            )
        )
        outputs.append(h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["B", then[0].shape[0], "Tz"]))
    graph = h.make_graph(
        nodes,
        "conv",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", weight.shape[1] * group, "T"])],
        outputs,
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def run(proto, x: np.ndarray, output: int = 0) -> np.ndarray:
    session = onnx_export.cpu_session(onnxruntime, proto.SerializeToString(), threads=1)
    return session.run(None, {"x": x})[output]


def numpy_int8_conv(x: np.ndarray, weight: np.ndarray, stride: int, bias=None) -> np.ndarray:
    """What the rewritten graph computes, written directly: ``x`` quantised with one symmetric scale per group
    of ``stride`` frames (groups from frame 0, float32 as onnxruntime rounds), the weight per output channel,
    then the convolution of the two in float64."""
    batch, channels, length = x.shape
    frames = x.transpose(0, 2, 1).astype(np.float32)  # (B, T, C)
    n_groups = -(-length // stride)
    peak = np.zeros((batch, n_groups * stride), dtype=np.float32)
    peak[:, :length] = np.abs(frames).max(axis=2)
    group_peak = peak.reshape(batch, n_groups, stride).max(axis=2)
    scale = np.maximum(group_peak, np.float32(onnx_int8_conv.SCALE_FLOOR)) / np.float32(onnx_int8_conv.LEVELS)
    frame_scale = np.repeat(scale, stride, axis=1)[:, :length, None]
    codes = np.clip(np.round(frames / frame_scale), -128, 127)
    dequantised = codes.astype(np.float64) * np.repeat(scale, stride, axis=1)[:, :length, None].astype(
        np.float64
    )
    matrices, weight_scale = onnx_int8_conv.group_weights(weight, stride)
    n_out, _, kernel = weight.shape
    taps = np.concatenate(matrices).reshape(-1, channels, n_out)[:kernel]  # (k, C, N)
    w = (taps.astype(np.float64) * weight_scale.astype(np.float64)).transpose(2, 1, 0)
    y = F.conv1d(torch.from_numpy(dequantised.transpose(0, 2, 1)), torch.from_numpy(w), stride=stride).numpy()
    return y if bias is None else y + bias[None, :, None]


@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (5, 2), (4, 4), (3, 1)])
def test_group_weights_hold_every_tap_in_its_group_row(kernel, stride):
    rng = np.random.default_rng(kernel * 10 + stride)
    weight = rng.normal(size=(6, 4, kernel)).astype(np.float32)
    matrices, scale = onnx_int8_conv.group_weights(weight, stride)
    assert len(matrices) == -(-kernel // stride)
    assert [m.dtype for m in matrices] == [np.int8] * len(matrices)
    assert matrices[-1].shape == ((kernel - stride * (len(matrices) - 1)) * 4, 6)
    rebuilt = np.zeros_like(weight)
    for j in range(kernel):
        rows = matrices[j // stride][(j % stride) * 4 : (j % stride + 1) * 4]  # (C, N)
        rebuilt[:, :, j] = (rows.astype(np.float32) * scale).T
    # within half a step of each output channel's scale, and each channel's largest weight exactly at 127
    assert np.all(np.abs(rebuilt - weight) <= scale[:, None, None] / 2 + 1e-6)
    assert all(np.abs(np.concatenate(matrices)).max(axis=0) == 127)


@pytest.mark.parametrize(
    "kernel, stride, with_bias", [(3, 2, False), (2, 2, True), (5, 2, True), (3, 1, False)]
)
def test_rewritten_conv_computes_the_per_group_quantised_conv(kernel, stride, with_bias):
    """The graph's wiring (group alignment, tap order, the offsets' slices, scales, bias) against the numpy
    model of the same quantisation, for lengths of every remainder modulo the stride and a batch of two whose
    items have different ranges; and close to the float conv."""
    rng = np.random.default_rng(kernel)
    weight = rng.normal(size=(5, 6, kernel)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32) if with_bias else None
    proto = conv_model(weight, stride, bias)
    assert onnx_int8_conv.quantize_convs(onnx, proto) == ["conv"]
    assert not any(n.op_type == "Conv" for n in proto.graph.node)
    assert "w" not in {t.name for t in proto.graph.initializer}  # the float weight is gone
    for length in range(kernel + 7, kernel + 7 + stride + 1):
        x = rng.normal(size=(2, 6, length)).astype(np.float32)
        x[1] *= 40
        x[0, :, 3] *= 30  # a loud frame: only its own group's scale grows
        got = run(proto, x)
        want = numpy_int8_conv(x, weight, stride, bias)
        assert got.shape == want.shape == (2, 5, (length - kernel) // stride + 1)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        exact = F.conv1d(
            torch.from_numpy(x),
            torch.from_numpy(weight),
            None if bias is None else torch.from_numpy(bias),
            stride=stride,
        ).numpy()
        assert np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("opset", [13, 14, onnx_export.OPSET, 18, 21])
def test_a_conv_after_a_rewritten_one_takes_its_input_frames_first(opset):
    """The second of two rewritten convs quantises its input after transposing it (the first one before):
    both against the numpy model, the second on the first's own output; in every opset's operator signatures
    (ReduceMax's axes an input from 18 on, Shape's start and end from 15), valid by ONNX's strict checks."""
    rng = np.random.default_rng(7)
    first, second = (
        rng.normal(size=(6, 4, 3)).astype(np.float32),
        rng.normal(size=(5, 6, 2)).astype(np.float32),
    )
    proto = conv_model(first, 2, then=(second, 2), opset=opset)
    assert onnx_int8_conv.quantize_convs(onnx, proto) == ["conv", "conv2"]
    onnx.checker.check_model(proto, full_check=True)
    names = {n.name for n in proto.graph.node}
    assert "conv/int8/codes_ct" in names and "conv2/int8/frames" in names  # the two layouts
    for length in (41, 42, 43, 44):
        x = rng.normal(size=(2, 4, length)).astype(np.float32)
        x[0, :, 5] *= 50
        y, z = run(proto, x, 0), run(proto, x, 1)
        for got, want in ((y, numpy_int8_conv(x, first, 2)), (z, numpy_int8_conv(y, second, 2))):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_only_plain_convs_with_several_input_channels_are_rewritten():
    rng = np.random.default_rng(0)
    for proto in (
        conv_model(rng.normal(size=(4, 1, 10)), 5),  # the first CNN layer: its input is the waveform
        conv_model(rng.normal(size=(8, 2, 4)), 1, group=4),  # the positional convolution is grouped
    ):
        before = proto.SerializeToString()
        assert onnx_int8_conv.quantize_convs(onnx, proto) == []
        assert proto.SerializeToString() == before
    with pytest.raises(ValueError, match="opset 12 is below 13"):  # no per-axis QuantizeLinear before 13
        onnx_int8_conv.quantize_convs(onnx, conv_model(rng.normal(size=(4, 3, 3)), 2, opset=12))


@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (5, 3), (2, 3)])
def test_inputs_shorter_than_the_kernel_give_no_frames(kernel, stride):
    """``(T - k) // s + 1`` with ONNX's truncating Div would give a frame for ``k - s < T < k``; a float Conv
    gives none there (onnxruntime refuses the input), and so does the rewritten one: 0 frames below the
    kernel, then one frame from ``T = k``."""
    rng = np.random.default_rng(kernel * 10 + stride)
    weight = rng.normal(size=(4, 3, kernel)).astype(np.float32)
    proto = conv_model(weight, stride)
    onnx_int8_conv.quantize_convs(onnx, proto)
    for length in range(1, kernel):
        assert run(proto, rng.normal(size=(2, 3, length)).astype(np.float32)).shape == (2, 4, 0), length
    for length in range(kernel, kernel + stride + 1):
        x = rng.normal(size=(2, 3, length)).astype(np.float32)
        got, want = run(proto, x), numpy_int8_conv(x, weight, stride)
        assert got.shape == want.shape == (2, 4, (length - kernel) // stride + 1)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_rewritten_convs_get_unique_names_when_theirs_are_missing_or_shared():
    """Unnamed convs (and two of one name) would put their new nodes and constants under one prefix."""
    rng = np.random.default_rng(3)
    first, second = (
        rng.normal(size=(6, 4, 3)).astype(np.float32),
        rng.normal(size=(5, 6, 2)).astype(np.float32),
    )
    x = rng.normal(size=(2, 4, 30)).astype(np.float32)
    for names, labels in ((("", ""), ["conv_0", "conv_1"]), (("c", "c"), ["c", "c"])):
        proto = conv_model(first, 2, then=(second, 2), names=names)
        assert onnx_int8_conv.quantize_convs(onnx, proto) == labels
        node_names = [n.name for n in proto.graph.node]
        assert len(set(node_names)) == len(node_names)
        onnx.checker.check_model(proto, full_check=True)  # every tensor (constants too) defined once
        y, z, want = run(proto, x, 0), run(proto, x, 1), numpy_int8_conv(run(proto, x, 0), second, 2)
        assert np.abs(y - numpy_int8_conv(x, first, 2)).max() <= 1e-5 * np.abs(y).max()
        assert np.abs(z - want).max() <= 1e-5 * np.abs(want).max()


def test_per_group_scales_follow_loud_frames_where_one_scale_cannot():
    """Why the groups: one loud frame in otherwise quiet speech-like input. With a scale per group the quiet
    frames keep their precision; with one scale for the tensor (onnxruntime's dynamic quantisation) they lose it."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 16, 3)).astype(np.float32)
    x = rng.normal(size=(1, 16, 201)).astype(np.float32) * 0.1
    x[0, :, 100] = 60.0
    proto = conv_model(weight, 2)
    onnx_int8_conv.quantize_convs(onnx, proto)
    exact = F.conv1d(torch.from_numpy(x), torch.from_numpy(weight), stride=2).numpy()
    per_group = run(proto, x)
    step = np.abs(x).max() / 127  # one scale for the tensor
    per_tensor = F.conv1d(
        torch.from_numpy(np.round(x / step) * step), torch.from_numpy(weight), stride=2
    ).numpy()
    quiet = np.r_[0:45, 55:100]  # output frames whose windows miss the loud frame's group

    def cosine(a, b):
        a, b = a[..., quiet].ravel(), b[..., quiet].ravel()
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cosine(per_group, exact) > 0.999
    assert cosine(per_tensor, exact) < 0.8


@pytest.mark.parametrize("shape", sorted(helpers.TEACHER_SHAPES))
def test_every_teachers_pruned_cnn_becomes_int8_within_the_floor(tiny_teachers, shape, tmp_path):
    """HuBERT / wav2vec2 / data2vec students with random gates (CNN channels removed, so odd widths; group-norm
    and layer-norm CNNs, with and without conv bias): every conv after the first is rewritten, the grouped
    positional convolutions are not, and the file meets the floor on the export's probe."""
    student = helpers.randomise_gates(dp.student_from_teacher(tiny_teachers[shape], prune_units=ALL_UNITS))
    widths = [block.conv.out_channels for block in student.feature_extractor.blocks]
    pruned = dp.prune(student).eval()
    kept = [block.conv.out_channels for block in pruned.feature_extractor.blocks]
    assert all(k <= w for k, w in zip(kept, widths)) and sum(kept) < sum(widths)  # channels removed
    fp32 = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(pruned, fp32)
    report = onnx_int8.quantize_int8(
        fp32, str(tmp_path / "m.int8.onnx"), pruned, onnx_export.probe_batch(pruned)
    )
    assert report.cnn_int8 and report.min_cosine >= onnx_int8.MIN_COSINE
    graph = onnx.load(report.path).graph
    n_conv = len(pruned.feature_extractor.blocks)
    rewritten = {n.name.split("/int8/")[0] for n in graph.node if "/int8/" in n.name}
    assert len(rewritten) == n_conv - 1
    assert all(n.op_type != "Conv" or "pos_conv" in n.name or "blocks.0/" in n.name for n in graph.node)


def test_int8_export_quantises_the_cnn_and_falls_back_to_float32_below_the_floor(tiny_teachers, tmp_path):
    """A pruned student's int8 file has an int8 CNN when it meets the floor; with a floor between the two
    files' cosines the float32-CNN file is written instead and the report says why."""
    student = dp.student_from_teacher(tiny_teachers["hubert_base"])
    pruned = dp.prune(student).eval()
    fp32 = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(pruned, fp32)
    check = onnx_export.probe_batch(pruned)
    with_cnn = onnx_int8.quantize_int8(fp32, str(tmp_path / "a.onnx"), pruned, check)
    linear = onnx_int8.quantize_int8(fp32, str(tmp_path / "b.onnx"), pruned, check, cnn=False)
    assert with_cnn.cnn_int8 and not linear.cnn_int8 and with_cnn.cnn_int8_cosine is None
    ops = lambda path: [n.op_type for n in onnx.load(path).graph.node]  # noqa: E731
    n_conv = pruned.cfg.conv_feature_layers.count("(")
    assert (
        ops(with_cnn.path).count("Conv") == 2 and ops(linear.path).count("Conv") == n_conv + 1
    )  # + positional
    meta = {p.key: p.value for p in onnx.load(with_cnn.path).metadata_props}
    assert meta["quantization"] == onnx_int8.QUANTIZATION[True]
    assert onnx_int8.MIN_COSINE <= with_cnn.min_cosine < linear.min_cosine < 1.0
    floor = (with_cnn.min_cosine + linear.min_cosine) / 2
    fallback = onnx_int8.quantize_int8(fp32, str(tmp_path / "c.onnx"), pruned, check, min_cosine=floor)
    assert not fallback.cnn_int8 and fallback.min_cosine == pytest.approx(linear.min_cosine)
    assert fallback.cnn_int8_cosine == pytest.approx(with_cnn.min_cosine)
    line = onnx_int8.int8_summary_line(fallback.summary())
    assert line.endswith(
        f"linear layers int8, the CNN float32 (with it int8 the lowest cosine was {with_cnn.min_cosine:.6f})"
    )
    assert onnx_int8.int8_summary_line(with_cnn.summary()).endswith("; linear layers and CNN int8")


def test_int8_cnn_of_an_opset_18_export(tiny_teachers, tmp_path):
    """From opset 18 ReduceMax takes its axes as an input: an export at 18 gets an int8 CNN that onnxruntime
    runs, within the floor."""
    pruned = dp.prune(dp.student_from_teacher(tiny_teachers["hubert_base"])).eval()
    fp32 = str(tmp_path / "m.onnx")
    assert onnx_export.export_onnx(pruned, fp32, opset=18).opset == 18
    report = onnx_int8.quantize_int8(
        fp32, str(tmp_path / "m.int8.onnx"), pruned, onnx_export.probe_batch(pruned)
    )
    assert report.cnn_int8 and report.cnn_int8_error is None and report.min_cosine >= onnx_int8.MIN_COSINE
    reduce_max = [
        n for n in onnx.load(report.path).graph.node if n.op_type == "ReduceMax" and "/int8/" in n.name
    ]
    assert reduce_max and all(len(n.input) == 2 and not n.attribute for n in reduce_max)


def test_an_int8_cnn_onnxruntime_cannot_run_falls_back_to_float32(
    tiny_teachers, tmp_path, monkeypatch, caplog
):
    """When the file with the int8 CNN does not even load, the float32-CNN file is checked and written, and
    the report, the printed line and the log say why."""
    pruned = dp.prune(dp.student_from_teacher(tiny_teachers["hubert_base"])).eval()
    fp32 = str(tmp_path / "m.onnx")
    onnx_export.export_onnx(pruned, fp32)
    real = onnx_int8.quantize_convs

    def broken(
        onnx_module, proto
    ):  # a rewrite onnxruntime refuses, as opset 18 once refused ReduceMax's axes
        rewritten = real(onnx_module, proto)
        node = next(n for n in proto.graph.node if n.op_type == "ReduceMax")
        node.attribute.append(onnx_module.helper.make_attribute("bogus", 1))
        return rewritten

    monkeypatch.setattr(onnx_int8, "quantize_convs", broken)
    path = tmp_path / "m.int8.onnx"
    report = onnx_int8.quantize_int8(fp32, str(path), pruned, onnx_export.probe_batch(pruned))
    assert (
        not report.cnn_int8 and report.cnn_int8_cosine is None and report.min_cosine >= onnx_int8.MIN_COSINE
    )
    assert (
        report.cnn_int8_error.startswith("onnxruntime cannot run it: ") and "bogus" in report.cnn_int8_error
    )
    assert report.summary()["cnn_int8_error"] == report.cnn_int8_error
    line = onnx_int8.int8_summary_line(report.summary())
    assert line.endswith(f"linear layers int8, the CNN float32 (with it int8: {report.cnn_int8_error})")
    assert "bogus" in caplog.text and str(path) in caplog.text
    graph = onnx.load(str(path)).graph
    assert not any("/int8/" in n.name for n in graph.node)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["quantization"] == onnx_int8.QUANTIZATION[False]
