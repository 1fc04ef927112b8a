"""RoLoRA: alternate rounds that train B (A frozen) and rounds that train A
(B frozen) (Chen et al., "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA", arXiv 2409.02346).

In a B-round every client shares A, so `B̄A = Σ p_k B_k A` exactly; in an
A-round every client shares B, so `BĀ = Σ p_k B A_k` exactly. Odd rounds train
B (B starts at zero, where A's gradient vanishes), even rounds train A.
Clients send only the factor they trained (plus the head): uplink `r·m` or
`r·n` per layer; downlink `r(m+n)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .base import (
    TRAIN_FACTORS,
    Adapter,
    Aggregator,
    ClientConfig,
    ClientUpdate,
    average_heads,
    client_weights,
    weighted_mean,
)


def trained_factor(server_round: int) -> Literal["A", "B"]:
    """The factor RoLoRA trains in `server_round` (1-based): B in odd rounds, A in even ones."""
    return "B" if server_round % 2 == 1 else "A"


class RoLoRA(Aggregator):
    """Average the factor trained this round, keep the other exactly as sent.

    `training` is the factor of the round the strategy last configured
    (`client_config` is called when a round starts, before its `aggregate`).
    """

    name = "rolora"

    def __init__(self) -> None:
        self.training: Literal["A", "B"] = "B"

    def client_config(self, server_round: int) -> ClientConfig:
        self.training = trained_factor(server_round)
        return {TRAIN_FACTORS: self.training}

    def state_dict(self) -> dict[str, Any]:
        return {"training": self.training}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"training"} or state["training"] not in ("A", "B"):
            raise ValueError(f"RoLoRA state must be {{'training': 'A' | 'B'}}, got {dict(state)!r}")
        self.training = state["training"]

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors = {}
        for layer, (a, b) in current.factors.items():
            if self.training == "B":
                factors[layer] = (a, weighted_mean([u.adapter.factors[layer][1] for u in updates], p))
            else:
                factors[layer] = (weighted_mean([u.adapter.factors[layer][0] for u in updates], p), b)
        return Adapter(factors, average_heads(updates, p)), {}
