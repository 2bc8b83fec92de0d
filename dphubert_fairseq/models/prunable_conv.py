"""The CNN feature extractor with prunable output channels in every conv layer."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import Fp32GroupNorm, Fp32LayerNorm

from ..param_count import conv_norm_kind
from .hard_concrete import INIT_DROP_RATE, HardConcrete


class ConvBlock(nn.Module):
    """conv -> [GroupNorm | LayerNorm over channels] -> GELU -> [channel gate].

    ``(B, C_in, T_in) -> (B, C_out, T_out)`` with ``T_out = floor((T_in - kernel) / stride) + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        conv_bias: bool,
        norm: Optional[str],
        gated: bool,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=conv_bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm_kind = norm
        if norm == "group":
            self.norm: Optional[nn.Module] = Fp32GroupNorm(out_channels, out_channels, affine=True)
        elif norm == "layer":
            self.norm = Fp32LayerNorm(out_channels, elementwise_affine=True)
        else:
            self.norm = None
        self.gate = HardConcrete(out_channels, INIT_DROP_RATE["conv"]) if gated else None

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm_kind == "group":
            x = self.norm(x)
        x = F.gelu(x)
        if self.gate is not None:
            x = x * self.gate().to(x.dtype).unsqueeze(-1)
        return x


class ConvFeatureExtractor(nn.Module):
    """fairseq's ``ConvFeatureExtractionModel`` with per-layer channel gates. ``(B, L) -> (B, C, T)``."""

    def __init__(
        self,
        layers: Sequence[Tuple[int, int, int]],
        extractor_mode: str,
        conv_bias: bool,
        gated_layers: Sequence[bool],
    ) -> None:
        super().__init__()
        if extractor_mode not in ("default", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {extractor_mode!r}")
        blocks: List[ConvBlock] = []
        in_channels = 1
        for i, ((out_channels, kernel, stride), gated) in enumerate(zip(layers, gated_layers)):
            blocks.append(
                ConvBlock(
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    conv_bias,
                    conv_norm_kind(extractor_mode, i),
                    gated,
                )
            )
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)

    @property
    def out_channels(self) -> int:
        return self.blocks[-1].out_channels

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Number of frames for inputs of ``input_lengths`` samples, ``(B,)`` long."""
        lengths = input_lengths
        for block in self.blocks:
            lengths = torch.div(lengths - block.kernel, block.stride, rounding_mode="floor") + 1
        return lengths.long()

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = source.unsqueeze(1)
        for block in self.blocks:
            x = block(x)
        return x
