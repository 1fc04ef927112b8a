"""FedIT: average A and B separately (Zhang et al., "Towards Building the
Federated GPT: Federated Instruction Tuning", ICASSP 2024, arXiv 2305.05644).

Sends `r(m+n)` values per layer each way. Its product `B̄Ā` differs from the
ideal `Σ p_k B_k A_k` (aggregation bias): the baseline LoRA-FAIR corrects.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Adapter, Aggregator, ClientUpdate, average_heads, client_weights, weighted_mean
from .ranks import RankPadding, pad_updates


class FedIT(Aggregator):
    """Weighted average of each factor and of the head; mixed ranks are padded first: with zeros (HetLoRA) or,
    `rank_padding="global"`, with the global factors the clients were sent (`fairedge.common.aggregation.ranks`)."""

    name = "fedit"
    mixed_ranks = True

    def __init__(self, rank_padding: RankPadding = "zeros") -> None:
        self.rank_padding: RankPadding = rank_padding

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        updates = pad_updates(updates, current, self.rank_padding)
        factors = {
            layer: (
                weighted_mean([u.adapter.factors[layer][0] for u in updates], p),
                weighted_mean([u.adapter.factors[layer][1] for u in updates], p),
            )
            for layer in current.factors
        }
        return Adapter(factors, average_heads(updates, p)), {}
