"""FLoRA: stack the clients' factors, so the aggregate is exactly the sum of
their products, merge it into the base weights and restart LoRA (Wang et al.,
"FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976).

Per layer, `[B_1 … B_K] [p_1A_1; …; p_KA_K] = Σ p_k B_k A_k = ΔW` with no
aggregation bias. The stack (times the LoRA scale `s`) is added to the
adapter's `base_delta`, so clients train on `W0 + base_delta`, and the global
factors restart as a no-op: B = 0, A = the shared seeded init of round 1 (the
paper draws a fresh random A; any A with B = 0 restarts LoRA).

Uplink `r(m+n)` per layer. Downlink is the accumulated stack, `Kr(m+n)` more
per round (K× a FedIT round), sent whole so that a client need not have seen
earlier rounds; `extend_base_delta` caps it at `min(m,n)·(m+n)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    Adapter,
    Aggregator,
    ClientUpdate,
    average_heads,
    base_delta_metrics,
    client_weights,
    extend_base_delta,
    layer_factors,
)
from .factored import LowRankSum


class FLoRA(Aggregator):
    """Merge `s·Σ p_k B_k A_k` into the base weights; restart the factors; average the head.

    Args:
        lora_scale: `s = alpha / r`, the factor on `B @ A` in the clients' effective weights.
    """

    name = "flora"
    mixed_ranks = True  # the stack takes each client's own rank

    def __init__(self, lora_scale: float) -> None:
        self.lora_scale = float(lora_scale)

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors, base_delta = {}, dict(current.base_delta)
        for layer, (a, b) in current.factors.items():
            # ΔW = B_w A_s, B_w = [p_1B_1 … p_KB_K] (`Bw`), A_s = [A_1; …; A_K]
            stack = LowRankSum.stack(*layer_factors(updates, layer), p, same_rank=False)
            base_delta[layer] = extend_base_delta(
                current.base_delta.get(layer), stack.A, self.lora_scale * stack.Bw, a.dtype
            )
            factors[layer] = (a, torch.zeros_like(b))
        return Adapter(factors, average_heads(updates, p), base_delta), base_delta_metrics(base_delta)
