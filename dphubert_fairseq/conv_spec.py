"""fairseq's ``conv_feature_layers`` string and the CNN front end's architecture rules, written once: the
models build the conv blocks from them, ``param_count`` and ``macs`` count them.

A spec is fairseq's own format, a Python expression such as ``"[(512,10,5)] + [(512,3,2)] * 4"``, read as a
list of ``(channels, kernel, stride)``, one per conv block.
"""

from typing import List, Optional, Sequence, Tuple

ConvLayer = Tuple[int, int, int]


def parse_conv_layers(spec: str) -> List[ConvLayer]:
    """``conv_feature_layers`` -> ``[(channels, kernel, stride), ...]``."""
    layers = eval(spec, {"__builtins__": {}}, {})  # fairseq's own format is a Python expression
    return [tuple(int(v) for v in layer) for layer in layers]


def receptive_field(spec: str) -> int:
    """The samples one output frame of the CNN ``spec`` reads: the shortest input it makes a frame of."""
    samples = 1
    for _, kernel, stride in reversed(parse_conv_layers(spec)):
        samples = (samples - 1) * stride + kernel
    return samples


def format_conv_layers(layers: Sequence[ConvLayer]) -> str:
    """``[(channels, kernel, stride), ...]`` -> a ``conv_feature_layers`` string (one entry per block)."""
    return "[" + ", ".join(f"({c}, {k}, {s})" for c, k, s in layers) + "]"


def conv_norm_kind(extractor_mode: str, layer: int) -> Optional[str]:
    """The normalisation inside conv block ``layer``: fairseq's 'default' extractor has one GroupNorm (one group
    per channel) in the first block, the 'layer_norm' extractor a LayerNorm over channels in every block."""
    if extractor_mode == "layer_norm":
        return "layer"
    if extractor_mode == "default" and layer == 0:
        return "group"
    return None
