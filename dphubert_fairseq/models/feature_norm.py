"""The LayerNorm between the CNN and the feature projection, able to stand exactly for a pruned one."""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureLayerNorm(nn.Module):
    """LayerNorm over the CNN's output channels. ``(B, T, C) -> (B, T, C)``, or ``(B, T, C + 1)`` after pruning.

    In a gated model the gates of the last conv layer scale its channels *before* this LayerNorm, so the
    removed channels were exact zeros inside its mean and variance, and their normalised values
    ``-mean / std * gamma + beta`` still fed the projection. An exported model keeps that exactly:

    - ``channel_scale`` (``C``) holds the soft gate values of the kept channels (they cannot be folded into the
      conv: a GELU sits between);
    - ``removed_channels`` phantom zeros take part in the statistics;
    - one extra output feature ``-mean / std`` carries, through one extra projection column, the removed
      channels' ``gamma`` (their ``beta`` is folded into the projection's bias).

    With no channel removed and no scale this is fairseq's plain ``LayerNorm(C)``.
    """

    def __init__(
        self, channels: int, removed_channels: int = 0, channel_scale: bool = False, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.channels = channels
        self.removed_channels = removed_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.channel_scale: Optional[nn.Parameter] = (
            nn.Parameter(torch.ones(channels)) if channel_scale else None
        )

    @property
    def out_features(self) -> int:
        return self.channels + (1 if self.removed_channels > 0 else 0)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, removed_channels={self.removed_channels}, "
            f"channel_scale={self.channel_scale is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_scale is not None:
            x = x * self.channel_scale.to(x.dtype)
        if self.removed_channels == 0:
            return F.layer_norm(x, (self.channels,), self.weight, self.bias, self.eps)
        # the statistics in float32 whatever the input's dtype, as F.layer_norm accumulates them: in fp16 the
        # sum of squares of 512 channels overflows once their spread passes ~11, and rsqrt(inf) = 0 would
        # replace every feature by its bias
        dtype = x.dtype
        x = x.float()
        total = self.channels + self.removed_channels
        mean = x.sum(-1, keepdim=True) / total
        centred = x - mean
        var = (centred.pow(2).sum(-1, keepdim=True) + self.removed_channels * mean.pow(2)) / total
        inv_std = torch.rsqrt(var + self.eps)
        normed = centred * inv_std * self.weight.float() + self.bias.float()
        return torch.cat([normed, -mean * inv_std], dim=-1).to(dtype)
