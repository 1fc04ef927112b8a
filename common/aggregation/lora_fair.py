"""LoRA-FAIR: average A and B, then correct B̄ so that `B'Ā` points along the
ideal update (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with
Aggregation and Initialization Refinement", ICCV 2025, arXiv 2411.14961).

Per layer, with `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `ΔW = Σ p_k B_k A_k`:

    cosine    (the paper's)  B' = argmin_X  1 − cos(ΔW, XĀ) + λ‖X − B̄‖²
    frobenius                B' = argmin_X  ‖ΔW − XĀ‖²      + λ‖X − B̄‖²  = (M + λB̄)(G + λI)⁻¹

Both depend on `ΔW` only through `M = ΔW Āᵀ` (`m×r`) and `‖ΔW‖²`, and on
`Ā` only through `G = ĀĀᵀ` (`r×r`). Two exact ways give those two: the
factored one (`LowRankSum`: two `Kr×Kr` Grams for `‖ΔW‖²`, about
`(Kr)²(m+n)` flops) never forms the `m×n` matrix; the dense one forms
`ΔW = B_s diag(w) A_s` once (`2mn·Kr` flops) and reads both off it. Per layer
we take the one with fewer flops (`delta_form_flops`): factored while
`K·r ≲ 1.3·mn/(m+n)`, dense above. Everything after `M` and `‖ΔW‖²` is shared.

How the cosine problem is solved. Setting the gradient to zero gives
`X (I + vG) = uM + B̄` with `u = 1/(2λ‖ΔW‖‖XĀ‖) > 0` and `v = u⟨M,X⟩/‖XĀ‖²`,
so every stationary point lies on the two-scalar family
`X(u, v) = (uM + B̄)(I + vG)⁻¹`. In the eigenbasis of `G` column `i` of `X` is
`w_i (u m_i + b_i)`, `w_i = 1/(1 + v g_i)`, and the objective is a sum of `r`
terms. The cosine term ignores `X → cX`, so stationarity along that ray reads
`⟨X, X − B̄⟩ = 0`: a quadratic in `u`. For `v > 0` (positive cosine) it has one
positive root `u(v)`, and what is left is one equation in one unknown,
`φ(v) = 2λ‖ΔW‖ u(v) ‖X(v)Ā‖ − 1 = 0` (along this curve the gradient is
proportional to `φ`). We scan `φ` on a log grid of `v` (its lower end follows
from the FedIT point), bisect every sign change to machine precision, and keep
the best point. Two rarer cases complete the search. When
`cos(ΔW, B̄Ā) ≤ 0`, minima with negative cosine lie in `−1/g_max < v < 0`,
where the curve folds back (two roots); the best grid points there are polished
by Newton's method on `(u, v)`. When B̄ leans away from ΔW's projection on the
row space of Ā, the objective keeps decreasing as `XĀ → 0` along the
best-cosine direction and has no minimiser; we return a point within 1e-12 of
the infimum. The answer is never worse than B̄ (FedIT); the tests compare it
with dense L-BFGS from several starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from .base import Adapter, Aggregator, ClientUpdate, average_heads, client_weights, layer_factors
from .factored import LowRankSum, Weights, gram_cost
from .ranks import RankPadding, pad_updates

Objective = Literal["cosine", "frobenius"]
OBJECTIVES: tuple[str, ...] = ("cosine", "frobenius")
DeltaForm = Literal["auto", "factored", "dense"]
DELTA_FORMS: tuple[str, ...] = ("auto", "factored", "dense")

_CANCELLATION = 1e-2
"""The dense path redoes a float32 `ΔW` in float64 when `‖ΔW‖²` is below this share of `Σ p_k² ‖B_k A_k‖²`."""

_GRID_DECADES = 20.0
_GRID_PER_DECADE = 16
_MAX_EXTENSIONS = 4
_BISECT_POINTS = 33
_BISECT_ROUNDS = 9
_POLISH_STEPS = 60


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
    norm_ratio: float
    """`‖B'Ā‖ / ‖ΔW‖`: how much of the update's size the next starting point keeps (the cosine ignores it)."""
    norm_ratio_fedit: float
    """`‖B̄Ā‖ / ‖ΔW‖`: the same for plain FedIT."""
    delta_form: str
    """How `ΔW` entered the solve: "factored" or "dense"."""


def lora_fair(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    weights: Weights,
    *,
    lam: float = 0.01,
    objective: Objective = "cosine",
    delta_form: DeltaForm = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Ā, B')` for one layer from the clients' `A_k` (`r×n`) and `B_k` (`m×r`).

    `delta_form` forces the factored or the dense way to `ΔW` (same result); "auto" takes the cheaper.
    """
    Ab, X, _, _ = _solve(A, B, weights, lam=lam, objective=objective, delta_form=delta_form, with_stats=False)
    return Ab, X


def solve_lora_fair(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    weights: Weights,
    *,
    lam: float = 0.01,
    objective: Objective = "cosine",
    delta_form: DeltaForm = "auto",
) -> LoraFairResult:
    """`lora_fair` plus its cosines and relative correction (these need `‖ΔW‖²` for either objective)."""
    Ab, X, stats, form = _solve(A, B, weights, lam=lam, objective=objective, delta_form=delta_form, with_stats=True)
    assert stats is not None
    return LoraFairResult(Ab, X, *stats, delta_form=form)


def delta_form_flops(m: int, n: int, ranks: Sequence[int], *, needs_norm: bool, single: bool) -> dict[str, int]:
    """Floating-point operations of the large products each way takes to `M = ΔW Āᵀ` (and `‖ΔW‖²`).

    factored: `A_s Āᵀ` and `B_s (·)` (`2Kr·r(m+n)`), plus, when `‖ΔW‖²` is needed, the
    Grams `LowRankSum.sq_norm` multiplies (`gram_flops`: about `(Kr)²(m+n)` as two CPU `syrk`s, counted
    at 1.5× since a `syrk` runs at about 2/3 of a GEMM's rate per flop there: `gram_cost`).
    dense: `ΔW` (`2mn·Kr`), `ΔW Āᵀ` (`2mn·r`), `‖ΔW‖²` (`2mn`), and for float32 stacks the
    per-client Grams of the cancellation check (`2Kr·r(m+n)`). Both run as large matrix
    products at about the same rate on a CPU, so flops rank them.
    """
    kr, r = sum(ranks), max(ranks)
    factored = 2 * kr * r * (m + n) + (round(gram_cost(kr, m + n)) if needs_norm else 0)
    dense = 2 * m * n * (kr + r + 1) + (2 * kr * r * (m + n) if single else 0)
    return {"factored": factored, "dense": dense}


def _check_options(lam: float, objective: str, delta_form: str = "auto") -> float:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {list(OBJECTIVES)}")
    if delta_form not in DELTA_FORMS:
        raise ValueError(f"unknown delta_form {delta_form!r}; allowed: {list(DELTA_FORMS)}")
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
    delta_form: str,
    with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float, float, float] | None, str]:
    """Everything happens in the eigenbasis of `G = ĀĀᵀ = U diag(g) Uᵀ`: there
    `‖XĀ‖² = Σ g_i ‖X u_i‖²` holds without the cancellation of `⟨XG, X⟩`, which
    matters for points with `XĀ` near zero."""
    lam = _check_options(lam, objective, delta_form)
    # float32 clients keep their large products in float32 (half the time); all small algebra is float64
    single = all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in (*A, *B))
    delta = LowRankSum.stack(A, B, weights, dtype=torch.float32 if single else torch.float64)
    Ab, Bb = delta.mean_A(), delta.mean_B()
    g, U, reach = _gram_eigen(Ab)
    needs_norm = with_stats or objective == "cosine"
    if delta_form == "auto":
        flops = delta_form_flops(*delta.shape, delta.ranks, needs_norm=needs_norm, single=single)
        delta_form = "dense" if flops["dense"] < flops["factored"] else "factored"
    if delta_form == "dense":
        M, dw_sq = _dense_products(delta, U.T @ Ab)
    else:
        M = delta.times_t(U.T @ Ab)
        dw_sq = float(delta.sq_norm()) if needs_norm else 0.0
    Mu, Bu = M * reach, Bb @ U  # M U = ΔW (UᵀĀ)ᵀ: exactly 0 off `reach`
    if int((delta.p > 0).sum()) == 1:
        X, Xu = Bb, Bu  # one contributing client: ΔW = B̄Ā already, nothing to correct
    else:
        if objective == "cosine":
            Xu = _cosine_correction(Mu, Bu, g, dw_sq, lam)
        else:
            Xu = _frobenius_correction(Mu, Bu, g, lam)
        X = Xu @ U.T
    stats = None
    if with_stats:
        nb = float(Bu.norm())
        rel = float((Xu - Bu).norm()) / nb if nb > 0 else 0.0
        dw = math.sqrt(dw_sq)
        fair, fedit = (math.sqrt(float((g * (Y * Y).sum(0)).sum())) / dw if dw > 0 else 0.0 for Y in (Xu, Bu))
        stats = (_cosine(Mu, Xu, g, dw_sq), _cosine(Mu, Bu, g, dw_sq), rel, fair, fedit)
    return Ab.to(A[0].dtype).contiguous(), X.to(B[0].dtype).contiguous(), stats, delta_form


def frobenius_from_sums(A_bar: torch.Tensor, B_bar: torch.Tensor, M: torch.Tensor, lam: float) -> torch.Tensor:
    """Frobenius LoRA-FAIR's `B' = (M + λB̄)(ĀĀᵀ + λI)⁻¹` from the three sums alone (float64).

    `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `M = Σ p_k B_k (A_k Āᵀ)` are each a weighted sum of
    per-client terms, so secure aggregation can deliver them (`fairedge.server.secagg`); the
    plaintext `lora_fair` goes through the same eigenbasis and `_frobenius_correction`.
    """
    lam = _check_options(lam, "frobenius")
    Ab, Bb, M = A_bar.double(), B_bar.double(), M.double()
    g, U, reach = _gram_eigen(Ab)
    return _frobenius_correction((M @ U) * reach, Bb @ U, g, lam) @ U.T


def _gram_eigen(Ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`G = ĀĀᵀ = U diag(g) Uᵀ` with `g` zeroed off `reach`, the directions `XĀ` can move in."""
    g, U = torch.linalg.eigh(Ab @ Ab.T)
    reach = g > g.max() * g.numel() * torch.finfo(g.dtype).eps
    return torch.where(reach, g, 0.0), U, reach


def _dense_products(delta: LowRankSum, Y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`ΔW Yᵀ` (float64) and `‖ΔW‖²` from the dense `ΔW`, formed once in the stacks' dtype.

    A float32 `ΔW` carries rounding errors of about 1e-7 of the terms it sums; when
    the clients' updates cancel (`‖ΔW‖²` under `_CANCELLATION · Σ p_k²‖B_k A_k‖²`)
    those could show in the result, and `ΔW` is formed again in float64.
    """
    dW = delta.dense()
    dw_sq = float(torch.linalg.vector_norm(dW)) ** 2
    if dW.dtype != torch.float64 and not (
        math.isfinite(dw_sq) and dw_sq >= _CANCELLATION * float(delta.client_sq_norm())
    ):
        del dW
        dW = delta.to(torch.float64).dense()
        dw_sq = float(torch.linalg.vector_norm(dW)) ** 2
    return (dW @ Y.to(dW.dtype).T).double(), dw_sq


def _cosine(Mu: torch.Tensor, Xu: torch.Tensor, g: torch.Tensor, dw_sq: float) -> float:
    """`cos(ΔW, XĀ) = ⟨M, X⟩ / (‖ΔW‖ ‖XĀ‖)` from `MU`, `XU`; 0 when either side is zero."""
    xx = float(torch.linalg.vector_norm(Xu, dim=0).square() @ g)  # ‖XĀ‖² = Σ g_i ‖X u_i‖²
    if dw_sq <= 0 or xx <= 0:
        return 0.0
    return min(max(float(torch.dot(Mu.flatten(), Xu.flatten())) / float(np.sqrt(dw_sq * xx)), -1.0), 1.0)


def _frobenius_correction(Mu: torch.Tensor, Bu: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """`(M + λB̄)(G + λI)⁻¹ U`, with a pseudo-inverse where `G + λI` is singular (λ = 0)."""
    d = g + lam
    inv = torch.where(d > d.max() * d.numel() * torch.finfo(d.dtype).eps, 1.0 / d, 0.0)
    return (Mu + lam * Bu) * inv


def _cosine_correction(Mu: torch.Tensor, Bu: torch.Tensor, g: torch.Tensor, dw_sq: float, lam: float) -> torch.Tensor:
    """`X U` for the minimiser of `1 − cos(ΔW, XĀ) + λ‖X − B̄‖²`, or `B̄ U` when nothing beats it.

    Candidates are compared by their `O(r)` column formulas; the winner is then
    formed and checked against B̄ on the actual `m×r` matrices.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf/NaN mark points off the curve
        return _cosine_correction_in(Mu, Bu, g, dw_sq, lam)


def _cosine_correction_in(
    Mu: torch.Tensor, Bu: torch.Tensor, g: torch.Tensor, dw_sq: float, lam: float
) -> torch.Tensor:
    """`_cosine_correction`'s body, with numpy's floating-point warnings silenced once for all of it."""
    cols = _Columns(
        g=g.cpu().numpy(),
        mm=(Mu * Mu).sum(0).cpu().numpy(),
        mb=(Mu * Bu).sum(0).cpu().numpy(),
        bb=(Bu * Bu).sum(0).cpu().numpy(),
        d=float(np.sqrt(max(dw_sq, 0.0))),
        lam=lam,
    )
    if cols.d <= 0 or cols.g.max() <= 0 or cols.mm.max() <= 0 or cols.bb.sum() <= 0:
        return Bu  # cosine undefined or constant, or B̄ = 0: keep FedIT's B̄
    zero, one = np.zeros_like(cols.g), np.ones_like(cols.g)
    points = [_Point(zero, one, zero), *_stationary(cols), _max_cosine_ray(cols)]  # B̄ first: ties go to it
    values, _ = cols.value(*(np.stack(c) for c in zip(*points, strict=True)))
    best = points[int(np.argmin(values))]
    if not values.min() < values[0] - 1e-14 * max(1.0, abs(values[0])):
        return Bu
    Xu = Mu * torch.from_numpy(best.alpha).to(Mu) + Bu * torch.from_numpy(best.beta).to(Bu)

    def objective(Yu: torch.Tensor) -> float:
        return 1.0 - _cosine(Mu, Yu, g, dw_sq) + lam * float(torch.linalg.vector_norm(Yu - Bu)) ** 2

    return Xu if objective(Xu) < objective(Bu) else Bu


class _Point(NamedTuple):
    """`X U` with column `i` equal to `alpha_i m_i + beta_i b_i`; `beta_m1 = beta − 1`, kept exact."""

    alpha: np.ndarray
    beta: np.ndarray
    beta_m1: np.ndarray


def _on_family(u: float | np.ndarray, vg: np.ndarray, opv: np.ndarray) -> _Point:
    """`X(u, v) = (uM + B̄)(I + vG)⁻¹` from `vg = v·g`, `opv = 1 + v·g`."""
    w = 1.0 / opv
    return _Point(u * w, w, -vg * w)


def _max_cosine_ray(cols: _Columns) -> _Point:
    """The best point `X = B̄_null + c·MG⁺` on the set where `cos(ΔW, XĀ)` is largest.

    With `c* = ⟨MG⁺, B̄⟩/‖MG⁺‖² > 0` this is the end of the curve (`v → ∞`). With
    `c* ≤ 0` (B̄ leans away from ΔW's projection) the infimum is approached as
    `c → 0⁺` and has no minimiser; we return the `c` whose objective is within
    1e-12 of that infimum.
    """
    reach = cols.g > 0
    ginv = np.where(reach, 1.0 / np.where(reach, cols.g, 1.0), 0.0)
    yy, yb = float((cols.mm * ginv * ginv).sum()), float((cols.mb * ginv).sum())  # ‖MG⁺‖², ⟨MG⁺, B̄⟩
    c = yb / yy
    if c <= 0:
        tol = 1e-12
        c = min(np.sqrt(tol / (2 * cols.lam * yy)), tol / (4 * cols.lam * abs(yb)) if yb else np.inf)
    return _Point(c * ginv, (~reach).astype(float), -reach.astype(float))


@dataclass(frozen=True)
class _Columns:
    """The cosine problem in the eigenbasis of `G = U diag(g) Uᵀ`: per eigen-direction `i`,
    `mm = ‖M u_i‖²`, `mb = ⟨M u_i, B̄ u_i⟩`, `bb = ‖B̄ u_i‖²`; `d = ‖ΔW‖`.

    Off the curve its formulas give inf or NaN on purpose (masked afterwards);
    `_cosine_correction` runs them with numpy's warnings for that silenced."""

    g: np.ndarray
    mm: np.ndarray
    mb: np.ndarray
    bb: np.ndarray
    d: float
    lam: float

    def radial_root(self, vg: np.ndarray, opv: np.ndarray, branch: int) -> np.ndarray:
        """The `u > 0` with `⟨X, X − B̄⟩ = 0` at points `vg = v·g`, `opv = 1 + v·g` (rows of `V×r`).

        Column `i` of `X(u, v) U` is `w_i (u m_i + b_i)` with `w_i = 1/(1 + v g_i)`,
        so `⟨X, X − B̄⟩ = qa u² + qb u + qc`; `branch` picks the larger (1) or the
        smaller (-1) root. For `v > 0`, `qc < 0 < qa`: only the larger is positive.
        NaN where the chosen root is not real and positive.
        """
        w = 1.0 / opv
        wm1 = -vg * w  # w − 1 without cancellation
        qa = (w * w * self.mm).sum(-1)
        qb = ((w * w + w * wm1) * self.mb).sum(-1)
        qc = (w * wm1 * self.bb).sum(-1)
        disc = qb * qb - 4.0 * qa * qc
        half = -0.5 * (qb + np.copysign(np.sqrt(np.maximum(disc, 0.0)), qb))
        r1, r2 = half / qa, qc / half  # the two roots, each without cancellation
        u = np.maximum(r1, r2) if branch > 0 else np.minimum(r1, r2)
        return np.where((disc >= 0) & (u > 0) & np.isfinite(u), u, np.nan)

    def value(self, alpha: np.ndarray, beta: np.ndarray, beta_m1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The objective `f` and `‖XĀ‖` at points given by their column coefficients (rows of `N×r`).

        `f = inf` where the cosine is undefined (`XĀ = 0`).
        """
        a = (alpha * self.mm + beta * self.mb).sum(-1)  # ⟨M, X⟩
        q = (self.g * (alpha * alpha * self.mm + 2 * alpha * beta * self.mb + beta * beta * self.bb)).sum(-1)
        reg = (alpha * alpha * self.mm + 2 * alpha * beta_m1 * self.mb + beta_m1 * beta_m1 * self.bb).sum(-1)
        rho = np.sqrt(np.maximum(q, 0.0))
        f = 1.0 - a / (self.d * rho) + self.lam * reg
        return np.where(np.isfinite(f) & (rho > 0), f, np.inf), rho

    def family(self, u: np.ndarray, vg: np.ndarray, opv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The objective `f` and `φ = 2λ‖ΔW‖ u ‖XĀ‖ − 1` at `X(u, v)`; `inf` / NaN where undefined."""
        f, rho = self.value(*_on_family(u[:, None], vg, opv))
        phi = 2.0 * self.lam * self.d * u * rho - 1.0
        return f, np.where(np.isfinite(f), phi, np.nan)


@dataclass(frozen=True)
class _Piece:
    """One stretch of the curve, parameterised by a grid variable `s`."""

    positive: bool
    """`v = 10^s / g_max > 0`, or `v = −t/g_max` with `t = 1/(1 + 10^−s)` in (0, 1)."""
    branch: int

    def points(self, cols: _Columns, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`v·g` and `1 + v·g` at each `s`, the latter without cancellation."""
        gamma = cols.g / cols.g.max()
        if self.positive:
            vg = 10.0 ** s[:, None] * gamma
            return vg, 1.0 + vg
        e = 10.0 ** -s[:, None]
        return -gamma / (1.0 + e), ((1.0 - gamma) + e) / (1.0 + e)

    def evaluate(self, cols: _Columns, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`u`, `f` and `φ` along this stretch of the radially stationary curve."""
        vg, opv = self.points(cols, s)
        u = cols.radial_root(vg, opv, self.branch)
        return (u, *cols.family(u, vg, opv))

    def phi(self, cols: _Columns, s: np.ndarray) -> np.ndarray:
        """`φ` alone, as `evaluate` gives it but without the objective: what root finding needs.

        On the family `‖XĀ‖² = Σ g_i w_i² (u² mm_i + 2u mb_i + bb_i)`.
        """
        vg, opv = self.points(cols, s)
        u = cols.radial_root(vg, opv, self.branch)
        w = 1.0 / opv
        coef = (u * u)[:, None] * cols.mm + (2.0 * u)[:, None] * cols.mb + cols.bb
        rho = np.sqrt(np.maximum((cols.g * w * w * coef).sum(-1), 0.0))
        phi = 2.0 * cols.lam * cols.d * u * rho - 1.0
        return np.where(np.isfinite(phi) & (rho > 0), phi, np.nan)


def _stationary(cols: _Columns) -> list[_Point]:
    """Every stationary point found on the curve, plus each stretch's best grid point.

    `v > 0` holds the stationary points with positive cosine. Lower end of its
    grid: at a stationary point `v = cos/(2λ‖XĀ‖²)` and `‖X‖ ≤ ‖B̄‖` (from
    `⟨X, X − B̄⟩ = 0`), and the global minimiser has `cos ≥ cos_FedIT`; so
    `v·g_max ≥ cos_FedIT / (2λ‖B̄‖²)`. Its upper end is open: the grid grows
    while its best point is its last. Local minima need `1 + v·g_i ≥ 0` for all
    `i` (else, for `m > 3`, the Hessian `2λ(I + vG)⊗I + rank ≤ 3` has a negative direction),
    so those with negative cosine lie in `−1/g_max < v < 0`; that stretch can
    only hold the global minimum when `cos_FedIT ≤ 0`, and is searched only then.
    """
    fedit_norm = cols.d * float(np.sqrt((cols.g * cols.bb).sum()))  # ‖ΔW‖ ‖B̄Ā‖
    cos_fedit = float(cols.mb.sum()) / fedit_norm if fedit_norm > 0 else 0.0
    per = int(_GRID_DECADES * _GRID_PER_DECADE)
    lo = float(np.log10(max(cos_fedit, 1e-12) / (2 * cols.lam * float(cols.bb.sum()))))
    pieces = [(_Piece(True, 1), np.linspace(lo, lo + _GRID_DECADES, per + 1))]
    if cos_fedit <= 0:
        s = np.linspace(-16.0, 16.0, 32 * _GRID_PER_DECADE + 1)
        pieces += [(_Piece(False, 1), s), (_Piece(False, -1), s)]
    out = []
    for piece, s in pieces:
        u, f, phi = piece.evaluate(cols, s)
        for _ in range(_MAX_EXTENSIONS if piece.positive else 0):
            if np.argmin(f) < len(s) - 1:
                break
            s = np.concatenate([s, s[-1] + np.linspace(0.0, _GRID_DECADES, per + 1)[1:]])
            u, f, phi = piece.evaluate(cols, s)
        if np.isfinite(f).any():
            j = int(np.argmin(f))
            if piece.positive:
                out.append(_on_family(float(u[j]), *(x[0] for x in piece.points(cols, s[j : j + 1]))))
            else:  # the curve folds back on itself here; a minimum can sit on the fold
                out.append(_polish(cols, piece, float(u[j]), float(s[j])))
        flips = np.nonzero(np.sign(phi[:-1]) * np.sign(phi[1:]) < 0)[0]
        for j in flips.tolist():
            out.append(_bisect(cols, piece, float(s[j]), float(s[j + 1]), float(np.sign(phi[j]))))
    return out


def _polish(cols: _Columns, piece: _Piece, u: float, s: float) -> _Point:
    """Newton's method on the objective over the whole family, in `(ln u, s)`, from a grid point.

    The family contains every stationary point of the full objective, and where
    the restriction to it is stationary so is the full objective (its gradient
    there is a combination of `M` and `XG` that the two partial derivatives
    pin to zero). Derivatives by central differences: nine `O(r)` evaluations.
    """

    def objective(x: np.ndarray) -> np.ndarray:
        vg, opv = piece.points(cols, x[:, 1])
        return cols.family(np.exp(x[:, 0]), vg, opv)[0]

    h = 1e-4
    stencil = h * np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [-1, -1], [1, -1], [-1, 1]])
    x = np.array([np.log(u), s])
    fx = float(objective(x[None])[0])
    for _ in range(_POLISH_STEPS):
        f = objective(x + stencil)
        if not np.isfinite(f).all():
            break
        grad = np.array([f[1] - f[2], f[3] - f[4]]) / (2 * h)
        hxy = (f[5] + f[6] - f[7] - f[8]) / (4 * h * h)
        hess = np.array([[f[1] - 2 * f[0] + f[2], 0.0], [0.0, f[3] - 2 * f[0] + f[4]]]) / (h * h)
        hess[0, 1] = hess[1, 0] = hxy
        if hess[0, 0] > 0 and np.linalg.det(hess) > 0:
            step = -np.linalg.solve(hess, grad)
        else:
            step = -grad / max(abs(hess[0, 0]) + abs(hess[1, 1]), 1e-12)
        t = 1.0
        while t > 1e-12:
            f_new = float(objective((x + t * step)[None])[0])
            if f_new < fx:
                break
            t *= 0.5
        if t <= 1e-12:
            break
        x, fx = x + t * step, f_new
    return _on_family(float(np.exp(x[0])), *(y[0] for y in piece.points(cols, x[1:])))


def _bisect(cols: _Columns, piece: _Piece, lo: float, hi: float, sign_lo: float) -> _Point:
    """Shrink a sign change of `φ` in `s` by a factor `_BISECT_POINTS − 1` per round."""
    for _ in range(_BISECT_ROUNDS):
        grid = np.linspace(lo, hi, _BISECT_POINTS)
        phi = piece.phi(cols, grid)
        past = np.nonzero(np.sign(phi) != sign_lo)[0]  # first point past the sign change
        k = int(past[0]) if len(past) else _BISECT_POINTS - 1
        lo, hi = float(grid[max(k - 1, 0)]), float(grid[max(k, 1)])
    s = np.array([0.5 * (lo + hi)])
    vg, opv = piece.points(cols, s)
    return _on_family(float(cols.radial_root(vg, opv, piece.branch)[0]), vg[0], opv[0])


class LoraFair(Aggregator):
    """LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): FedIT's averages with B̄ corrected.

    Communication is FedIT's: each client sends `r(m+n)` values per layer and
    receives `r(m+n)` back, `(Ā, B')`, from which it starts the next round
    (Avg-Initial). Non-LoRA trainables (the head) are weighted-averaged.

    Args:
        lam: weight λ of `‖B' − B̄‖²`; the paper uses 0.01.
        objective: "cosine" (the paper's `1 − cos(ΔW, B'Ā)`) or "frobenius" (`‖ΔW − B'Ā‖²`).
        delta_form: "auto" (per layer, whichever of the two exact ways costs fewer flops),
            or "factored" / "dense" to force one (for tests and benchmarks).
    """

    name = "lora_fair"
    mixed_ranks = True  # Ā, B̄ of zero-padded factors; ΔW exact; B' at r_max, cut per client (ALGORITHMS.md)

    def __init__(
        self,
        lam: float = 0.01,
        objective: Objective = "cosine",
        delta_form: DeltaForm = "auto",
        rank_padding: RankPadding = "zeros",
    ) -> None:
        self.lam = _check_options(lam, objective, delta_form)
        self.objective: Objective = objective
        self.delta_form: DeltaForm = delta_form
        self.rank_padding: RankPadding = rank_padding

    def aggregate(self, updates: Sequence[ClientUpdate], current: Adapter) -> tuple[Adapter, dict[str, float]]:
        p = client_weights(updates)
        updates = pad_updates(updates, current, self.rank_padding)
        factors = {}
        sums = dict.fromkeys(("cos_fair", "cos_fedit", "rel_correction", "norm_ratio", "norm_ratio_fedit"), 0.0)
        for layer in current.factors:
            res = solve_lora_fair(
                *layer_factors(updates, layer), p, lam=self.lam, objective=self.objective, delta_form=self.delta_form
            )
            factors[layer] = (res.A_bar, res.B_prime)
            for key in sums:
                sums[key] += getattr(res, key)
        n = max(len(current.factors), 1)
        metrics = {f"lora_fair/{k}": s / n for k, s in sums.items()} if current.factors else {}
        return Adapter(factors, average_heads(updates, p)), metrics
