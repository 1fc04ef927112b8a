"""The cosine LoRA-FAIR problem, solved from `O(r)` column sums.

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
from the FedIT point), find the root at every sign change (to |φ| ≤ 1e-12), and keep
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
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

_GRID_DECADES = 20.0
_GRID_PER_DECADE = 16
_MAX_EXTENSIONS = 4
_ROOT_STEPS = 100
_POLISH_STEPS = 60
_EPS = float(np.finfo(float).eps)
_PHI_TOL = 1e-12
"""`|φ|` below which a point counts as the root. `φ` is proportional to the gradient along the curve, so the
objective is stationary there to this accuracy; `φ`'s own rounding, from sums of `r` terms, reaches 1e-13."""


def cosine_coefficients(
    g: np.ndarray, mm: np.ndarray, mb: np.ndarray, bb: np.ndarray, d: float, lam: float
) -> Combination | None:
    """The minimiser `XU = MU diag(α) + B̄U diag(β)` of `1 − cos(ΔW, XĀ) + λ‖X − B̄‖²`, or None when
    nothing beats B̄ (FedIT).

    In the eigenbasis `U` of `G = ĀĀᵀ` (eigenvalues `g`, 0 off the reachable directions):
    `mm = ‖M u_i‖²`, `mb = ⟨M u_i, B̄ u_i⟩`, `bb = ‖B̄ u_i‖²` with `M = ΔW Āᵀ`, and `d = ‖ΔW‖`.
    Candidates are compared by their `O(r)` column formulas (numpy's floating-point warnings
    silenced: inf/NaN mark points off the curve).
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cols = _Columns(g=g, mm=mm, mb=mb, bb=bb, d=d, lam=lam)
        if cols.d <= 0 or cols.g.max() <= 0 or cols.mm.max() <= 0 or cols.bb.sum() <= 0:
            return None  # cosine undefined or constant, or B̄ = 0: keep FedIT's B̄
        zero, one = np.zeros_like(cols.g), np.ones_like(cols.g)
        points = [Combination(zero, one, zero), *_stationary(cols), _max_cosine_ray(cols)]  # B̄ first: ties go to it
        values, _ = cols.value(*np.array(points).transpose(1, 0, 2))  # P×3×r -> alpha, beta, beta_m1 rows
        best = points[int(np.argmin(values))]
        if not values.min() < values[0] - 1e-14 * max(1.0, abs(values[0])):
            return None
        return best


class Combination(NamedTuple):
    """`XU` column by column: `α_i (MU)_i + β_i (B̄U)_i` (float64 `r`-vectors, or rows of `N×r` for `N` points);
    `beta_m1 = β − 1`, kept exact."""

    alpha: np.ndarray
    beta: np.ndarray
    beta_m1: np.ndarray


def column_sums(
    c: Combination, g: np.ndarray, mm: np.ndarray, mb: np.ndarray, bb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`⟨M, X⟩`, `‖XĀ‖²` and `‖X − B̄‖²` of `X = c` from the column sums `mm`, `mb`, `bb` (`cosine_coefficients`)."""
    # `x @ v` sums over the last axis as `(x * v).sum(-1)` does, in one call (these run on r-vectors,
    # where numpy's per-call cost is what counts)
    aa = c.alpha * c.alpha
    inner = c.alpha @ mm + c.beta @ mb
    product = (aa * mm + 2 * c.alpha * c.beta * mb + c.beta * c.beta * bb) @ g
    moved = aa @ mm + (2 * c.alpha * c.beta_m1) @ mb + (c.beta_m1 * c.beta_m1) @ bb
    return inner, product, moved


def _on_family(u: float | np.ndarray, vg: np.ndarray, opv: np.ndarray) -> Combination:
    """`X(u, v) = (uM + B̄)(I + vG)⁻¹` from `vg = v·g`, `opv = 1 + v·g`."""
    w = 1.0 / opv
    return Combination(u * w, w, -vg * w)


def _max_cosine_ray(cols: _Columns) -> Combination:
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
    return Combination(c * ginv, (~reach).astype(float), -reach.astype(float))


@dataclass(frozen=True)
class _Columns:
    """The cosine problem in the eigenbasis of `G = U diag(g) Uᵀ`: per eigen-direction `i`,
    `mm = ‖M u_i‖²`, `mb = ⟨M u_i, B̄ u_i⟩`, `bb = ‖B̄ u_i‖²`; `d = ‖ΔW‖`.

    Off the curve its formulas give inf or NaN on purpose (masked afterwards);
    `cosine_coefficients` runs them with numpy's warnings for that silenced."""

    g: np.ndarray
    mm: np.ndarray
    mb: np.ndarray
    bb: np.ndarray
    d: float
    lam: float

    @cached_property
    def gamma(self) -> np.ndarray:
        """`g / g_max`: the grid's `v` is measured in units of `1/g_max`."""
        return self.g / self.g.max()

    @cached_property
    def table(self) -> np.ndarray:
        """`[mm, mb, bb, g·mm, g·mb, g·bb]` as the columns of an `r×6` matrix (`along`)."""
        return np.stack([self.mm, self.mb, self.bb, self.g * self.mm, self.g * self.mb, self.g * self.bb], axis=1)

    def along(self, vg: np.ndarray, opv: np.ndarray) -> np.ndarray:
        """Every sum the family's formulas need at points `vg = v·g`, `opv = 1 + v·g` (rows of `V×r`), `5×V×6`.

        Column `i` of `X(u, v) U` is `w_i (u m_i + b_i)` with `w_i = 1/(1 + v g_i)`, so each figure of `X` is a
        polynomial in `u` whose coefficients are sums over `i` of `w`, `w²`, `w(1 − w) = v g w²`, `w(2w − 1)`
        and `(v g w)²` times the column sums: rows `0..4` here, times `table`'s columns, in one product
        (these run on `r`-vectors, where numpy's per-call cost is what counts).
        """
        rows = np.empty((5, *opv.shape))
        w = np.divide(1.0, opv, out=rows[0])
        ww = np.multiply(w, w, out=rows[1])
        t = np.multiply(vg, ww, out=rows[2])  # w(1 − w), without cancellation
        np.subtract(ww, t, out=rows[3])
        np.multiply(vg, t, out=rows[4])
        return (rows.reshape(-1, opv.shape[-1]) @ self.table).reshape(5, *opv.shape[:-1], 6)

    def radial_root(self, sums: np.ndarray, branch: int) -> np.ndarray:
        """The `u > 0` with `⟨X, X − B̄⟩ = 0` at points with `along` sums `sums`.

        `⟨X, X − B̄⟩ = qa u² + qb u + qc` with `qa = Σw²mm`, `qb = Σw(2w − 1)mb`, `qc = −Σw(1 − w)bb`;
        `branch` picks the larger (1) or the smaller (-1) root. For `v > 0`, `qc < 0 < qa`: only the
        larger is positive. NaN where the chosen root is not real and positive.
        """
        qa, qb, qc = sums[1, :, 0], sums[3, :, 1], -sums[2, :, 2]
        disc = qb * qb - 4.0 * qa * qc
        half = -0.5 * (qb + np.copysign(np.sqrt(np.maximum(disc, 0.0)), qb))
        r1, r2 = half / qa, qc / half  # the two roots, each without cancellation
        u = np.maximum(r1, r2) if branch > 0 else np.minimum(r1, r2)
        return np.where((disc >= 0) & (u > 0) & np.isfinite(u), u, np.nan)

    def phi(self, u: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`φ = 2λ‖ΔW‖ u ‖XĀ‖ − 1` and `‖XĀ‖` at `X(u, v)` (`sums`: `along`); NaN where undefined.

        On the family `‖XĀ‖² = Σ g_i w_i² (u² mm_i + 2u mb_i + bb_i)`.
        """
        rho = np.sqrt(np.maximum(u * u * sums[1, :, 3] + 2.0 * u * sums[1, :, 4] + sums[1, :, 5], 0.0))
        phi = 2.0 * self.lam * self.d * u * rho - 1.0
        return np.where(np.isfinite(phi) & (rho > 0), phi, np.nan), rho

    def value(self, alpha: np.ndarray, beta: np.ndarray, beta_m1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The objective `f` and `‖XĀ‖` at points given by their column coefficients (rows of `N×r`).

        `f = inf` where the cosine is undefined (`XĀ = 0`).
        """
        a, q, reg = column_sums(Combination(alpha, beta, beta_m1), self.g, self.mm, self.mb, self.bb)
        rho = np.sqrt(np.maximum(q, 0.0))
        f = 1.0 - a / (self.d * rho) + self.lam * reg
        return np.where(np.isfinite(f) & (rho > 0), f, np.inf), rho

    def family(self, u: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The objective `f` and `φ` at `X(u, v)` (`sums`: `along`); `inf` / NaN where undefined.

        `⟨M, X⟩ = u Σw mm + Σw mb` and `‖X − B̄‖² = u² Σw²mm − 2u Σw(1 − w)mb + Σ(v g w)² bb`.
        """
        phi, rho = self.phi(u, sums)
        inner = u * sums[0, :, 0] + sums[0, :, 1]
        moved = u * u * sums[1, :, 0] - 2.0 * u * sums[2, :, 1] + sums[4, :, 2]
        f = 1.0 - inner / (self.d * rho) + self.lam * moved
        f = np.where(np.isfinite(f) & (rho > 0), f, np.inf)
        return f, np.where(np.isfinite(f), phi, np.nan)


@dataclass(frozen=True)
class _Piece:
    """One stretch of the curve, parameterised by a grid variable `s`."""

    positive: bool
    """`v = 10^s / g_max > 0`, or `v = −t/g_max` with `t = 1/(1 + 10^−s)` in (0, 1)."""
    branch: int

    def points(self, cols: _Columns, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`v·g` and `1 + v·g` at each `s`, the latter without cancellation."""
        gamma = cols.gamma
        if self.positive:
            vg = 10.0 ** s[:, None] * gamma
            return vg, 1.0 + vg
        e = 10.0 ** -s[:, None]
        return -gamma / (1.0 + e), ((1.0 - gamma) + e) / (1.0 + e)

    def evaluate(self, cols: _Columns, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`u`, `f` and `φ` along this stretch of the radially stationary curve."""
        sums = cols.along(*self.points(cols, s))
        u = cols.radial_root(sums, self.branch)
        return (u, *cols.family(u, sums))

    def point(self, cols: _Columns, s: float) -> tuple[np.ndarray, np.ndarray]:
        """`points` at one `s`, as two `r`-vectors."""
        vg, opv = self.points(cols, np.array([s]))
        return vg[0], opv[0]

    def at(self, cols: _Columns, s: float) -> tuple[float, float, np.ndarray, np.ndarray]:
        """`φ` and `u` at one `s` (NaN where undefined), and the point's `v·g` and `1 + v·g`: what root finding
        needs, by `evaluate`'s formulas with the sums as scalars (a handful of numpy calls, where `evaluate`'s
        row-wise ones cost several times more at one row)."""
        vg, opv = self.point(cols, s)
        ww = (1.0 / opv) ** 2
        t = vg * ww
        qa, _, _, gmm, gmb, gbb = ww @ cols.table
        qb, qc = (ww - t) @ cols.mb, -(t @ cols.bb)
        disc = qb * qb - 4.0 * qa * qc
        half = -0.5 * (qb + np.copysign(np.sqrt(max(disc, 0.0)), qb))
        r1, r2 = half / qa, qc / half
        u = np.maximum(r1, r2) if self.branch > 0 else np.minimum(r1, r2)
        rho = np.sqrt(max(u * u * gmm + 2.0 * u * gmb + gbb, 0.0))
        phi = 2.0 * cols.lam * cols.d * u * rho - 1.0
        u_ok = disc >= 0 and u > 0 and np.isfinite(u)
        phi_ok = u_ok and np.isfinite(phi) and rho > 0
        return (float(phi) if phi_ok else math.nan), (float(u) if u_ok else math.nan), vg, opv


def _stationary(cols: _Columns) -> list[Combination]:
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
    roots, best = [], []  # roots first: a grid point that ties with a root to rounding loses to it
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
                best.append(_on_family(float(u[j]), *piece.point(cols, float(s[j]))))
            else:  # the curve folds back on itself here; a minimum can sit on the fold
                best.append(_polish(cols, piece, float(u[j]), float(s[j])))
        flips = np.nonzero(np.sign(phi[:-1]) * np.sign(phi[1:]) < 0)[0]
        for j in flips.tolist():
            roots.append(_root(cols, piece, float(s[j]), float(s[j + 1]), float(phi[j]), float(phi[j + 1])))
    return roots + best


def _polish(cols: _Columns, piece: _Piece, u: float, s: float) -> Combination:
    """Newton's method on the objective over the whole family, in `(ln u, s)`, from a grid point.

    The family contains every stationary point of the full objective, and where
    the restriction to it is stationary so is the full objective (its gradient
    there is a combination of `M` and `XG` that the two partial derivatives
    pin to zero). Derivatives by central differences: nine `O(r)` evaluations.
    """

    def objective(x: np.ndarray) -> np.ndarray:
        return cols.family(np.exp(x[:, 0]), cols.along(*piece.points(cols, x[:, 1])))[0]

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


def _root(cols: _Columns, piece: _Piece, lo: float, hi: float, f_lo: float, f_hi: float) -> Combination:
    """The point where `φ` changes sign between grid points `lo` and `hi` (`φ = f_lo`, `f_hi` there), until
    `|φ| ≤ _PHI_TOL` or the bracket is at the spacing of floats: regula falsi in its Illinois form (bracketed,
    superlinear; a few scalar evaluations where bisection needs one per bit). A NaN `φ` counts as past the
    root and the next step bisects."""
    side = 0
    for _ in range(_ROOT_STEPS):
        if hi - lo <= 4 * _EPS * max(1.0, abs(lo), abs(hi)):
            break
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if not lo < x < hi:  # also NaN
            x = 0.5 * (lo + hi)
        fx = piece.at(cols, x)[0]
        if abs(fx) <= _PHI_TOL:
            lo = hi = x
            break
        if fx == fx and (fx > 0) == (f_lo > 0):  # on lo's side (a NaN is not)
            lo, f_lo = x, fx
            f_hi *= 0.5 if side < 0 else 1.0  # the same end kept twice: halve its value (Illinois)
            side = -1
        else:
            hi, f_hi = x, fx
            f_lo *= 0.5 if side > 0 else 1.0
            side = 1
    _, u, vg, opv = piece.at(cols, 0.5 * (lo + hi))
    return _on_family(u, vg, opv)
