"""FedEx-LoRA: average A and B like FedIT, and fold what that average misses
into the base weights (Singhal et al., "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Foundation Models", NAACL 2025,
arXiv 2410.09432).

Per layer, with `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `ΔW = Σ p_k B_k A_k`, the
residual `ΔW − B̄Ā` (times the LoRA scale `s`) is added to the adapter's
`base_delta`, so `W0 + base_delta + s·B̄Ā` is exactly the average of the
clients' effective weights. The residual goes factored,
`[p_1B_1 … p_KB_K, B̄] [A_1; …; A_K; −Ā]`, of rank at most `(K+1)r`.

Uplink `r(m+n)` per layer. Downlink `r(m+n)` plus the accumulated residual,
`(K+1)r(m+n)` more per round, capped at `min(m,n)·(m+n)` by `extend_base_delta`.
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


class FedExLoRA(Aggregator):
    """FedIT's averages for the factors and the head, plus the exact residual in the base weights.

    Args:
        lora_scale: `s = alpha / r`, the factor on `B @ A` in the clients' effective weights.
    """

    name = "fedex_lora"

    def __init__(self, lora_scale: float) -> None:
        self.lora_scale = float(lora_scale)

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors, base_delta = {}, dict(current.base_delta)
        for layer, (a, b) in current.factors.items():
            # ΔW = B_w A_s, B_w = [p_1B_1 … p_KB_K] (`Bw`), A_s = [A_1; …; A_K]
            stack = LowRankSum.stack(*layer_factors(updates, layer), p)
            a_bar, b_bar = stack.mean_A(), stack.mean_B()
            Q = torch.cat([stack.A, -a_bar])  # ΔW − B̄Ā = [B_s, B̄] [A_s; −Ā]
            P = self.lora_scale * torch.cat([stack.Bw, b_bar], dim=1)
            base_delta[layer] = extend_base_delta(current.base_delta.get(layer), Q, P, a.dtype)
            factors[layer] = (a_bar.to(a.dtype), b_bar.to(b.dtype))
        return Adapter(factors, average_heads(updates, p), base_delta), base_delta_metrics(base_delta)
