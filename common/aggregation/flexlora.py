"""FlexLoRA: the best rank-r approximation of the ideal update (Bai et al.,
"Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, arXiv 2402.11505).

`ΔW = Σ p_k B_k A_k` is cut to rank `r` by a truncated SVD. With the stacks
`ΔW = B_s A_s` (see `factored`), `B_s = Q_B R_B` and `A_sᵀ = Q_A R_A` give
`ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ`: the SVD of the small `Kr×Kr` core `R_B R_Aᵀ` is the
SVD of `ΔW`, and the `m×n` matrix is never formed. Clients may use different
ranks (that is what FlexLoRA was made for); every client's factors must carry
the same LoRA scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Adapter, Aggregator, ClientUpdate, average_heads, client_weights, layer_factors
from .factored import LowRankSum, Weights


def truncated_svd(delta: LowRankSum, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`U (m×rank)`, `S (rank)`, `Vᵀ (rank×n)` of `ΔW` in float64, zero-padded past its rank."""
    QB, RB = torch.linalg.qr(delta.Bw)  # B_s W = Q_B R_B
    QA, RA = torch.linalg.qr(delta.A.T)  # A_sᵀ = Q_A R_A
    Uc, S, Vhc = torch.linalg.svd(RB @ RA.T, full_matrices=False)
    keep = min(rank, S.numel())
    U, S, Vh = QB @ Uc[:, :keep], S[:keep], Vhc[:keep] @ QA.T
    if keep < rank:  # ΔW has rank < `rank`: pad with zero directions
        m, n = delta.shape
        U = torch.cat([U, U.new_zeros(m, rank - keep)], dim=1)
        S = torch.cat([S, S.new_zeros(rank - keep)])
        Vh = torch.cat([Vh, Vh.new_zeros(rank - keep, n)], dim=0)
    return U, S, Vh


def flexlora(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], weights: Weights, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A_new rank×n, B_new m×rank)` with `B_new A_new` the best rank-`rank` approximation of `ΔW`.

    Singular values are split evenly, `B_new = U√S`, `A_new = √S Vᵀ`, so neither
    factor dominates the next round's training. Returns the dtype of the inputs.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    delta = LowRankSum.stack(A, B, weights, same_rank=False)
    U, S, Vh = truncated_svd(delta, rank)
    root = S.sqrt()
    return (root[:, None] * Vh).to(A[0].dtype), (U * root).to(B[0].dtype)


class FlexLoRA(Aggregator):
    """FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): truncated SVD of the weighted `Σ p_k B_k A_k`.

    Uplink is `r_k(m+n)` per client; the downlink is the rank-`r` factors.
    Heads are weighted-averaged.

    Args:
        rank: rank of the global factors; `None` keeps the rank of `current`.
    """

    name = "flexlora"
    mixed_ranks = True  # the SVD takes each client's own rank; a rank-r client gets the top r directions

    def __init__(self, rank: int | None = None) -> None:
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
        self.rank = rank

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors = {}
        for layer, (a_cur, _) in current.factors.items():
            rank = self.rank if self.rank is not None else a_cur.shape[0]
            factors[layer] = flexlora(*layer_factors(updates, layer), p, rank)
        return Adapter(factors, average_heads(updates, p)), {}
