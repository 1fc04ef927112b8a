"""LoRA-FAIR: average A and B, then correct B̄ so that `B'Ā` points along the
ideal update (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with
Aggregation and Initialization Refinement", ICCV 2025, arXiv 2411.14961).

Per layer, with `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `ΔW = Σ p_k B_k A_k`:

    cosine    (the paper's)  B' = argmin_X  1 − cos(ΔW, XĀ) + λ‖X − B̄‖²
    frobenius                B' = argmin_X  ‖ΔW − XĀ‖²      + λ‖X − B̄‖²  = (M + λB̄)(G + λI)⁻¹

Both depend on `ΔW` only through `M = ΔW Āᵀ` (`m×r`) and `‖ΔW‖²`, and on
`Ā` only through `G = ĀĀᵀ` (`r×r`), so the `m×n` matrix is never formed.

How the cosine problem is solved exactly. Setting the gradient to zero gives
`X (I + vG) = uM + B̄` with `u = 1/(2λ‖ΔW‖‖XĀ‖) > 0` and `v = u⟨M,X⟩/‖XĀ‖²`,
so every stationary point lies on the two-scalar family
`X(u, v) = (uM + B̄)(I + vG)⁻¹`. The cosine term is invariant to `X → cX`, so
stationarity along that ray is `⟨X, X − B̄⟩ = 0`; for fixed `v > 0` this is a
quadratic in `u` with exactly one positive root `u(v)`. What remains is one
equation in one unknown, `φ(v) = 2λ‖ΔW‖ u(v) ‖X(v)Ā‖ − 1 = 0`, and along the
curve `X(v)` the gradient of the objective is proportional to `φ(v)`. In the
eigenbasis of `G` everything is a sum of `r` terms, so we scan `φ` over a wide
log grid of `v` (a lower bound on `v` follows from the FedIT point), bisect
every sign change to machine precision, and keep the stationary point with the
lowest objective. The result is never worse than `B̄` (FedIT) and is the
global minimiser whenever one with positive cosine exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .base import Adapter, Aggregator, ClientUpdate, average_heads, client_weights
from .factored import LowRankSum, Weights

Objective = Literal["cosine", "frobenius"]
OBJECTIVES: tuple[str, ...] = ("cosine", "frobenius")

_GRID_DECADES = 20.0
_GRID_PER_DECADE = 16
_MAX_EXTENSIONS = 4
_BISECT_POINTS = 33
_BISECT_ROUNDS = 9


@dataclass(frozen=True)
class LoraFairResult:
    """The corrected factors of one layer plus what the correction achieved."""

    A_bar: torch.Tensor
    B_prime: torch.Tensor
    cos_fair: float
    """`cos(ΔW, B'Ā)`: how well the next round's starting point matches the ideal update."""
    cos_fedit: float
    """`cos(ΔW, B̄Ā)`: the same for plain FedIT."""
    rel_correction: float
    """`‖B' − B̄‖ / ‖B̄‖`."""


def lora_fair(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    weights: Weights,
    *,
    lam: float = 0.01,
    objective: Objective = "cosine",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Ā, B')` for one layer from the clients' `A_k` (`r×n`) and `B_k` (`m×r`)."""
    Ab, X, _ = _solve(A, B, weights, lam=lam, objective=objective, with_stats=False)
    return Ab, X


def solve_lora_fair(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    weights: Weights,
    *,
    lam: float = 0.01,
    objective: Objective = "cosine",
) -> LoraFairResult:
    """`lora_fair` plus its cosines and relative correction, at the cost of two `Kr×Kr` Grams."""
    Ab, X, stats = _solve(A, B, weights, lam=lam, objective=objective, with_stats=True)
    assert stats is not None
    return LoraFairResult(Ab, X, *stats)


def _check_options(lam: float, objective: str) -> float:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {list(OBJECTIVES)}")
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if objective == "cosine" and lam == 0:
        raise ValueError("lam must be > 0 for the cosine objective: cosine is scale-free, λ fixes the scale")
    return lam


def _solve(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    weights: Weights,
    *,
    lam: float,
    objective: str,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float] | None]:
    lam = _check_options(lam, objective)
    delta = LowRankSum.stack(A, B, weights)
    Ab, Bb = delta.mean_A(), delta.mean_B()
    M, G = delta.times_t(Ab), Ab @ Ab.T
    needs_norm = with_stats or objective == "cosine"
    dw_sq = float(delta.sq_norm()) if needs_norm else 0.0
    if int((delta.p > 0).sum()) == 1:
        X = Bb  # one contributing client: ΔW = B̄Ā already, nothing to correct
    elif objective == "cosine":
        X = _cosine_correction(M, Bb, G, dw_sq, lam)
    else:
        X = _frobenius_correction(M, Bb, G, lam)
    stats = None
    if with_stats:
        nb = float(Bb.norm())
        rel = float((X - Bb).norm()) / nb if nb > 0 else 0.0
        stats = (_cosine(M, X, G, dw_sq), _cosine(M, Bb, G, dw_sq), rel)
    return Ab.to(A[0].dtype).contiguous(), X.to(B[0].dtype).contiguous(), stats


def _cosine(M: torch.Tensor, X: torch.Tensor, G: torch.Tensor, dw_sq: float) -> float:
    """`cos(ΔW, XĀ) = ⟨M, X⟩ / (‖ΔW‖ √⟨XG, X⟩)`; 0 when either side is zero."""
    xx = float(((X @ G) * X).sum())
    if dw_sq <= 0 or xx <= 0:
        return 0.0
    return float((M * X).sum()) / float(np.sqrt(dw_sq * xx))


def _frobenius_correction(M: torch.Tensor, Bb: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """`(M + λB̄)(G + λI)⁻¹`, a pseudo-inverse where `G + λI` is singular (λ = 0)."""
    g, U = torch.linalg.eigh(G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
    cut = g.abs().max() * G.shape[0] * torch.finfo(G.dtype).eps
    inv = torch.where(g > cut, 1.0 / g, torch.zeros_like(g))
    return (((M + lam * Bb) @ U) * inv) @ U.T


def _cosine_correction(
    M: torch.Tensor, Bb: torch.Tensor, G: torch.Tensor, dw_sq: float, lam: float
) -> torch.Tensor:
    """The minimiser of `1 − cos(ΔW, XĀ) + λ‖X − B̄‖²`, or `B̄` when none improves on it."""
    g, U = torch.linalg.eigh(G)
    g = g.clamp_min(0)
    Mu, Bu = M @ U, Bb @ U
    cols = _Columns(
        g=g.cpu().numpy(),
        mm=(Mu * Mu).sum(0).cpu().numpy(),
        mb=(Mu * Bu).sum(0).cpu().numpy(),
        bb=(Bu * Bu).sum(0).cpu().numpy(),
        d=float(np.sqrt(max(dw_sq, 0.0))),
        lam=lam,
    )
    if cols.d <= 0 or cols.g.max() <= 0 or cols.mm.max() <= 0 or cols.bb.sum() <= 0:
        return Bb  # cosine undefined or constant, or no scale to correct: keep FedIT's B̄

    def point(u: float, v: float) -> torch.Tensor:
        w = 1.0 / (1.0 + v * g)
        return (((u * Mu + Bu) * w) @ U.T)

    def objective(X: torch.Tensor) -> float:
        return 1.0 - _cosine(M, X, G, dw_sq) + lam * float(((X - Bb) ** 2).sum())

    best, best_f = Bb, objective(Bb)
    for u, v in _candidates(cols):
        X = point(u, v)
        f = objective(X)
        if f < best_f - 1e-14 * max(1.0, abs(best_f)):
            best, best_f = X, f
    return best


@dataclass(frozen=True)
class _Columns:
    """The cosine problem in the eigenbasis of `G = U diag(g) Uᵀ`: per eigen-direction `i`,
    `mm = ‖M u_i‖²`, `mb = ⟨M u_i, B̄ u_i⟩`, `bb = ‖B̄ u_i‖²`; `d = ‖ΔW‖`."""

    g: np.ndarray
    mm: np.ndarray
    mb: np.ndarray
    bb: np.ndarray
    d: float
    lam: float

    def along_curve(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`u(v)`, the objective `f` and `φ` at each `v` of a 1-D array, all in `O(r)` per point.

        Column `i` of `X(u, v) U` is `w_i (u m_i + b_i)` with `w_i = 1/(1 + v g_i)`.
        """
        v = v[:, None]
        w = 1.0 / (1.0 + v * self.g)
        wm1 = -v * self.g * w  # w − 1 without cancellation
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # ⟨X, X − B̄⟩ = qa u² + qb u + qc = 0, qc ≤ 0 ≤ qa: one root u ≥ 0
            qa = (w * w * self.mm).sum(-1)
            qb = ((w * w + w * wm1) * self.mb).sum(-1)
            qc = (w * wm1 * self.bb).sum(-1)
            root = np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))
            u = np.where(qb > 0, -2.0 * qc / (qb + root), (root - qb) / (2.0 * qa))
            uc = u[:, None]
            a = (w * (uc * self.mm + self.mb)).sum(-1)  # ⟨M, X⟩
            q = (self.g * w * w * (uc * uc * self.mm + 2 * uc * self.mb + self.bb)).sum(-1)  # ‖XĀ‖²
            reg = (w * w * uc * uc * self.mm + 2 * w * wm1 * uc * self.mb + wm1 * wm1 * self.bb).sum(-1)
            rho = np.sqrt(np.maximum(q, 0.0))
            f = 1.0 - a / (self.d * rho) + self.lam * reg
            phi = 2.0 * self.lam * self.d * u * rho - 1.0
        bad = ~(np.isfinite(u) & np.isfinite(f) & (rho > 0))
        return u, np.where(bad, np.inf, f), np.where(bad, np.nan, phi)


def _candidates(cols: _Columns) -> list[tuple[float, float]]:
    """`(u, v)` of every root of `φ` on the grid, plus the grid's best point.

    Lower end of the grid: at a minimiser `v = cos/(2λ‖XĀ‖²)` and `‖X‖ ≤ ‖B̄‖`
    (from `⟨X, X − B̄⟩ = 0`), while `cos ≥ cos_FedIT`; so
    `v·g_max ≥ cos_FedIT / (2λ‖B̄‖²)`. The upper end is open: extend while the
    best grid point is the last one.
    """
    gmax = float(cols.g.max())
    fedit_norm = cols.d * float(np.sqrt((cols.g * cols.bb).sum()))  # ‖ΔW‖ ‖B̄Ā‖
    cos_fedit = float(cols.mb.sum()) / fedit_norm if fedit_norm > 0 else 0.0
    lo = np.log10(max(cos_fedit, 1e-8) / (2 * cols.lam * float(cols.bb.sum())) / gmax)
    per = int(_GRID_DECADES * _GRID_PER_DECADE)
    log_v = np.linspace(lo, lo + _GRID_DECADES, per + 1)
    for _ in range(_MAX_EXTENSIONS):
        u, f, phi = cols.along_curve(10.0**log_v)
        if np.argmin(f) < len(log_v) - 1:
            break
        log_v = np.concatenate([log_v, np.linspace(log_v[-1], log_v[-1] + _GRID_DECADES, per + 1)[1:]])
    out = []
    if np.isfinite(f).any():
        j = int(np.argmin(f))
        out.append((float(u[j]), float(10.0 ** log_v[j])))
    flips = np.nonzero(np.sign(phi[:-1]) * np.sign(phi[1:]) < 0)[0]
    for j in flips:
        out.append(_bisect(cols, float(log_v[j]), float(log_v[j + 1]), float(np.sign(phi[j]))))
    return out


def _bisect(cols: _Columns, lo: float, hi: float, sign_lo: float) -> tuple[float, float]:
    """Shrink a sign change of `φ` in `log10 v` by `_BISECT_POINTS − 1` per round."""
    for _ in range(_BISECT_ROUNDS):
        grid = np.linspace(lo, hi, _BISECT_POINTS)
        _, _, phi = cols.along_curve(10.0**grid)
        same = np.nonzero(~(np.sign(phi) == sign_lo))[0]  # first point past the sign change
        k = int(same[0]) if len(same) else _BISECT_POINTS - 1
        lo, hi = float(grid[max(k - 1, 0)]), float(grid[k])
    v = 10.0 ** (0.5 * (lo + hi))
    u, _, _ = cols.along_curve(np.array([v]))
    return float(u[0]), v


class LoraFair(Aggregator):
    """LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): FedIT's averages with B̄ corrected.

    Communication is FedIT's: each client sends `r(m+n)` values per layer and
    receives `r(m+n)` back, `(Ā, B')`, from which it starts the next round
    (Avg-Initial). Non-LoRA trainables (the head) are weighted-averaged.

    Args:
        lam: weight λ of `‖B' − B̄‖²`; the paper uses 0.01.
        objective: "cosine" (the paper's `1 − cos(ΔW, B'Ā)`) or "frobenius" (`‖ΔW − B'Ā‖²`).
    """

    name = "lora_fair"

    def __init__(self, lam: float = 0.01, objective: Objective = "cosine") -> None:
        self.lam = _check_options(lam, objective)
        self.objective: Objective = objective

    def aggregate(
        self, updates: Sequence[ClientUpdate], current: Adapter
    ) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        factors = {}
        sums = {"cos_fair": 0.0, "cos_fedit": 0.0, "rel_correction": 0.0}
        for layer in current.factors:
            res = solve_lora_fair(
                [u.adapter.factors[layer][0] for u in updates],
                [u.adapter.factors[layer][1] for u in updates],
                p,
                lam=self.lam,
                objective=self.objective,
            )
            factors[layer] = (res.A_bar, res.B_prime)
            for key in sums:
                sums[key] += getattr(res, key)
        n = max(len(current.factors), 1)
        metrics = {f"lora_fair/{k}": s / n for k, s in sums.items()} if current.factors else {}
        return Adapter(factors, average_heads(updates, p)), metrics
