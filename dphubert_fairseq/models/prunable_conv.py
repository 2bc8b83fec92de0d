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
        init_drop_rate: float = INIT_DROP_RATE["conv"],
    ) -> None:
        """``init_drop_rate``: where the channel gates start (``HardConcrete``), when ``gated``."""
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
        # one channel always stays active: a block with none left could not be computed (its conv would have
        # no output channel), and an export refuses a conv layer without channels anyway
        self.gate = HardConcrete(out_channels, init_drop_rate, min_active=1) if gated else None

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(
        self,
        x: torch.Tensor,
        in_scale: Optional[torch.Tensor] = None,
        in_index: Optional[torch.Tensor] = None,
        out_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``in_scale`` ``(C_in,)``: the previous block's gate values, applied to this block's input.
        ``in_index``: the input channels ``x`` holds (``x`` is ``(B, len(in_index), T_in)``), None for all;
        ``out_index``: the output channels to compute, None for all (not with a LayerNorm over channels, whose
        statistics need every channel). Returns ``(B, len(out_index) or C_out, T_out)``."""
        weight, bias = self.conv.weight, self.conv.bias
        if out_index is not None:
            if self.norm_kind == "layer":
                raise ValueError("a conv block with a LayerNorm over its channels computes all of them")
            weight = weight.index_select(0, out_index)
            bias = bias[out_index] if bias is not None else None
        if in_index is not None:
            weight = weight.index_select(1, in_index)
            in_scale = in_scale[in_index] if in_scale is not None else None
        if in_scale is not None:
            weight = weight * in_scale.to(weight.dtype).view(1, -1, 1)
        x = F.conv1d(x, weight, bias, stride=self.stride)
        if self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm_kind == "group" and out_index is None:
            x = self.norm(x)
        elif self.norm_kind == "group":  # one group per channel: the kept channels' norms are unchanged
            norm = self.norm
            x = F.group_norm(
                x.float(),
                out_index.numel(),
                norm.weight[out_index].float(),
                norm.bias[out_index].float(),
                norm.eps,
            ).type_as(x)
        return F.gelu(x)


class ConvFeatureExtractor(nn.Module):
    """fairseq's ``ConvFeatureExtractionModel`` with per-layer channel gates. ``(B, L) -> (B, C, T)``."""

    def __init__(
        self,
        layers: Sequence[Tuple[int, int, int]],
        extractor_mode: str,
        conv_bias: bool,
        gated_layers: Sequence[bool],
        init_drop_rate: float = INIT_DROP_RATE["conv"],
    ) -> None:
        """``init_drop_rate``: where the gated layers' channel gates start (``model.conv_gate_init_drop_rate``)."""
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
                    init_drop_rate,
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
        """Channels that are 0 in the forward pass's mask (inactive channels, and in training those whose
        sample is 0) are left out of every block that can, when that pays (``HardConcrete.compute_index``; else
        they are computed and masked by the gate): a block computes its other output channels only (not with
        a LayerNorm over channels, 'layer_norm' mode, whose statistics need them all) and reads only the
        previous block's non-zero channels. The last block's channels are put back in place as zeros for the
        feature LayerNorm, which normalises over all of them."""
        return self.run_blocks(source.unsqueeze(1), self.blocks)

    @staticmethod
    def run_blocks(x: torch.Tensor, blocks: Sequence[ConvBlock]) -> torch.Tensor:
        """``blocks`` in a row on ``x`` ``(B, C_in, T)`` as ``forward`` runs them (the last one's gate applied
        to its output): the whole extractor, or a part of it timed alone (``gather_policy``)."""
        scale: Optional[torch.Tensor] = None
        held: Optional[torch.Tensor] = None  # the channels x holds, None for all
        wanted: Optional[torch.Tensor] = None  # the channels of x the next block reads, None for all
        for block in blocks:
            if wanted is not None and held is None:
                x = x.index_select(1, wanted)  # computed in full (LayerNorm), read in part
            out_index = block.gate.compute_index(x.device) if block.gate is not None else None
            if block.norm_kind == "layer":
                out_index = None
            x = block(x, scale, wanted, out_index)
            held = out_index
            scale = block.gate() if block.gate is not None else None
            wanted = block.gate.compute_index(x.device) if block.gate is not None else None
        if scale is not None:  # the last block's gate has no conv after it
            if held is None and wanted is None:
                return x * scale.to(x.dtype).unsqueeze(-1)
            if held is None:
                x = x.index_select(1, wanted)
            x = x * scale[wanted].to(x.dtype).unsqueeze(-1)
            full = x.new_zeros(x.size(0), blocks[-1].out_channels, x.size(2))
            return full.index_copy(1, wanted, x)
        return x
