"""What every aggregation rule receives and returns.

An aggregation rule sees, per client, the LoRA factors of every adapted layer
(`A: r×n`, `B: m×r`), the other trainables (the task head) and the number of
training examples; it returns the next global adapter and a few metrics.

Two small extensions serve the baselines that need more than factors:
- `Adapter.base_delta`: a factored change of the frozen base weights
  (FLoRA, FedEx-LoRA merge part of the update into them), `W = W0 + P @ Q`.
- `Aggregator.client_config(r)`: per-round instructions to the clients
  (which factors train, whether B stays on the client).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

LayerFactors = tuple[torch.Tensor, torch.Tensor]
"""`(A, B)` of one LoRA layer: `A` is `r×n`, `B` is `m×r`."""

BaseDelta = tuple[torch.Tensor, torch.Tensor]
"""`(Q, P)` of one layer's base-weight change `P @ Q`: `Q` is `q×n`, `P` is `m×q` (like `(A, B)`)."""

ClientConfig = dict[str, str | int | float | bool]
"""Per-round instructions to clients; merged into the Flower train ConfigRecord."""

TRAIN_FACTORS = "train-factors"
"""Client config key: which LoRA factors train this round, "AB" (default), "A" or "B"."""
PERSONAL_B = "personal-b"
"""Client config key: True = each client keeps its own B across rounds and does not send it."""


@dataclass
class Adapter:
    """LoRA factors per layer, the non-LoRA trainables (the head) and a change of the base weights.

    `base_delta[layer] = (Q, P)` means the frozen base weight of that layer is
    `W0 + P @ Q` (any LoRA scale already folded in); layers without an entry keep `W0`.
    Only the server writes it; clients apply it and never send one back.
    """

    factors: dict[str, LayerFactors]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    base_delta: dict[str, BaseDelta] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """One client's reply: its trained adapter and how many examples it used."""

    adapter: Adapter
    num_examples: int
    node_id: int = 0


class Aggregator(ABC):
    """A server-side aggregation rule, selected by `name` in the config."""

    name: ClassVar[str]
    personalized: ClassVar[bool] = False
    mixed_ranks: ClassVar[bool] = False
    """True when the rule aggregates clients of different LoRA ranks into the global rank (`ranks`)."""
    """True when clients keep part of the model (FedSA-LoRA's B): the strategy then
    asks every client to evaluate its own model after each round."""

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        """Combine client updates into the next global adapter (plus metrics)."""

    def client_config(self, server_round: int) -> ClientConfig:
        """Instructions for the clients of round `server_round` (`TRAIN_FACTORS`, `PERSONAL_B`).

        The strategy calls this when it starts a round, before that round's `aggregate`.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the rule carries from one round to the next, for a checkpoint: JSON values or tensors.

        Constructor arguments are not state (a resumed run rebuilds the rule from its config).
        Most rules keep nothing.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; a key the rule does not keep is an error, not silently ignored."""
        if state:
            raise ValueError(f"aggregation {self.name!r} keeps no state, got keys {sorted(state)}")


def reply_factors(config: Mapping[str, object]) -> str:
    """The LoRA factors a client sends back under a round config: those it trains, less a personal B."""
    trains = str(config.get(TRAIN_FACTORS, "AB"))
    if trains not in ("AB", "A", "B"):
        raise ValueError(f"{TRAIN_FACTORS} must be 'AB', 'A' or 'B', got {trains!r}")
    return trains.replace("B", "") if config.get(PERSONAL_B, False) else trains


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


def layer_factors(updates: Sequence[ClientUpdate], layer: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The clients' `A_k` and `B_k` of one layer, in update order."""
    return [u.adapter.factors[layer][0] for u in updates], [u.adapter.factors[layer][1] for u in updates]


def base_delta_metrics(base_delta: Mapping[str, BaseDelta]) -> dict[str, float]:
    """`base_delta_rank`: the largest rank any layer's base-weight change has reached (FLoRA, FedEx-LoRA)."""
    return {"base_delta_rank": float(max(q.shape[0] for q, _ in base_delta.values()))} if base_delta else {}


def extend_base_delta(
    old: BaseDelta | None, Q: torch.Tensor, P: torch.Tensor, dtype: torch.dtype = torch.float32
) -> BaseDelta:
    """`(Q', P')` with `P' Q' = P_old Q_old + P Q`, computed in float64, returned as `dtype`.

    The factors are stacked; once the stack is wider than `min(m, n)` it is
    re-factored exactly to rank `min(m, n)` (QR of both stacks, SVD of the small
    core), so it never outgrows a dense matrix and the `m×n` product is never formed.
    """
    Q, P = Q.to(torch.float64), P.to(torch.float64)
    if old is not None:
        Q, P = torch.cat([old[0].to(Q), Q]), torch.cat([old[1].to(P), P], dim=1)
    m, n = P.shape[0], Q.shape[1]
    if Q.shape[0] <= min(m, n):
        return Q.to(dtype), P.to(dtype)
    QP, RP = torch.linalg.qr(P)  # P = QP RP, QP m×min(m,q)
    QQ, RQ = torch.linalg.qr(Q.T)  # Qᵀ = QQ RQ, QQ n×min(n,q)
    U, S, Vh = torch.linalg.svd(RP @ RQ.T, full_matrices=False)  # min(m, n) singular values
    return (Vh @ QQ.T).to(dtype), ((QP @ U) * S).to(dtype)
