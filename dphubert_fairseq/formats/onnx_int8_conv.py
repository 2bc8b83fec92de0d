"""The CNN's convolutions of an ONNX export as int8 matrix products, quantised per group of frames.

onnxruntime's dynamic quantisation (``onnx_int8``) turns matrix products into int8 ones with one scale for the
whole input tensor, and leaves convolutions in float32; in a pruned student the CNN is most of the time (the
second conv layer alone computes 12.6 of the 24 GMACs of a Base CNN on 10 s). One scale for a conv layer's
whole input does not work: the CNN's activations reach 20 to 100 times their typical size in a few loud frames,
and a scale that covers those leaves the quiet frames a handful of levels (a hidden-state cosine of 0.85 to
fp32 on real speech). ``quantize_convs`` rewrites each 1-D convolution (no groups, no padding, no dilation, at
least ``MIN_IN_CHANNELS`` input channels: not the first layer, whose input is the waveform) as:

1. the input ``x`` ``(B, C, T)`` read as ``(B, T, C)`` and cut into groups of ``s`` frames (``s``: the stride);
   each group gets its own symmetric scale, its largest ``|x|`` over 127, and is quantised to uint8 around 128;
2. a window of ``k`` frames (the kernel) starting at frame ``s t`` is groups ``t .. t + G - 1``
   (``G = ceil(k / s)``), so the conv is ``G`` matrix products, one per group offset ``g``: the groups
   ``g .. g + T_out - 1`` as rows ``(B, T_out, s C)`` (the last offset only its first ``(k - s (G - 1)) C``
   columns) times the int8 weight of those taps ``(s C, N)`` (symmetric, one scale per output channel);
3. each product in float32 (``MatMulIntegerToFloat``: the weight scales applied) times its rows' group scales,
   summed, plus the bias, back to ``(B, N, T_out)``.

The weights, scales and zero points are constants of the file; the group scales are computed from each input
(dynamic, like onnxruntime's). Groups of frames rather than one scale per frame keep each window's frames in
at most ``G`` scales, so that the conv needs no copy of its input per tap. On real speech through a
random-weight Base-shaped student (``benchmarks/onnx_inference.py``) every hidden state keeps a cosine of
0.9992 to fp32 with the CNN and the linear layers int8, against 0.85 with one scale per conv input.

The first rewritten conv quantises its input as it comes, ``(B, C, T)``, and transposes the bytes; the later
ones transpose their float input, a transpose onnxruntime's layout optimiser cancels against the previous
conv's output transpose.
"""

from typing import Dict, List, Set, Tuple

import numpy as np

#: the lowest ONNX opset the rewrite is written for (per-axis QuantizeLinear, Unsqueeze's axes as an input)
MIN_OPSET = 13
#: convolutions with fewer input channels stay float32 (the first layer: its input is the waveform, C = 1)
MIN_IN_CHANNELS = 2
#: the largest magnitude of a symmetric int8 code; uint8 codes are centred on ``ZERO_POINT``
LEVELS = 127
ZERO_POINT = 128
#: a group whose largest |x| is below this is quantised with this (an all-zero group stays zero)
SCALE_FLOOR = 1e-30


def group_weights(weight: np.ndarray, stride: int) -> Tuple[List[np.ndarray], np.ndarray]:
    """A conv weight ``(N, C, k)`` as the int8 matrices of its ``G = ceil(k / s)`` group offsets and the
    per-output-channel scale: matrix ``g`` ``(width_g, N)`` holds taps ``g s .. g s + s - 1`` in rows
    ``p C + c`` (tap ``g s + p``, channel ``c``), the last one only its real taps. ``W[n, c, j]`` is
    ``matrices[j // s][(j % s) C + c, n] * scale[n]`` up to rounding."""
    n_out, channels, kernel = weight.shape
    groups = -(-kernel // stride)
    taps = np.zeros((groups * stride, channels, n_out), dtype=np.float64)
    taps[:kernel] = weight.astype(np.float64).transpose(2, 1, 0)  # (k, C, N)
    scale = np.abs(taps).reshape(-1, n_out).max(axis=0) / LEVELS
    scale[scale == 0] = 1.0
    codes = (
        np.clip(np.round(taps / scale), -LEVELS, LEVELS)
        .astype(np.int8)
        .reshape(groups, stride * channels, n_out)
    )
    last = (kernel - stride * (groups - 1)) * channels
    matrices = [np.ascontiguousarray(codes[g] if g < groups - 1 else codes[g, :last]) for g in range(groups)]
    return matrices, scale.astype(np.float32)


def convertible(node, initializers: Dict[str, object], helper) -> bool:
    """Whether ``quantize_convs`` rewrites this node: a Conv with a constant 3-D weight, one group, no padding,
    dilation 1 and at least ``MIN_IN_CHANNELS`` input channels."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
        return False
    dims = list(initializers[node.input[1]].dims)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        len(dims) == 3
        and dims[0] > 0
        and dims[1] >= MIN_IN_CHANNELS
        and attrs.get("group", 1) == 1
        and not any(attrs.get("pads", []))
        and all(d == 1 for d in attrs.get("dilations", [1]))
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def graph_opset(proto) -> int:
    """The version of the default ONNX domain ``proto`` imports (0 when it imports none)."""
    return max((op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")), default=0)


class _Builder:
    """Appends the nodes and constants of one rewritten conv, named under ``prefix``, in the signatures of
    ``opset``."""

    def __init__(self, onnx, graph, prefix: str, opset: int) -> None:
        self.helper, self.numpy_helper, self.graph, self.prefix, self.opset = (
            onnx.helper,
            onnx.numpy_helper,
            graph,
            prefix,
            opset,
        )
        self.nodes: List[object] = []

    def const(self, name: str, value) -> str:
        full = f"{self.prefix}/{name}"
        self.graph.initializer.append(self.numpy_helper.from_array(np.asarray(value), full))
        return full

    def node(self, op: str, inputs: List[str], name: str, output: str = "", domain: str = "", **attrs) -> str:
        output = output or f"{self.prefix}/{name}"
        self.nodes.append(
            self.helper.make_node(op, inputs, [output], name=f"{self.prefix}/{name}", domain=domain, **attrs)
        )
        return output

    def reduce_max(self, x: str, axis: int, name: str) -> str:
        """``x``'s maximum over ``axis``, kept as a dimension of 1 (``axes`` an input from opset 18 on)."""
        if self.opset >= 18:
            return self.node("ReduceMax", [x, self.const(f"{name}_axes", np.array([axis], np.int64))], name)
        return self.node("ReduceMax", [x], name, axes=[axis], keepdims=1)

    def length(self, x: str, axis: int, name: str) -> str:
        """``[x.shape[axis]]`` (int64, 1-D): ``Shape``'s ``start`` / ``end`` from opset 15 on, else a slice."""
        if self.opset >= 15:
            return self.node("Shape", [x], name, start=axis, end=axis + 1)
        starts, ends = (
            self.const(f"{name}_start", np.array([axis], np.int64)),
            self.const(f"{name}_end", np.array([axis + 1], np.int64)),
        )
        return self.node("Slice", [self.node("Shape", [x], f"{name}_all"), starts, ends], name)


def _rewrite(
    onnx, graph, node, weight: np.ndarray, stride: int, channels_first: bool, prefix: str, opset: int
) -> List[object]:
    """The nodes that compute ``node`` (a ``convertible`` Conv) with int8 matrix products. ``channels_first``:
    quantise the input as it comes, ``(B, C, T)``, and transpose the codes; else transpose the float input to
    ``(B, T, C)`` first, which onnxruntime's layout optimiser cancels against the previous rewritten conv's
    output transpose (through the GELU between them), but which is a single-threaded pass over floats where
    nothing cancels it (after the float32 first layer)."""
    n_out, channels, kernel = weight.shape
    matrices, weight_scale = group_weights(weight, stride)
    b = _Builder(onnx, graph, prefix, opset)
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    floor = b.const("scale_floor", np.float32(SCALE_FLOOR))
    levels = b.const("levels", np.float32(LEVELS))
    zero_point = b.const("zero_point", np.uint8(ZERO_POINT))
    one = b.const("one", np.float32(1.0))
    # one scale per group of `stride` frames: the largest |x| of its frames (the last group may be partial);
    # each frame divided by its group's scale and rounded to uint8 codes around ZERO_POINT
    if channels_first:
        x = node.input[0]  # (B, C, T)
        peak = b.reduce_max(b.node("Abs", [x], "abs"), 1, "frame_peak")  # (B, 1, T)
        peak = b.node("MaxPool", [peak], "group_peak", kernel_shape=[stride], strides=[stride], ceil_mode=1)
        group_scale = b.node("Div", [b.node("Max", [peak, floor], "peak_floor"), levels], "group_scale")
        length = b.length(x, 2, "length")  # [T]
        frame_scale = b.node(
            "Expand",
            [
                b.node("Unsqueeze", [group_scale, b.const("last", i64(3))], "group_scale_4d"),
                b.const("group_shape", i64(1, 1, 1, stride)),
            ],
            "frame_scale",
        )  # (B, 1, n_groups, s)
        frame_scale = b.node("Reshape", [frame_scale, b.const("frames", i64(0, 1, -1))], "frame_scale_flat")
        frame_scale = b.node(
            "Slice",
            [frame_scale, b.const("zero", i64(0)), length, b.const("time_axis", i64(2))],
            "frame_scale_cut",
        )  # (B, 1, T)
        codes = b.node(
            "QuantizeLinear", [b.node("Div", [x, frame_scale], "scaled"), one, zero_point], "codes_ct"
        )
        codes = b.node("Transpose", [codes], "codes", perm=[0, 2, 1])  # (B, T, C) uint8
        scale = b.node("Transpose", [group_scale], "scale", perm=[0, 2, 1])  # (B, n_groups, 1)
    else:
        x = b.node("Transpose", [node.input[0]], "frames", perm=[0, 2, 1])  # (B, T, C)
        peak = b.reduce_max(b.node("Abs", [x], "abs"), 2, "frame_peak")  # (B, T, 1)
        peak = b.node("Transpose", [peak], "frame_peak_t", perm=[0, 2, 1])  # (B, 1, T)
        peak = b.node("MaxPool", [peak], "group_peak", kernel_shape=[stride], strides=[stride], ceil_mode=1)
        peak = b.node("Transpose", [peak], "group_peak_t", perm=[0, 2, 1])  # (B, n_groups, 1)
        scale = b.node("Div", [b.node("Max", [peak, floor], "peak_floor"), levels], "scale")
        # one per-axis QuantizeLinear over the (B T, C) rows, with no pass of its own to divide
        frame_scale = b.node("Expand", [scale, b.const("group_shape", i64(1, 1, stride))], "frame_scale")
        frame_scale = b.node("Reshape", [frame_scale, b.const("batch_rows", i64(0, -1))], "frame_scale_rows")
        length = b.length(x, 1, "length")  # [T]
        frame_scale = b.node(
            "Slice",
            [frame_scale, b.const("zero", i64(0)), length, b.const("time_axis", i64(1))],
            "frame_scale_cut",
        )  # (B, T)
        frame_scale = b.node("Reshape", [frame_scale, b.const("flat", i64(-1))], "frame_scale_flat")  # (B T,)
        zero_points = b.node(
            "Expand", [zero_point, b.node("Shape", [frame_scale], "n_frames")], "zero_points"
        )
        flat = b.node("Reshape", [x, b.const("row_shape", i64(-1, channels))], "frame_rows")  # (B T, C)
        codes = b.node("QuantizeLinear", [flat, frame_scale, zero_points], "codes_flat", axis=0)
        codes = b.node("Reshape", [codes, b.node("Shape", [x], "frames_shape")], "codes")  # (B, T, C) uint8
    # padded with code ZERO_POINT (0.0) to whole groups, then one row per group
    s = b.const("stride", i64(stride))
    n_groups = b.node(
        "Div", [b.node("Add", [length, b.const("stride_m1", i64(stride - 1))], "length_up"), s], "n_groups"
    )
    pad = b.node("Sub", [b.node("Mul", [n_groups, s], "padded"), length], "pad")
    pads = b.node(
        "Concat", [b.const("pads_head", i64(0, 0, 0, 0)), pad, b.const("pads_tail", i64(0))], "pads", axis=0
    )
    codes = b.node("Pad", [codes, pads, zero_point], "codes_padded")
    rows = b.node("Reshape", [codes, b.const("rows_shape", i64(0, -1, stride * channels))], "rows")
    # output frames: max(T - k + s, 0) // s, which is (T - k) // s + 1 from T = k on and none below (a float
    # Conv rejects T < k; Div truncates towards zero, so (T - k) // s + 1 would give one frame there);
    # product g takes groups g .. g + T_out - 1
    reach = b.node("Sub", [length, b.const("kernel_m_stride", i64(kernel - stride))], "reach")
    t_out = b.node("Div", [b.node("Max", [reach, b.const("zero_frames", i64(0))], "reach_pos"), s], "t_out")
    scale_w = b.const("weight_scale", weight_scale)
    row_axes, group_axis = b.const("row_axes", i64(1, 2)), b.const("group_axis", i64(1))
    parts = []
    for g, matrix in enumerate(matrices):
        end = b.node("Add", [t_out, b.const(f"offset{g}", i64(g))], f"end{g}")
        ends = b.node("Concat", [end, b.const(f"width{g}", i64(matrix.shape[0]))], f"ends{g}", axis=0)
        a = b.node("Slice", [rows, b.const(f"starts{g}", i64(g, 0)), ends, row_axes], f"a{g}")
        product = b.node(
            "MatMulIntegerToFloat",
            [a, b.const(f"weight{g}", matrix), one, scale_w, zero_point],
            f"product{g}",
            domain="com.microsoft",
        )  # (B, T_out, N): codes x weight codes x weight scale
        group_scale = b.node("Slice", [scale, b.const(f"offset_s{g}", i64(g)), end, group_axis], f"scale{g}")
        parts.append(b.node("Mul", [product, group_scale], f"part{g}"))
    y = parts[0] if len(parts) == 1 else b.node("Sum", parts, "sum")
    if len(node.input) > 2 and node.input[2]:
        y = b.node("Add", [y, node.input[2]], "bias")
    b.node("Transpose", [y], "out", output=node.output[0], perm=[0, 2, 1])  # (B, N, T_out)
    return b.nodes


def _unique(base: str, taken: Set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def quantize_convs(onnx, proto) -> List[str]:
    """Rewrite every ``convertible`` Conv of ``proto`` (in place) as int8 matrix products with per-group
    dynamic scales, in the operator signatures of the graph's opset (at least ``MIN_OPSET``, else a
    ``ValueError``); returns the names of the rewritten nodes (``conv_I`` for the node at position ``I`` when
    it has none). Their new nodes and constants are named ``NAME/int8/...``, unique in the graph. The replaced
    float weights are dropped."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    opset = graph_opset(proto)
    if opset < MIN_OPSET and any(convertible(n, initializers, onnx.helper) for n in graph.node):
        raise ValueError(f"the graph's opset {opset} is below {MIN_OPSET}, the int8 CNN's least")
    taken = {n.name for n in graph.node}
    nodes, rewritten = [], []
    for position, node in enumerate(graph.node):
        if not convertible(node, initializers, onnx.helper):
            nodes.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = onnx.numpy_helper.to_array(initializers[node.input[1]])
        stride = int(attrs.get("strides", [1])[0])
        label = node.name or _unique(f"conv_{position}", taken)
        prefix = _unique(f"{label}/int8", taken)
        nodes.extend(_rewrite(onnx, graph, node, weight, stride, not rewritten, prefix=prefix, opset=opset))
        rewritten.append(label)
    if not rewritten:
        return rewritten
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return rewritten
