"""FedSA-LoRA: share and average only A; every client keeps its own B
(Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025, arXiv 2410.01463).

The paper finds A learns what is common to all clients and B what is
client-specific, so B is never aggregated: each client trains A and B
(`train-factors = "AB"`), keeps its B between rounds (`personal-b`) and sends
only A and the head: uplink `r·n` per layer. Downlink `r(m+n)`: the global B
(its initial value, which a client uses only until it has its own) is re-sent
every round so that clients stay stateless; an A-only downlink would be `r·n`.
The global adapter's B stays at its initial value, so a server-side evaluation
of it shows global A with the initial B; the personalised models are evaluated
on the clients (`personalized`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    PERSONAL_B,
    TRAIN_FACTORS,
    Adapter,
    Aggregator,
    ClientConfig,
    ClientUpdate,
    average_heads,
    client_weights,
    weighted_mean,
)


class FedSALoRA(Aggregator):
    """Weighted average of A and of the head; the global B stays as it was (each client has its own)."""

    name = "fedsa_lora"
    personalized = True

    def client_config(self, server_round: int) -> ClientConfig:
        return {TRAIN_FACTORS: "AB", PERSONAL_B: True}

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors = {
            layer: (weighted_mean([u.adapter.factors[layer][0] for u in updates], p), b)
            for layer, (_, b) in current.factors.items()
        }
        return Adapter(factors, average_heads(updates, p)), {}
