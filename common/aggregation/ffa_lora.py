"""FFA-LoRA: freeze A at its shared random init, train and average only B
(Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, arXiv 2403.12313).

Every client's product is `B_k A` with the same `A`, so the average
`B̄A = Σ p_k B_k A` is exactly the ideal update: no aggregation bias.
Clients train only B (`train-factors = "B"`) and send only B and the head:
uplink `r·m` per layer; downlink `r(m+n)` (A is re-sent each round, so clients stay stateless).
"""

from __future__ import annotations

from collections.abc import Sequence

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


class FFALoRA(Aggregator):
    """A stays the seeded init of round 1 (`current`'s A); B and the head are weighted-averaged."""

    name = "ffa_lora"

    def client_config(self, server_round: int) -> ClientConfig:
        return {TRAIN_FACTORS: "B"}

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors = {
            layer: (a, weighted_mean([u.adapter.factors[layer][1] for u in updates], p))
            for layer, (a, _) in current.factors.items()
        }
        return Adapter(factors, average_heads(updates, p)), {}
