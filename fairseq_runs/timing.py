"""Wall time of a model's forward pass, as the quickstart and the comparison report it."""

import time
from typing import Callable

import torch


def forward_seconds(
    model: torch.nn.Module, source: torch.Tensor, hidden_states: Callable, repeats: int = 5
) -> float:
    """Median wall time of ``hidden_states(model, source)`` without gradients (one warm-up run first)."""
    times = []
    with torch.inference_mode():
        hidden_states(model, source)
        for _ in range(repeats):
            start = time.perf_counter()
            hidden_states(model, source)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
