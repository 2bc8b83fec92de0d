"""WavLM's relative position bias: a learned per-head bias for every bucket of query-key distances.

WavLM keeps one table in its first layer's attention and hands the bias it computes on to every later layer,
each of which scales it by its own gate (``prunable_wavlm_attention``). Here the table belongs to the encoder,
so that it survives the removal of layer 0's attention; its columns are the teacher's heads, and a pruned
layer reads the columns of the heads it kept.
"""

import math

import torch
import torch.nn as nn


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bucket of every (query, key) distance, as T5 and WavLM define it (bidirectional): half the buckets for
    keys after the query, half for keys before; in each half, distances below a quarter of ``num_buckets``
    have one bucket each, larger ones share log-spaced buckets up to ``max_distance``, beyond which they
    share the last. ``-> (T, T)`` long, entry ``[q, k]`` for distance ``k - q``."""
    positions = torch.arange(length, dtype=torch.long, device=device)
    distance = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (distance > 0).long() * half
    distance = distance.abs()
    exact = half // 2
    # log-spaced buckets for distances >= exact (clamped below at 1 so that the unused branch stays finite)
    spread = (
        torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    )
    large = (exact + spread.long()).clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """The bias table: ``weight`` ``(num_buckets, num_heads)`` -> bias ``(num_heads, T, T)`` for a length."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))
        nn.init.xavier_normal_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"num_buckets={self.num_buckets}, heads={self.weight.size(1)}, max_distance={self.max_distance}"
        )

    def forward(self, length: int) -> torch.Tensor:
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance, self.weight.device)
        return self.weight[buckets].permute(2, 0, 1)
