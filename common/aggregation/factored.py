"""The ideal update `ΔW = Σ p_k B_k A_k`, kept as its stacked factors.

`ΔW` is `m×n` (4096² floats for one attention projection of a 7B model);
its factors are only `K·r·(m+n)`. Every aggregation rule that needs `ΔW`
(its norm, its products with small matrices, its truncated SVD) can work on

    ΔW = B_s W A_s,   B_s = [B_1 … B_K]  (m×Kr),   W = diag(p_k, each r_k times),   A_s = [A_1; …; A_K]  (Kr×n),

so nothing here allocates `m×n` except `dense()`, which forms it on request (the
cheaper way once `K·r` is large: see `lora_fair`). The stacks are float64 by default; a caller
may keep float32 clients' factors in float32 (`stack(..., dtype=torch.float32)`),
which halves the cost of the large products. Every result leaves in float64, the
products' sums are taken in float64, and `sq_norm` redoes its Grams in float64
when cancellation would make float32 inexact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Weights = Sequence[float] | torch.Tensor

_GRAM_BLOCK_ELEMS = 1 << 20
"""Largest `rows × Kr` slab of a Gram matrix held at once (8 MiB in float64)."""
_GRAM_WHOLE_ELEMS = 1 << 22
"""Largest `Kr × Kr` Gram formed whole on a CPU (16 MiB in float32; `Kr ≤ 2048`)."""


def normalise_weights(weights: Weights, num_clients: int) -> np.ndarray:
    """`p_k = w_k / Σ w`, float64; rejects what would make that meaningless."""
    given = weights.detach().to("cpu", torch.float64).numpy() if isinstance(weights, torch.Tensor) else weights
    w = np.asarray(given, dtype=np.float64)
    if w.ndim != 1 or w.size != num_clients:
        raise ValueError(f"expected {num_clients} weights (one per client), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {w.tolist()}")
    return w / total


def check_factors(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *, same_rank: bool = True) -> None:
    """Raise a `ValueError` naming the client, the tensor and its shape when the factors do not fit."""
    if len(A) == 0:
        raise ValueError("need at least one client's factors, got none")
    if len(A) != len(B):
        raise ValueError(f"got {len(A)} A factors but {len(B)} B factors")
    if _uniform(A) and _uniform(B) and A[0].is_floating_point() and B[0].is_floating_point():
        shape_a, shape_b = A[0].shape, B[0].shape  # every client's factors are exactly like client 0's
        if len(shape_a) == 2 and len(shape_b) == 2 and shape_a[0] == shape_b[1]:
            return
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        for label, t in (("A", a), ("B", b)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"client {k}: {label} must be a 2-D tensor, got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"client {k}: {label} must be floating point, got {t.dtype}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"client {k}: A is {tuple(a.shape)} (r×n) but B is {tuple(b.shape)} (m×r): ranks differ")
        if a.shape[1] != A[0].shape[1] or b.shape[0] != B[0].shape[0]:
            raise ValueError(
                f"client {k}: B·A is {b.shape[0]}×{a.shape[1]}, client 0's is {B[0].shape[0]}×{A[0].shape[1]}"
            )
        if same_rank and a.shape[0] != A[0].shape[0]:
            raise ValueError(f"client {k}: A has rank {a.shape[0]}, client 0 has rank {A[0].shape[0]}")


def require_finite(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], *witnesses: torch.Tensor | np.ndarray) -> None:
    """`check_finite(A, B)` unless every witness sums to a finite number.

    A witness is anything a NaN or infinity in the factors would make non-finite: the stacks
    themselves, or the diagonals of their Grams `A_sA_sᵀ` and `B_sᵀB_s`. A sum can also overflow
    with finite (huge) entries: then `check_finite` finds nothing and passes.
    """
    if not all(math.isfinite(float(w.sum())) for w in witnesses):  # a Python float: no tensor per test
        check_finite(A, B)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; `t` itself when it is already (`Tensor.to` costs ~1 µs even then, 20× per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _uniform(tensors: Sequence[torch.Tensor]) -> bool:
    """All tensors, with one shape and one dtype (the common case, checked in one pass)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return False
    shape, dtype = first.shape, first.dtype
    return all(isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype for t in tensors)


def check_finite(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> None:
    """Raise a `ValueError` naming the first client whose `A` or `B` holds a NaN or an infinity."""
    for k, (a, b) in enumerate(zip(A, B, strict=True)):
        for label, t in (("A", a), ("B", b)):
            if not torch.isfinite(t).all():
                raise ValueError(f"client {k}: {label} {tuple(t.shape)} has non-finite values")


@dataclass(frozen=True)
class LowRankSum:
    """`ΔW = Σ p_k B_k A_k = B_s diag(w) A_s` as stacks (float64 unless asked otherwise).

    The stacks hold the clients' values exactly as given; the weights `w` (`p_k`
    repeated `r_k` times) are applied in float64 to the small `Kr×·` products.
    """

    A: torch.Tensor
    """`A_s`, `(Σr_k)×n`: the clients' `A_k` one under another."""
    Bs: torch.Tensor
    """`B_s`, `m×(Σr_k)`: the clients' `B_k` side by side (unweighted, row-major)."""
    p: torch.Tensor
    """`p_k`, float64."""
    w: torch.Tensor
    """`p_k` per stacked row, float64."""
    ranks: tuple[int, ...]

    @classmethod
    def stack(
        cls,
        A: Sequence[torch.Tensor],
        B: Sequence[torch.Tensor],
        weights: Weights,
        *,
        same_rank: bool = True,
        dtype: torch.dtype = torch.float64,
        finite: bool = True,
    ) -> LowRankSum:
        """Validate the factors and stack them (in `dtype`) in one pass each.

        A NaN or infinity anywhere makes a stack's sum non-finite, so one cheap
        reduction checks everything; `check_finite` then names the culprit.
        `finite=False` leaves that check to a caller that has a cheaper witness (`require_finite`).
        """
        check_factors(A, B, same_rank=same_rank)
        p = normalise_weights(weights, len(A))
        ranks = tuple(a.shape[0] for a in A)
        device = A[0].device
        # one allocation for both stacks: glibc hands two large blocks freed together back to the OS, so
        # every aggregation would fault their pages in again (measured: 4 ms instead of 0.2 at 4096², Kr = 160)
        kr, n, m = sum(ranks), A[0].shape[1], B[0].shape[0]
        both = torch.empty(kr * (n + m), dtype=dtype, device=device)
        As = torch.cat([_as(a, dtype) for a in A], out=both[: kr * n].view(kr, n))
        Bs = torch.cat([_as(b, dtype) for b in B], dim=1, out=both[kr * n :].view(m, kr))
        if finite:
            require_finite(A, B, As, Bs)
        return cls(As, Bs, torch.from_numpy(p).to(device), torch.from_numpy(np.repeat(p, ranks)).to(device), ranks)

    @property
    def shape(self) -> tuple[int, int]:
        """`(m, n)` of `ΔW`."""
        return self.Bs.shape[0], self.A.shape[1]

    @property
    def Bw(self) -> torch.Tensor:
        """`B_s diag(w)`, `m×(Σr_k)`: the clients' `p_k B_k` side by side (formed on each call)."""
        return self.Bs * self.w.to(self.Bs.dtype)

    def to(self, dtype: torch.dtype) -> LowRankSum:
        """The same sum with its stacks in `dtype`."""
        return LowRankSum(self.A.to(dtype), self.Bs.to(dtype), self.p, self.w, self.ranks)

    def dense(self) -> torch.Tensor:
        """`ΔW` itself, `m×n`, in the stacks' dtype: one `m×Kr×n` product."""
        return self.Bw @ self.A

    def client_sq_norm(self) -> torch.Tensor:
        """`Σ_k p_k² ‖B_k A_k‖²`: the size of `‖ΔW‖²` if the clients' updates neither added up nor cancelled.

        `K` Grams of `r×r` (`O(K·r²·(m+n))`), float64; the dense path compares
        `‖ΔW‖²` with it to tell when float32 rounding could matter.
        """
        k, r = len(self.ranks), self._rank()
        blocks_a = self.A.view(k, r, self.A.shape[1])
        blocks_b = self.Bs.view(self.Bs.shape[0], k, r)
        ga = torch.bmm(blocks_a, blocks_a.transpose(1, 2)).double()
        gb = torch.einsum("mkr,mks->krs", blocks_b, blocks_b).double()
        return ((ga * gb).sum((1, 2)) * self.p**2).sum()

    def _rank(self) -> int:
        """The clients' common rank; factor means need one."""
        if len(set(self.ranks)) != 1:
            raise ValueError(f"factor means need equal ranks, got {self.ranks}")
        return self.ranks[0]

    def mean_A(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`Ā = Σ p_k A_k` (`r×n`), summed in the stack's dtype, returned in `dtype`."""
        k, r, n = len(self.ranks), self._rank(), self.A.shape[1]
        return (self.p.to(self.A.dtype) @ self.A.view(k, r * n)).view(r, n).to(dtype)

    def mean_B(self) -> torch.Tensor:
        """`B̄ = Σ p_k B_k` (`m×r`), float64."""
        blocks = self.Bs.view(self.Bs.shape[0], len(self.ranks), self._rank())
        return torch.einsum("k,mkr->mr", self.p.to(self.Bs.dtype), blocks).double()

    def times_t(self, Y: torch.Tensor) -> torch.Tensor:
        """`ΔW Yᵀ = Σ p_k B_k (A_k Yᵀ)` for `Y` of shape `s×n`: an `m×s` matrix, float64."""
        small = (self.A @ Y.to(self.A.dtype).T).double() * self.w[:, None]  # Kr×s
        return (self.Bs @ small.to(self.Bs.dtype)).double()

    def inner(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """`⟨ΔW, X Y⟩` for `X` `m×s`, `Y` `s×n`, through `ΔW Yᵀ`."""
        return (self.times_t(Y) * X).sum()

    def sq_norm(self, grams: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`‖ΔW‖²_F = ⟨A_sA_sᵀ, W B_sᵀB_s W⟩`: two `Kr×Kr` Grams, built in row slabs.

        On a CPU each Gram comes whole from one BLAS `syrk` (which forms one triangle)
        while it has at most `_GRAM_WHOLE_ELEMS` entries; otherwise only the upper block
        triangle is formed, at most `_GRAM_BLOCK_ELEMS` entries of each at a time. With float32
        stacks the Grams are float32 (relative error ~1e-6 per entry); when the
        terms cancel so much that this could reach ~1e-4 of the result, or a Gram
        overflows, they are recomputed in float64 from the same (exact) values. `grams`: `self.grams()`,
        when the caller has formed them already.
        """
        total, magnitude = _gram_inner(self.A, self.Bs, self.w, grams)
        if self.A.dtype != torch.float64 and not exact_enough(total, magnitude):
            total, _ = _gram_inner(self.A.double(), self.Bs.double(), self.w)
        return torch.tensor(total, dtype=torch.float64)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`A_s A_sᵀ` and `B_sᵀ B_s` (`Kr×Kr`, the stacks' dtype), each from one BLAS `syrk`; None where
        `sq_norm` would build them in slabs instead (not on a CPU, or over `_GRAM_WHOLE_ELEMS` entries)."""
        return _syrk_grams(self.A, self.Bs)


def gram_sq_norm(gram_a: np.ndarray, gram_b: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """`‖ΔW‖² = ⟨A_sA_sᵀ, W B_sᵀB_s W⟩` from the two (CPU) Grams, and the sum of its terms' absolute values
    (its size before cancellation), in float64.

    As `wᵀ(G_A ∘ G_B)w` and `wᵀ|G_A ∘ G_B|w` (`w ≥ 0`): one float64 `Kr×Kr` temporary, used twice in place,
    where the weighted outer product took four (768², r = 64, K = 8: the factored solve 12.9 -> 10.3 ms).
    Float32 Grams' products are exact in float64.
    """
    terms = np.multiply(gram_a, gram_b, dtype=np.float64)
    total = w @ terms @ w
    return float(total), float(w @ np.abs(terms, out=terms) @ w)


def exact_enough(value: np.ndarray | float, size: np.ndarray | float) -> bool:
    """Whether float32 sums of products (elementwise) each kept at least 1e-2 of their terms' size (`size`),
    so that their rounding (~1e-7 of `size`) stays under ~1e-5 of the result; False when any overflowed."""
    value, size = np.asarray(value, dtype=np.float64), np.asarray(size, dtype=np.float64)
    return bool((np.isfinite(size) & np.isfinite(value) & (value >= 1e-2 * size)).all())


def _slabs(k: int) -> list[tuple[int, int]]:
    """Row ranges `[s, e)` of the upper block triangle of a `k×k` Gram, each formed against columns `s:`."""
    block = max(1, min(-(-k // 4), _GRAM_BLOCK_ELEMS // k))
    return [(s, min(s + block, k)) for s in range(0, k, block)]


def whole_grams(k: int) -> bool:
    """Whether a CPU `sq_norm` (and LoRA-FAIR's solve) forms each Gram whole, in one BLAS `syrk` through NumPy (up to `_GRAM_WHOLE_ELEMS`)."""
    return k * k <= _GRAM_WHOLE_ELEMS


def gram_flops(k: int, length: int, *, whole: bool = True) -> int:
    """Flops of `sq_norm`'s Grams for `k = Σr_k` stacked rows and `length = m + n`.

    `whole`: one `syrk` per Gram (`k(k+1)·length`), which `sq_norm` takes on a CPU while the Grams are
    small enough; otherwise the slabs of the upper block triangle.
    """
    if whole and whole_grams(k):
        return k * (k + 1) * length
    return sum(2 * (e - s) * (k - s) * length for s, e in _slabs(k))


SYRK_RATE = 2 / 3
"""A CPU `syrk`'s speed per flop relative to a GEMM's where LoRA-FAIR's dense/factored switch falls
(Kr of 500–800 at 768²: the switch rows of `simulations/results/aggregation_cost.md`)."""


def gram_cost(k: int, length: int) -> float:
    """`gram_flops` in GEMM-flop equivalents, the unit `lora_fair.delta_form_flops` ranks the two forms in."""
    return gram_flops(k, length) / (SYRK_RATE if whole_grams(k) else 1.0)


def _syrk_grams(A: torch.Tensor, Bs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`A Aᵀ` and `Bsᵀ Bs` whole, or None: see `LowRankSum.grams`."""
    if A.device.type != "cpu" or not whole_grams(A.shape[0]):
        return None
    # NumPy hands `x @ x.T` to BLAS `syrk`, which computes one triangle: half the flops of a torch matmul
    a, b = A.numpy(), Bs.numpy()
    return torch.from_numpy(a @ a.T), torch.from_numpy(b.T @ b)


def _gram_inner(
    A: torch.Tensor, Bs: torch.Tensor, w: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[float, float]:
    """`⟨A Aᵀ, W Bsᵀ Bs W⟩` and the sum of its terms' absolute values (its size before cancellation), float64;
    `grams`: the two whole Grams when the caller has them already."""
    if (grams := grams if grams is not None else _syrk_grams(A, Bs)) is not None:
        return gram_sq_norm(grams[0].numpy(), grams[1].numpy(), w.numpy())
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    magnitude = torch.zeros((), dtype=torch.float64, device=A.device)
    for s, e in _slabs(A.shape[0]):
        # as `gram_sq_norm`, per slab: one float64 temporary of exact products, weighted as `w_sᵀ(·)w`; the
        # diagonal block (columns `s:e`) is counted once, the blocks right of it twice (for those below)
        terms = (A[s:e] @ A[s:].T).double().mul_(Bs[:, s:e].T @ Bs[:, s:])
        ws, wt = w[s:e], w[s:]
        total += 2 * (ws @ terms @ wt) - ws @ terms[:, : e - s] @ ws
        terms.abs_()
        magnitude += 2 * (ws @ terms @ wt) - ws @ terms[:, : e - s] @ ws
    return float(total), float(magnitude)
