"""The ideal update `ΔW = Σ p_k B_k A_k`, kept as its stacked factors.

`ΔW` is `m×n` (4096² floats for one attention projection of a 7B model);
its factors are only `K·r·(m+n)`. Every aggregation rule that needs `ΔW`
(its norm, its products with small matrices, its truncated SVD) can work on

    ΔW = B_s A_s,   B_s = [p_1B_1 … p_KB_K]  (m×Kr),   A_s = [A_1; …; A_K]  (Kr×n),

so nothing here allocates `m×n`. Float64 throughout: these are the numbers
the server's correction is computed from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Weights = Sequence[float] | torch.Tensor

_GRAM_BLOCK_ELEMS = 1 << 20
"""Largest `rows × Kr` slab of a Gram matrix held at once (8 MiB in float64)."""


def normalise_weights(weights: Weights, num_clients: int) -> torch.Tensor:
    """`p_k = w_k / Σ w`, float64; rejects what would make that meaningless."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if w.ndim != 1 or w.numel() != num_clients:
        raise ValueError(f"expected {num_clients} weights (one per client), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w / total


def check_factors(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *, same_rank: bool = True
) -> None:
    """Raise a `ValueError` naming the client, the tensor and its shape when the factors do not fit."""
    if len(A) == 0:
        raise ValueError("need at least one client's factors, got none")
    if len(A) != len(B):
        raise ValueError(f"got {len(A)} A factors but {len(B)} B factors")
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        for label, t in (("A", a), ("B", b)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"client {k}: {label} must be a 2-D tensor, got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"client {k}: {label} must be floating point, got {t.dtype}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"client {k}: A is {tuple(a.shape)} (r×n) but B is {tuple(b.shape)} (m×r): ranks differ"
            )
        if a.shape[1] != A[0].shape[1] or b.shape[0] != B[0].shape[0]:
            raise ValueError(
                f"client {k}: B·A is {b.shape[0]}×{a.shape[1]}, "
                f"client 0's is {B[0].shape[0]}×{A[0].shape[1]}"
            )
        if same_rank and a.shape[0] != A[0].shape[0]:
            raise ValueError(f"client {k}: A has rank {a.shape[0]}, client 0 has rank {A[0].shape[0]}")


def check_finite(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> None:
    """Raise a `ValueError` naming the first client whose `A` or `B` holds a NaN or an infinity."""
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        for label, t in (("A", a), ("B", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"client {k}: {label} {tuple(t.shape)} has non-finite values")


@dataclass(frozen=True)
class LowRankSum:
    """`ΔW = Σ p_k B_k A_k = B_s A_s` as float64 stacks; `Bt` holds `B_sᵀ`."""

    A: torch.Tensor
    """`A_s`, `(Σr_k)×n`: the clients' `A_k` one under another."""
    Bt: torch.Tensor
    """`B_sᵀ`, `(Σr_k)×m`: the clients' `p_k B_kᵀ` (transposed, so each block is contiguous)."""
    p: torch.Tensor
    ranks: tuple[int, ...]

    @classmethod
    def stack(
        cls,
        A: Sequence[torch.Tensor],
        B: Sequence[torch.Tensor],
        weights: Weights,
        *,
        same_rank: bool = True,
    ) -> LowRankSum:
        """Validate the factors and stack them in one float64 pass each.

        A NaN or infinity anywhere makes a stack's sum non-finite, so one cheap
        reduction checks everything; `check_finite` then names the culprit.
        """
        check_factors(A, B, same_rank=same_rank)
        p = normalise_weights(weights, len(A))
        ranks = tuple(a.shape[0] for a in A)
        n, m, device = A[0].shape[1], B[0].shape[0], A[0].device
        As = torch.empty(sum(ranks), n, dtype=torch.float64, device=device)
        Bt = torch.empty(sum(ranks), m, dtype=torch.float64, device=device)
        row = 0
        for a, b, w, r in zip(A, B, p.tolist(), ranks, strict=True):
            As[row : row + r].copy_(a)
            Bt[row : row + r].copy_(b.T).mul_(w)
            row += r
        if not (torch.isfinite(As.sum()) and torch.isfinite(Bt.sum())):
            check_finite(A, B)  # a sum can also overflow with finite (huge float64) entries
        return cls(As, Bt, p.to(device), ranks)

    @property
    def shape(self) -> tuple[int, int]:
        """`(m, n)` of `ΔW`."""
        return self.Bt.shape[1], self.A.shape[1]

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (`Kr×d`, equal ranks) viewed as `K×r×d`."""
        if len(set(self.ranks)) != 1:
            raise ValueError(f"factor means need equal ranks, got {self.ranks}")
        return t.view(len(self.ranks), self.ranks[0], t.shape[1])

    def mean_A(self) -> torch.Tensor:
        """`Ā = Σ p_k A_k` (`r×n`)."""
        return torch.einsum("k,krn->rn", self.p, self._blocks(self.A))

    def mean_B(self) -> torch.Tensor:
        """`B̄ = Σ p_k B_k` (`m×r`)."""
        return self._blocks(self.Bt).sum(0).T

    def times_t(self, Y: torch.Tensor) -> torch.Tensor:
        """`ΔW Yᵀ = Σ p_k B_k (A_k Yᵀ)` for `Y` of shape `s×n`: an `m×s` matrix."""
        return ((self.A @ Y.T).T @ self.Bt).T  # this order keeps both products row-major

    def inner(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """`⟨ΔW, X Y⟩` for `X` `m×s`, `Y` `s×n`, through `ΔW Yᵀ`."""
        return (self.times_t(Y) * X).sum()

    def sq_norm(self) -> torch.Tensor:
        """`‖ΔW‖²_F = ⟨B_sᵀB_s, A_sA_sᵀ⟩`: two `Kr×Kr` Grams, built in row slabs.

        Only the upper block triangle is formed (both Grams are symmetric),
        and at most `_GRAM_BLOCK_ELEMS` entries of each at a time.
        """
        k = self.A.shape[0]
        block = max(1, min(-(-k // 4), _GRAM_BLOCK_ELEMS // k))
        total = torch.zeros((), dtype=torch.float64, device=self.A.device)
        for s in range(0, k, block):
            e = min(s + block, k)
            prod = (self.A[s:e] @ self.A[s:].T) * (self.Bt[s:e] @ self.Bt[s:].T)
            total += 2 * prod.sum() - prod[:, : e - s].sum()
        return total
