"""The CNN feature extractor with prunable output channels in every conv layer."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import Fp32GroupNorm, Fp32LayerNorm

from ..conv_spec import conv_norm_kind
from ..errors import ConfigError
from .hard_concrete import INIT_DROP_RATE, HardConcrete


class ConvBlock(nn.Module):
    """conv -> [GroupNorm | LayerNorm over channels] -> GELU, with a gate on its output channels.

    ``(B, C_in, T_in) -> (B, C_out, T_out)`` with ``T_out = floor((T_in - kernel) / stride) + 1``. The block
    does not apply its own gate: ``ConvFeatureExtractor`` hands it to the next block, which scales its conv
    weight's input channels by it (the same product without another pass over, and another saved copy of, the
    largest activations of the model).
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

    def forward(self, x: torch.Tensor, in_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``in_scale`` ``(C_in,)``: the previous block's gate values, applied to this block's input."""
        weight = self.conv.weight
        if in_scale is not None:
            weight = weight * in_scale.to(weight.dtype).view(1, -1, 1)
        x = F.conv1d(x, weight, self.conv.bias, stride=self.stride)
        if self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm_kind == "group":
            x = self.norm(x)
        return F.gelu(x)


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
            raise ConfigError(
                f"model.extractor_mode must be 'default' or 'layer_norm', got {extractor_mode!r}"
            )
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
        scale: Optional[torch.Tensor] = None
        for block in self.blocks:
            x = block(x, scale)
            scale = block.gate() if block.gate is not None else None
        if scale is not None:  # the last block's gate has no conv after it
            x = x * scale.to(x.dtype).unsqueeze(-1)
        return x
