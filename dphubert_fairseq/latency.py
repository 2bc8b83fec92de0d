"""A latency cost model: the forward time of an architecture on one device, predicted from per-unit costs
measured there (``dphubert-profile``, ``latency_profile.py``).

The model, per block of the teacher's shape, for one utterance of ``seconds`` (batch 1):

- conv block ``i``: ``a_i + b_i * C_in * C_out + c_i * C_out`` (the convolution's MACs, and the elementwise
  normalisation and GELU over the block's output);
- feature LayerNorm + projection (the LayerNorm alone in a model without one): ``a + b * F``, ``F`` the CNN's
  output channels it reads;
- attention: ``a * [H > 0] + b * H`` per layer, ``H`` its heads; FFN: ``a * [F > 0] + b * F`` per layer, ``F``
  its units (a block that keeps nothing costs nothing); each times the layer's keep value;
- everything else (positional convolution, the encoder's LayerNorms, glue): one constant.

Every coefficient is >= 0, so the predicted time grows with every unit kept, which the landing on the target
(``target_projection``) relies on. The same function takes the sizes of a real architecture (ints) and the
expected sizes of a gated model (tensors, differentiable in the gates), exactly as ``macs`` counts MACs: a
``LatencyTable`` is a size metric (``macs.size``) wherever ``"params"`` or ``"macs"`` is.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .atomic_files import atomic_write_text
from .conv_spec import parse_conv_layers
from .errors import ConfigError
from .param_count import Number, UnitSizes, per_layer_vectors, static_sizes

#: The file format's name and version, written into every table.
FORMAT = "dphubert-latency-table/1"
#: The dtypes a table can be timed in (``dphubert-profile --dtype``), as torch names them.
DTYPES = ("float32", "float16", "bfloat16")
#: The architecture keys a table was measured for: a table applies to a teacher whose keys are all equal.
SHAPE_KEYS = (
    "conv_feature_layers",
    "extractor_mode",
    "conv_bias",
    "encoder_layers",
    "encoder_embed_dim",
    "attention_head_dim",
    "encoder_attention_heads",
    "encoder_ffn_embed_dims",
    "layer_norm_first",
    "conv_pos",
    "conv_pos_groups",
    "conv_pos_depth",
    "relative_position_buckets",
    "post_extract_proj",
)
#: the SHAPE_KEYS in which a model pruned from the teacher differs from it (the CNN only in its channels)
SIZED_KEYS = ("conv_feature_layers", "encoder_attention_heads", "encoder_ffn_embed_dims")


def architecture_shape(cfg) -> Dict[str, Any]:
    """The ``SHAPE_KEYS`` of a ``DPHuBERTConfig``, as plain values."""
    return {key: _plain(getattr(cfg, key)) for key in SHAPE_KEYS}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _present(n):
    """1 where a block keeps at least one unit, else 0: ``min(n, 1)`` for counts, so that an expected count
    below one unit (a block about to be emptied) pays its fixed cost in proportion."""
    if torch.is_tensor(n):
        return n.clamp(max=1.0)
    if isinstance(n, np.ndarray):
        return np.minimum(n, 1)
    return min(n, 1)


@dataclass
class BlockCosts:
    """Seconds of one block kind as ``fixed * [present] + per_unit * units (+ per_pair * in * out)``."""

    fixed: float
    per_unit: float
    per_pair: float = 0.0


@dataclass
class LatencyTable:
    """Per-unit costs of a teacher's shape on one device, for a batch of ``batch`` utterances of ``seconds``
    in ``dtype``."""

    device: str
    threads: int
    seconds: float
    shape: Dict[str, Any]
    conv: List[BlockCosts]
    projection: BlockCosts
    attention: BlockCosts
    ffn: BlockCosts
    rest: float
    #: utterances per forward pass, and the weights' and inputs' dtype (``DTYPES``) they were timed in
    batch: int = 1
    dtype: str = "float32"
    #: the teacher checkpoint's own forward time (its fairseq model, ``dphubert-profile --teacher``): the
    #: denominator of a latency sparsity, so that 0.40 means 0.40 of what the user runs today; None: the
    #: predicted time of the teacher's shape
    teacher_measured: Optional[float] = None
    #: how the table was made: the device's name, the torch version, the date, the measured teacher time,
    #: the fit's largest relative error on the measured totals
    provenance: Dict[str, Any] = field(default_factory=dict)

    # ----- the formula -----

    def breakdown(self, cfg, sizes: UnitSizes) -> Dict[str, Number]:
        """Predicted seconds by block kind (``conv``, ``projection``, ``attention``, ``ffn``, ``rest``) of a
        ``DPHuBERTConfig`` architecture of this table's shape with ``sizes`` (ints, or tensors for expected
        sizes: differentiable)."""
        conv: Number = 0.0
        in_channels: Number = 1
        for costs, out_channels in zip(self.conv, sizes.conv_channels, strict=True):
            conv = (
                conv
                + costs.fixed
                + costs.per_pair * in_channels * out_channels
                + costs.per_unit * out_channels
            )
            in_channels = out_channels
        # the profile times the feature LayerNorm with the projection, so this term stays without one
        features = in_channels + (1 if cfg.feature_norm_removed_channels > 0 else 0)
        projection = self.projection.fixed + self.projection.per_unit * features
        heads, ffn_dims, keep_att, keep_ffn = per_layer_vectors(
            sizes.heads, sizes.ffn_dims, sizes.attention_keep, sizes.ffn_keep
        )
        layers = len(sizes.heads)
        attention = keep_att * (self.attention.fixed * _present(heads) + self.attention.per_unit * heads)
        ffn = keep_ffn * (self.ffn.fixed * _present(ffn_dims) + self.ffn.per_unit * ffn_dims)
        return {
            "conv": conv,
            "projection": projection,
            "attention": _layer_sum(attention, layers),
            "ffn": _layer_sum(ffn, layers),
            "rest": self.rest,
        }

    def predict(self, cfg, sizes: UnitSizes) -> Number:
        """Predicted seconds of one forward pass: the sum of ``breakdown``."""
        parts = self.breakdown(cfg, sizes)
        return parts["conv"] + parts["projection"] + parts["attention"] + parts["ffn"] + parts["rest"]

    def teacher_seconds(self) -> float:
        """The denominator of a latency sparsity: the teacher's measured time, else ``predicted_teacher``."""
        return self.teacher_measured if self.teacher_measured is not None else self.predicted_teacher()

    def predicted_teacher(self) -> float:
        """Predicted seconds of the teacher's shape (every unit kept) as this table's blocks."""
        layers = self.shape["encoder_layers"]
        sizes = UnitSizes(
            conv_channels=[c for c, _, _ in parse_conv_layers(self.shape["conv_feature_layers"])],
            heads=list(self.shape["encoder_attention_heads"]),
            ffn_dims=list(self.shape["encoder_ffn_embed_dims"]),
            attention_keep=[1] * layers,
            ffn_keep=[1] * layers,
        )
        cfg = SimpleNamespace(
            post_extract_proj=self.shape["post_extract_proj"], feature_norm_removed_channels=0
        )
        return float(self.predict(cfg, sizes))

    # ----- checks and files -----

    def check_shape(self, cfg, where: str, pruned: bool = False) -> None:
        """Raise ``ConfigError`` (one line, naming ``where`` and the first differing key) when the teacher
        ``cfg`` is not of the shape this table was measured for; ``pruned``: ``cfg`` is a model pruned from
        such a teacher, whose sizes (``SIZED_KEYS``) may differ, but not its CNN's kernels and strides."""
        shape = architecture_shape(cfg)
        for key in SHAPE_KEYS:
            here, there = shape[key], self.shape.get(key)
            if pruned and key == "conv_feature_layers":
                here, there = (
                    None if v is None else [(k, s) for _, k, s in parse_conv_layers(v)] for v in (here, there)
                )
            elif pruned and key in SIZED_KEYS:
                continue
            if here != there:
                whose = "this model's teacher" if pruned else "this teacher"
                raise ConfigError(
                    f"{where}: measured for another teacher shape (model.{key} {there!r} there, {here!r} "
                    f"for {whose}); run dphubert-profile --teacher on {whose}"
                )

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str) -> None:
        """Write the table as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LatencyTable":
        blocks = {k: BlockCosts(**data[k]) for k in ("projection", "attention", "ffn")}
        values = dict(
            device=str(data["device"]),
            threads=int(data["threads"]),
            seconds=float(data["seconds"]),
            shape=dict(data["shape"]),
            conv=[BlockCosts(**c) for c in data["conv"]],
            rest=float(data["rest"]),
            batch=int(data.get("batch", 1)),  # tables written before these keys: one utterance in fp32
            dtype=str(data.get("dtype", "float32")),
            teacher_measured=None
            if data.get("teacher_measured") is None
            else float(data["teacher_measured"]),
            provenance=dict(data.get("provenance", {})),
            **blocks,
        )
        table = cls(**values)
        numbers = [table.rest] + [v for b in table.blocks() for v in (b.fixed, b.per_unit, b.per_pair)]
        if not all(math.isfinite(v) and v >= 0 for v in numbers):
            raise ValueError("every cost must be a finite number >= 0")
        if table.batch < 1 or table.dtype not in DTYPES:
            raise ValueError(f"batch must be >= 1 and dtype one of {', '.join(DTYPES)}")
        try:
            layers = parse_conv_layers(table.shape["conv_feature_layers"])
        except Exception as err:  # fairseq's format is a Python expression: anything can be wrong in it
            raise ValueError(f"shape.conv_feature_layers is not a conv spec ({type(err).__name__}: {err})")
        if len(table.conv) != len(layers):
            raise ValueError("one conv entry per conv layer of its shape is needed")
        teacher = table.teacher_seconds()
        if not (math.isfinite(teacher) and teacher > 0):
            raise ValueError(f"the teacher's seconds must be a finite number > 0, got {teacher}")
        return table

    def blocks(self) -> List[BlockCosts]:
        return [*self.conv, self.projection, self.attention, self.ffn]


def _layer_sum(values, layers: int) -> Number:
    """The sum over layers of a per-layer vector, or of a number standing for every layer."""
    if torch.is_tensor(values) or isinstance(values, np.ndarray):
        return values.sum() if values.ndim else values * layers
    return values * layers


def load_table(path: str, where: str = "criterion.latency_table") -> LatencyTable:
    """Read a ``dphubert-profile`` table; ``ConfigError`` (one line naming ``where`` and the file) when it is
    missing or not one."""
    if not path:
        raise ConfigError(
            f"{where} is not set: criterion.target_metric=latency needs dphubert-profile's table"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"{where}={path}: no such file (write one with dphubert-profile --out {path})")
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        return LatencyTable.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}={path}: not a dphubert-profile table ({err})") from None


# ----- fitting measured block times -----


def _fit_nonnegative(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: columns whose coefficient comes out negative are dropped
    and the rest refitted (enough for the two or three columns of a block)."""
    keep = list(range(columns.shape[1]))
    coef = np.zeros(columns.shape[1])
    while keep:
        solution = np.linalg.lstsq(columns[:, keep], y, rcond=None)[0]
        if (solution >= 0).all():
            coef[keep] = solution
            return coef
        keep.pop(int(np.argmin(solution)))
    return coef


def fit_block(rows: Sequence[Tuple[float, ...]], kind: str) -> BlockCosts:
    """Coefficients of one block kind from measured ``rows``.

    ``kind`` 'conv': rows of ``(C_in, C_out, seconds)``; 'linear' (projection): ``(F, seconds)``, always
    present; 'units' (attention, FFN): ``(units, seconds)``, absent at 0 units."""
    data = np.asarray(rows, dtype=np.float64)
    y = data[:, -1]
    ones = np.ones(len(data))
    if kind == "conv":
        c_in, c_out = data[:, 0], data[:, 1]
        fixed, pair, unit = _fit_nonnegative(np.stack([ones, c_in * c_out, c_out], 1), y)
        return BlockCosts(fixed=float(fixed), per_unit=float(unit), per_pair=float(pair))
    units = data[:, 0]
    present = ones if kind == "linear" else np.minimum(units, 1)
    fixed, unit = _fit_nonnegative(np.stack([present, units], 1), y)
    return BlockCosts(fixed=float(fixed), per_unit=float(unit))


@dataclass
class Measurement:
    """One profiled architecture: its config (``DPHuBERTConfig``) and the measured seconds of its blocks
    (``conv`` per layer, ``projection``, ``attention`` / ``ffn`` per layer) and of the whole forward pass."""

    cfg: Any
    conv: List[float]
    projection: float
    attention: List[float]
    ffn: List[float]
    total: float

    @property
    def rest(self) -> float:
        return self.total - sum(self.conv) - self.projection - sum(self.attention) - sum(self.ffn)


def fit_table(
    teacher_cfg,
    measurements: Sequence[Measurement],
    device: str,
    threads: int,
    seconds: float,
    teacher_measured: Optional[float] = None,
    batch: int = 1,
    dtype: str = "float32",
    **provenance,
) -> LatencyTable:
    """The table that explains ``measurements`` (architectures of ``teacher_cfg``'s shape with other sizes,
    timed on batches of ``batch`` utterances in ``dtype``); ``teacher_measured``: the teacher checkpoint's own
    time, when it was measured."""
    conv_rows: List[List[Tuple[float, float, float]]] = [
        [] for _ in parse_conv_layers(teacher_cfg.conv_feature_layers)
    ]
    projection_rows, attention_rows, ffn_rows = [], [], []
    for m in measurements:
        channels = [c for c, _, _ in parse_conv_layers(m.cfg.conv_feature_layers)]
        for i, seconds_i in enumerate(m.conv):
            conv_rows[i].append((channels[i - 1] if i else 1, channels[i], seconds_i))
        projection_rows.append((channels[-1], m.projection))
        for layer, (h, f) in enumerate(zip(m.cfg.encoder_attention_heads, m.cfg.encoder_ffn_embed_dims)):
            attention_rows.append((h, m.attention[layer]))
            ffn_rows.append((f, m.ffn[layer]))
    table = LatencyTable(
        device=device,
        threads=threads,
        seconds=seconds,
        shape=architecture_shape(teacher_cfg),
        conv=[fit_block(rows, "conv") for rows in conv_rows],
        projection=fit_block(projection_rows, "linear"),
        attention=fit_block(attention_rows, "units"),
        ffn=fit_block(ffn_rows, "units"),
        rest=float(max(0.0, np.median([m.rest for m in measurements]))),
        batch=batch,
        dtype=dtype,
        teacher_measured=teacher_measured,
    )
    totals = [[m.total, float(table.predict(m.cfg, static_sizes(m.cfg)))] for m in measurements]
    table.provenance = {
        **provenance,
        "profiled_architectures": len(measurements),
        "measured_and_predicted_seconds": totals,
        "max_rel_error": max(abs(predicted / measured - 1) for measured, predicted in totals),
    }
    return table


def block_report(table: LatencyTable, models: Dict[str, Tuple[Any, Optional[float]]]) -> str:
    """A text table of predicted seconds per block kind for named ``(config, measured seconds or None)``."""
    kinds = ("conv", "projection", "attention", "ffn", "rest")
    lines = [
        f"{'model':>16}  " + "  ".join(f"{k:>10}" for k in kinds) + f"  {'predicted':>9}  {'measured':>9}"
    ]
    for name, (cfg, measured) in models.items():
        parts = {k: float(v) for k, v in table.breakdown(cfg, static_sizes(cfg)).items()}
        total = sum(parts.values())
        shown = f"{measured:9.4f}" if measured is not None else f"{'':>9}"
        lines.append(
            f"{name:>16}  " + "  ".join(f"{parts[k]:10.4f}" for k in kinds) + f"  {total:9.4f}  {shown}"
        )
    return "\n".join(lines)
