"""LoRA-FAIR: average A and B, then correct B̄ so that `B'Ā` points along the
ideal update (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with
Aggregation and Initialization Refinement", ICCV 2025, arXiv 2411.14961).

Per layer, with `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `ΔW = Σ p_k B_k A_k`:

    cosine    (the paper's)  B' = argmin_X  1 − cos(ΔW, XĀ) + λ‖X − B̄‖²
    frobenius                B' = argmin_X  ‖ΔW − XĀ‖²      + λ‖X − B̄‖²  = (M + λB̄)(G + λI)⁻¹

Both depend on `ΔW` only through `M = ΔW Āᵀ` (`m×r`) and `‖ΔW‖²`, and on
`Ā` only through `G = ĀĀᵀ` (`r×r`). Two exact ways give those two. The dense
one forms `ΔW = B_s diag(w) A_s` once (`2mn·Kr` flops) and reads both off it.
The factored one (`LowRankSum`) never forms the `m×n` matrix. Where `‖ΔW‖²` is
needed (the cosine objective, the reported cosines) it forms the two `Kr×Kr`
Grams `A_sA_sᵀ` and `B_sᵀB_s` (about `(Kr)²(m+n)` flops), and with them `M`
costs nothing more: with `W = diag(w)` and `S` the `K` identities `r×r`
stacked, `B̄ = B_s D` and `M = B_s W (A_sA_sᵀ) D` for `D = WS`. Each candidate
`B'` is, column by column in the eigenbasis `U` of `G`, `α_i M u_i + β_i B̄ u_i`,
so the solve and the reported figures need only three column sums of `MU`
and `B̄U` (`Eᵀ(B_sᵀB_s)F` on their `Kr×r` coordinates `E`, `F`), and only
`B' = B_s E'` is formed (`_in_span`). That is exact algebra; it is taken where its
`Kr×Kr` products cost less than forming `M` (`_coordinates_pay`: `8·Kr < m + n`)
unless the Grams' rounding could show (a column of `B_s E` far smaller than its
terms), and then `M` is formed as below. Without `‖ΔW‖²` (frobenius, no reports)
`M = B_s (W A_s Āᵀ)`: two thin products, `2Kr·r(m+n)` flops. Per layer we take
the way with fewer flops (`delta_form_flops`): factored while
`K·r ≲ 1.3·mn/(m+n)`, dense above. Everything after `M` and `‖ΔW‖²` is shared;
the cosine problem itself is solved from the column sums (`lora_fair_cosine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from .base import Adapter, Aggregator, ClientUpdate, average_heads, client_weights, layer_factors
from .factored import LowRankSum, Weights, exact_enough, gram_cost, gram_sq_norm, require_finite, whole_grams
from .lora_fair_cosine import Combination, column_sums, cosine_coefficients
from .ranks import RankPadding, pad_updates

Objective = Literal["cosine", "frobenius"]
OBJECTIVES: tuple[str, ...] = ("cosine", "frobenius")
DeltaForm = Literal["auto", "factored", "dense"]
DELTA_FORMS: tuple[str, ...] = ("auto", "factored", "dense")

_CANCELLATION = 1e-2
"""The dense path redoes a float32 `ΔW` in float64 when `‖ΔW‖²` is below this share of `Σ p_k² ‖B_k A_k‖²`."""


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

    factored without `‖ΔW‖²`: `A_s Āᵀ` and `B_s (·)` (`2Kr·r(m+n)`). With it: the Grams
    (`gram_flops`: about `(Kr)²(m+n)` as two CPU `syrk`s, counted at 1.5× since a `syrk` runs at
    about 2/3 of a GEMM's rate per flop there: `gram_cost`), then only `B' = B_s E` (`2Kr·r·m`)
    where the solve runs on coordinates (`_coordinates_pay`, Grams formed whole), else the two thin
    products as well.
    dense: `ΔW` (`2mn·Kr`), `ΔW Āᵀ` (`2mn·r`), `‖ΔW‖²` (`2mn`), and for float32 stacks the
    per-client Grams of the cancellation check (`2Kr·r(m+n)`). Both run as large matrix
    products at about the same rate on a CPU, so flops rank them.
    """
    kr, r = sum(ranks), max(ranks)
    factored = 2 * kr * r * (m + n)
    if needs_norm:
        coordinates = whole_grams(kr) and _coordinates_pay(m, n, kr)
        factored = round(gram_cost(kr, m + n)) + (2 * kr * r * m if coordinates else factored)
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
    delta = LowRankSum.stack(A, B, weights, dtype=torch.float32 if single else torch.float64, finite=False)
    Ab_stack = delta.mean_A(delta.A.dtype)  # what is returned; the solve reads it in float64
    Ab = Ab_stack.double()
    needs_norm = with_stats or objective == "cosine"
    if delta_form == "auto":
        flops = delta_form_flops(*delta.shape, delta.ranks, needs_norm=needs_norm, single=single)
        delta_form = "dense" if flops["dense"] < flops["factored"] else "factored"
    grams = delta.grams() if delta_form == "factored" and needs_norm else None
    # a NaN or infinity in a factor shows on its Gram's diagonal (its rows' squared norms): no extra pass
    require_finite(A, B, *((np.diagonal(gram.numpy()) for gram in grams) if grams is not None else (delta.A, delta.Bs)))
    g, U, reach = _gram_eigen(Ab)
    one_client = int((delta.p > 0).sum()) == 1  # ΔW = B̄Ā already: B̄ is returned as it is
    on_coordinates = not one_client and _coordinates_pay(*delta.shape, sum(delta.ranks))
    span = _in_span(delta, grams, U, reach) if grams is not None and on_coordinates else None
    # every candidate X is, column by column in the eigenbasis, α_i (MU)_i + β_i (B̄U)_i: the solve and the
    # reported figures need only three column sums of MU and B̄U, and only the answer is formed
    if span is not None:
        E_Mu, E_Bu, dw_sq, sums = span  # coordinates on B_s
    else:
        Bb = delta.mean_B()
        if delta_form == "dense":
            M, dw_sq = _dense_products(delta, U.T @ Ab)
        else:
            M = delta.times_t(U.T @ Ab)
            dw_sq = float(delta.sq_norm(grams)) if needs_norm else 0.0
        Mu, Bu = M * reach, Bb @ U  # M U = ΔW (UᵀĀ)ᵀ: exactly 0 off `reach`
        sums = _ColumnSums(*((X * Y).sum(0).cpu().numpy() for X, Y in ((Mu, Mu), (Mu, Bu), (Bu, Bu))))
    gn, d = g.cpu().numpy(), math.sqrt(max(dw_sq, 0.0))
    if one_client:
        c, X = _FEDIT(len(gn)), Bb
    else:
        if objective == "cosine":
            c = cosine_coefficients(gn, sums.mm, sums.mb, sums.bb, d, lam) or _FEDIT(len(gn))
        else:
            c = _frobenius_coefficients(gn, lam)
        if span is not None:  # B' = B_s E', formed in the stacks' dtype (float32 clients: float32, as returned)
            # on the CPU (as the Grams are), in NumPy: its BLAS takes half of torch's time for this thin product
            E = (E_Mu * c.alpha + E_Bu * c.beta) @ U.numpy().T
            bs = delta.Bs.numpy()
            X = torch.from_numpy(bs @ E.astype(bs.dtype))
        else:
            X = _combine(Mu, Bu, c) @ U.T
    stats = _figures(c, gn, sums, d) if with_stats else None
    return Ab_stack.to(A[0].dtype).contiguous(), X.to(B[0].dtype).contiguous(), stats, delta_form


def _coordinates_pay(m: int, n: int, kr: int) -> bool:
    """Whether solving on `Kr×r` coordinates (`_in_span`) beats forming `M`: its small products, about
    `4·(Kr)²·r` multiply-adds in float64 (each about two float32 ones), against `Kr·r·(m+n)` in float32
    for `M` (at 576², r = 16 the two tie at K = 8; at 768², r = 64, K = 8 the coordinates cost 1.3×)."""
    return 8 * kr < m + n


def _in_span(
    delta: LowRankSum, grams: tuple[torch.Tensor, torch.Tensor], U: torch.Tensor, reach: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, float, _ColumnSums] | None:
    """`MU` and `B̄U` as `Kr×r` coordinates `E` on `B_s` (the matrices are `B_s E`), `‖ΔW‖²` and the
    column sums, from the two Grams alone.

    `Ā = Dᵀ A_s` and `B̄ = B_s D` with `D = WS` (`S`: `K` identities stacked), so `A_s Āᵀ = (A_sA_sᵀ) D`,
    `M = B_s W (A_sA_sᵀ) D`, and column inner products are `eᵀ(B_sᵀB_s)f`. `grams`: `delta.grams()`.
    None where their rounding could show: `‖ΔW‖²`, or a column's `‖B_s e‖²` of `MU` or `B̄U`, under 1e-2
    of its terms' size (`exact_enough`, as `LowRankSum.sq_norm` judges its own sum).
    """
    # all in NumPy float64: a few dozen small products, where torch's per-call cost would dominate
    gram_a, gram_b = (g.numpy().astype(np.float64) for g in grams)
    p, w = delta.p.numpy(), delta.w.numpy()
    dw_sq, size = gram_sq_norm(gram_a, gram_b, w)  # ‖ΔW‖² and its terms' size
    k, r = len(delta.ranks), delta.ranks[0]
    kr = k * r
    E = np.empty((kr, 2 * r))  # [MU | B̄U] as coordinates on B_s
    weighted = w[:, None] * np.matmul(p, gram_a.reshape(kr, k, r))  # W (A_sA_sᵀ) D: each row's blocks summed, by p
    u = U.numpy()
    np.multiply(weighted @ u, reach.numpy(), out=E[:, :r])
    E[:, r:] = (p[:, None, None] * u).reshape(kr, r)  # D U
    Mu, Bu = E[:, :r], E[:, r:]  # NumPy views: `_solve` combines them in NumPy
    gram_e = gram_b @ E
    mm_bb = (E * gram_e).sum(0)
    mm, mb, bb = mm_bb[:r], (Mu * gram_e[:, r:]).sum(0), mm_bb[r:]
    abs_e = np.abs(E)
    sizes = (abs_e * (np.abs(gram_b) @ abs_e)).sum(0)  # the terms' size of mm, then of bb
    if not exact_enough(np.concatenate([[dw_sq], mm_bb]), np.concatenate([[size], sizes])):
        return None
    return Mu, Bu, dw_sq, _ColumnSums(mm, mb, bb)


def frobenius_from_sums(A_bar: torch.Tensor, B_bar: torch.Tensor, M: torch.Tensor, lam: float) -> torch.Tensor:
    """Frobenius LoRA-FAIR's `B' = (M + λB̄)(ĀĀᵀ + λI)⁻¹` from the three sums alone (float64).

    `Ā = Σ p_k A_k`, `B̄ = Σ p_k B_k` and `M = Σ p_k B_k (A_k Āᵀ)` are each a weighted sum of
    per-client terms, so secure aggregation can deliver them (`fairedge.server.secagg`); the
    plaintext `lora_fair` goes through the same eigenbasis and `_frobenius_coefficients`.
    """
    lam = _check_options(lam, "frobenius")
    Ab, Bb, M = A_bar.double(), B_bar.double(), M.double()
    g, U, reach = _gram_eigen(Ab)
    return _combine((M @ U) * reach, Bb @ U, _frobenius_coefficients(g.cpu().numpy(), lam)) @ U.T


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


class _ColumnSums(NamedTuple):
    """Per eigen-direction `i`: `mm = ‖M u_i‖²`, `mb = ⟨M u_i, B̄ u_i⟩`, `bb = ‖B̄ u_i‖²`."""

    mm: np.ndarray
    mb: np.ndarray
    bb: np.ndarray


def _FEDIT(r: int) -> Combination:
    """`X = B̄`."""
    return Combination(np.zeros(r), np.ones(r), np.zeros(r))


def _combine(Mu: torch.Tensor, Bu: torch.Tensor, c: Combination) -> torch.Tensor:
    """`XU = MU diag(α) + B̄U diag(β)`."""
    return Mu * torch.from_numpy(c.alpha).to(Mu) + Bu * torch.from_numpy(c.beta).to(Bu)


def _frobenius_coefficients(g: np.ndarray, lam: float) -> Combination:
    """`XU = (MU + λB̄U)(diag(g) + λI)⁻¹`, with a pseudo-inverse where `g_i + λ = 0` (λ = 0)."""
    d = g + lam
    inv = np.where(d > d.max() * d.size * np.finfo(d.dtype).eps, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    return Combination(inv, lam * inv, np.where(inv > 0, -g * inv, -1.0))


def _figures(c: Combination, g: np.ndarray, sums: _ColumnSums, d: float) -> tuple[float, float, float, float, float]:
    """`cos(ΔW, XĀ)`, `cos(ΔW, B̄Ā)`, `‖X − B̄‖/‖B̄‖`, `‖XĀ‖/‖ΔW‖`, `‖B̄Ā‖/‖ΔW‖` (0 where undefined)."""
    inner, product, moved = (float(v) for v in column_sums(c, g, *sums))
    fedit_product, bb = float((g * sums.bb).sum()), float(sums.bb.sum())

    def cosine(inner: float, product: float) -> float:
        return min(max(inner / (d * math.sqrt(product)), -1.0), 1.0) if d > 0 and product > 0 else 0.0

    return (
        cosine(inner, product),
        cosine(float(sums.mb.sum()), fedit_product),
        math.sqrt(max(moved, 0.0) / bb) if bb > 0 else 0.0,
        math.sqrt(max(product, 0.0)) / d if d > 0 else 0.0,
        math.sqrt(max(fedit_product, 0.0)) / d if d > 0 else 0.0,
    )


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
