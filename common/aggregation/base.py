"""What every aggregation rule receives and returns.

An aggregation rule sees, per client, the LoRA factors of every adapted layer
(`A: r×n`, `B: m×r`), the other trainables (the task head) and the number of
training examples; it returns the next global adapter and a few metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

LayerFactors = tuple[torch.Tensor, torch.Tensor]
"""`(A, B)` of one LoRA layer: `A` is `r×n`, `B` is `m×r`."""


@dataclass
class Adapter:
    """LoRA factors per layer plus the non-LoRA trainables (the head)."""

    factors: dict[str, LayerFactors]
    head: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One client's reply: its trained adapter and how many examples it used."""

    adapter: Adapter
    num_examples: int
    node_id: int = 0


class Aggregator(ABC):
    """A server-side aggregation rule, selected by `name` in the config."""

    name: ClassVar[str]

    @abstractmethod
    def aggregate(
        self, updates: Sequence[ClientUpdate], current: Adapter
    ) -> tuple[Adapter, dict[str, float]]:
        """Combine client updates into the next global adapter (plus metrics)."""


def client_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """`p_k ∝ num_examples`, float64, summing to one."""
    if not updates:
        raise ValueError("cannot aggregate zero client updates")
    counts = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"num_examples must be non-negative with a positive sum, got {counts.tolist()}")
    return counts / counts.sum()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`Σ p_k t_k` computed in float64, returned in the dtype of the inputs."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for w, t in zip(weights.tolist(), tensors, strict=True):
        acc += w * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def average_heads(updates: Sequence[ClientUpdate], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted average of the non-LoRA trainables, key by key."""
    keys = updates[0].adapter.head.keys()
    return {k: weighted_mean([u.adapter.head[k] for u in updates], weights) for k in keys}
