"""LoRA-FAIR against a plain dense reference: form ΔW, optimise B' with L-BFGS.

Both of the solver's ways to `ΔW` (factored, dense) are checked against the reference and each other."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import pytest
import torch

from fairedge.common.aggregation import (
    AGGREGATORS,
    Adapter,
    ClientUpdate,
    LoraFair,
    factored,
    lora_fair,
    make_aggregator,
    solve_lora_fair,
)
from fairedge.common.aggregation.factored import LowRankSum, gram_cost, gram_flops
from fairedge.common.aggregation.lora_fair import delta_form_flops

lora_fair_module = importlib.import_module(
    "fairedge.common.aggregation.lora_fair"
)  # the package re-exports a function of that name

F64 = torch.float64
FORMS = ("factored", "dense")
Case = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small problems run faster, and steadier, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- inputs -------------------------------------------------------------------------------


def random_case(seed: int, K: int = 4, m: int = 14, n: int = 17, r: int = 3, b_scale: float = 1.0) -> Case:
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g, dtype=F64) for _ in range(K)]
    B = [b_scale * torch.randn(m, r, generator=g, dtype=F64) for _ in range(K)]
    return A, B, torch.rand(K, generator=g, dtype=F64) + 0.1


def ill_conditioned_case(seed: int, K: int = 4, m: int = 12, n: int = 16, r: int = 4) -> Case:
    """Every `A_k` has singular values spanning 1e-4 .. 1."""
    g = torch.Generator().manual_seed(seed)
    sv = torch.logspace(-4, 0, r, dtype=F64)
    A = []
    for _ in range(K):
        U, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
        V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
        A.append(U @ torch.diag(sv) @ V.T)
    B = [torch.randn(m, r, generator=g, dtype=F64) for _ in range(K)]
    return A, B, torch.rand(K, generator=g, dtype=F64) + 0.1


def cancelling_case(seed: int, eps: float = 1e-3, m: int = 12, n: int = 15, r: int = 3) -> Case:
    """Two equal-weight clients whose updates nearly cancel: `B_2A_2 ≈ −B_1A_1`."""
    g = torch.Generator().manual_seed(seed)
    A1, B1 = torch.randn(r, n, generator=g, dtype=F64), torch.randn(m, r, generator=g, dtype=F64)
    A2 = A1 + eps * torch.randn(r, n, generator=g, dtype=F64)
    B2 = -B1 + eps * torch.randn(m, r, generator=g, dtype=F64)
    A3, B3 = torch.randn(r, n, generator=g, dtype=F64), torch.randn(m, r, generator=g, dtype=F64)
    return [A1, A2, A3], [B1, B2, B3], torch.tensor([1.0, 1.0, 1e-3], dtype=F64)


def anti_aligned_case(seed: int, K: int = 3, m: int = 8, n: int = 5, r: int = 2) -> Case:
    """Random clients, redrawn until FedIT's `B̄Ā` points away from ΔW (`cos < 0`)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        A = [torch.randn(r, n, generator=g, dtype=F64) for _ in range(K)]
        B = [3.0 * torch.randn(m, r, generator=g, dtype=F64) for _ in range(K)]
        w = torch.rand(K, generator=g, dtype=F64) + 0.1
        dW, Ab, Bb = dense(A, B, w)
        if float((dW * (Bb @ Ab)).sum()) < 0:
            return A, B, w


CASES: dict[str, Callable[[], Case]] = {
    **{f"random{s}": (lambda s=s: random_case(s)) for s in range(3)},
    "lora_scale": lambda: random_case(10, b_scale=1e-2),  # small B: the cosine term dominates
    "large_b": lambda: random_case(11, b_scale=30.0),  # large B: the regulariser dominates
    "many_clients": lambda: random_case(12, K=9, m=10, n=11, r=2),
    "rank_above_n": lambda: random_case(13, K=3, m=9, n=3, r=5),  # G singular
    **{f"ill{s}": (lambda s=s: ill_conditioned_case(s)) for s in range(2)},
    "cancel": lambda: cancelling_case(20),
    "cancel_hard": lambda: cancelling_case(21, eps=1e-5),
    **{f"anti{s}": (lambda s=s: anti_aligned_case(s)) for s in range(3)},
}


# --- dense reference ------------------------------------------------------------------------


def dense(A: list[torch.Tensor], B: list[torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    p = w / w.sum()
    dW = sum(pk * b @ a for pk, a, b in zip(p, A, B, strict=True))
    Ab = sum(pk * a for pk, a in zip(p, A, strict=True))
    Bb = sum(pk * b for pk, b in zip(p, B, strict=True))
    return dW, Ab, Bb


def cosine_objective(dW: torch.Tensor, Ab: torch.Tensor, Bb: torch.Tensor, lam: float):
    def f(X: torch.Tensor) -> torch.Tensor:
        cos = (dW * (X @ Ab)).sum() / (dW.norm() * (X @ Ab).norm())
        return 1 - cos + lam * ((X - Bb) ** 2).sum()

    return f


def frobenius_objective(dW: torch.Tensor, Ab: torch.Tensor, Bb: torch.Tensor, lam: float):
    return lambda X: ((dW - X @ Ab) ** 2).sum() + lam * ((X - Bb) ** 2).sum()


def lbfgs(f, X0: torch.Tensor, iters: int = 3000) -> torch.Tensor:
    X = X0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [X],
        lr=1,
        max_iter=iters,
        history_size=50,
        tolerance_grad=1e-15,
        tolerance_change=1e-18,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = f(X)
        loss.backward()
        return loss

    opt.step(closure)
    return X.detach()


def gradient(f, X: torch.Tensor) -> torch.Tensor:
    X = X.clone().requires_grad_(True)
    f(X).backward()
    return X.grad


# --- the solver against the reference -------------------------------------------------------


@pytest.mark.parametrize("lam", [0.01, 0.3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cosine_never_worse_than_dense_lbfgs(case: str, lam: float) -> None:
    A, B, w = CASES[case]()
    dW, Ab, Bb = dense(A, B, w)
    f = cosine_objective(dW, Ab, Bb, lam)
    reference = float(f(lbfgs(f, Bb)))
    for form in FORMS:
        ours = float(f(lora_fair(A, B, w, lam=lam, delta_form=form)[1]))
        assert ours <= reference + 1e-4 * abs(reference), (form, ours, reference)
        assert ours <= float(f(Bb)) + 1e-15  # never worse than FedIT


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_clients_are_solved_as_well_as_dense_float64(case: str) -> None:
    """float32 factors take the float32 path for the large products; the reference is float64 on the same values."""
    A, B, w = CASES[case]()
    A32, B32 = [a.float() for a in A], [b.float() for b in B]
    dW, Ab, Bb = dense([a.double() for a in A32], [b.double() for b in B32], w)
    f = cosine_objective(dW, Ab, Bb, 0.01)
    reference = float(f(lbfgs(f, Bb)))
    for form in FORMS:
        ours = float(f(lora_fair(A32, B32, w.float(), lam=0.01, delta_form=form)[1].double()))
        assert ours <= reference + 1e-4 * abs(reference), (form, ours, reference)


@pytest.mark.parametrize("case", ["random0", "lora_scale", "ill0", "cancel"])
def test_cosine_solution_is_stationary_and_beats_random_starts(case: str) -> None:
    A, B, w = CASES[case]()
    dW, Ab, Bb = dense(A, B, w)
    f = cosine_objective(dW, Ab, Bb, 0.01)
    X = lora_fair(A, B, w)[1]
    grad = gradient(f, X)
    assert grad.norm() * X.norm() < 1e-7  # scale-free: ∂f/∂X shrinks as X grows
    assert abs(float((X * (X - Bb)).sum())) < 1e-9 * float(Bb.norm() ** 2)  # radial stationarity
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        start = Bb + Bb.norm() / Bb.numel() ** 0.5 * torch.randn(Bb.shape, generator=g, dtype=F64)
        other = float(f(lbfgs(f, start, iters=1500)))
        assert float(f(X)) <= other + 1e-4 * abs(other)


@pytest.mark.parametrize("case", ["anti0", "anti1", "anti2"])
def test_cosine_finds_negative_cosine_minimum_when_the_regulariser_dominates(case: str) -> None:
    """With `cos(ΔW, B̄Ā) < 0` and a large λ the best B' still has a negative cosine."""
    A, B, w = CASES[case]()
    dW, Ab, Bb = dense(A, B, w)
    f = cosine_objective(dW, Ab, Bb, 1.0)
    res = solve_lora_fair(A, B, w, lam=1.0)
    assert res.cos_fedit < res.cos_fair < 0
    g = torch.Generator().manual_seed(0)
    starts = [Bb] + [Bb + torch.randn(Bb.shape, generator=g, dtype=F64) for _ in range(3)]
    best_reference = min(float(f(lbfgs(f, X0, iters=1500))) for X0 in starts)
    assert float(f(res.B_prime)) <= best_reference + 1e-10


def test_cosine_approaches_the_infimum_when_no_minimiser_exists() -> None:
    """Updates that nearly cancel leave B̄ leaning away from ΔW's projection on Ā's row space:
    the objective then decreases all the way to `XĀ → 0` along the best-cosine direction,
    to `1 − cos_max + λ‖B̄‖²`, and a minimiser does not exist."""
    A, B, w = CASES["cancel_hard"]()
    dW, Ab, Bb = dense(A, B, w)
    lam = 0.01
    cos_max = float((dW @ torch.linalg.pinv(Ab) @ Ab).norm() / dW.norm())
    infimum = 1 - cos_max + lam * float((Bb**2).sum())  # Ā has full row rank here
    value = float(cosine_objective(dW, Ab, Bb, lam)(lora_fair(A, B, w, lam=lam)[1]))
    assert infimum - 1e-12 <= value <= infimum + 1e-9


@pytest.mark.parametrize("lam", [0.0, 0.01, 2.0])
@pytest.mark.parametrize("case", ["random0", "random1", "ill0", "cancel", "many_clients"])
def test_frobenius_matches_dense_least_squares(case: str, lam: float) -> None:
    A, B, w = CASES[case]()
    dW, Ab, Bb = dense(A, B, w)
    # min ‖[ΔW, √λB̄] − X[Ā, √λI]‖²  as an ordinary least-squares problem
    r = Ab.shape[0]
    lhs = torch.cat([Ab, lam**0.5 * torch.eye(r, dtype=F64)], dim=1)
    rhs = torch.cat([dW, lam**0.5 * Bb], dim=1)
    expected = torch.linalg.lstsq(lhs.T, rhs.T).solution.T if lam > 0 else dW @ torch.linalg.pinv(Ab)
    f = frobenius_objective(dW, Ab, Bb, lam)
    reference = float(f(lbfgs(f, Bb))) if lam > 0 else 0.0
    for form in FORMS:
        X = lora_fair(A, B, w, lam=lam, objective="frobenius", delta_form=form)[1]
        assert torch.allclose(X, expected, rtol=0, atol=1e-8 * float(expected.abs().max())), form
        if lam > 0:
            assert float(f(X)) <= reference * (1 + 1e-10), form


def test_cosine_is_invariant_to_scaling_a() -> None:
    """cos(ΔW, XĀ) does not change when every A_k is scaled, so neither does B'."""
    A, B, w = CASES["random1"]()
    X1 = lora_fair(A, B, w)[1]
    X2 = lora_fair([7.5 * a for a in A], B, w)[1]
    assert torch.allclose(X1, X2, rtol=1e-9, atol=0)


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_factored_and_dense_forms_agree(case: str, objective: str) -> None:
    A, B, w = CASES[case]()
    lam = 0.01
    factored_res = solve_lora_fair(A, B, w, lam=lam, objective=objective, delta_form="factored")
    dense_res = solve_lora_fair(A, B, w, lam=lam, objective=objective, delta_form="dense")
    assert (factored_res.delta_form, dense_res.delta_form) == FORMS
    X, Y = factored_res.B_prime, dense_res.B_prime
    assert float((X - Y).norm()) <= 1e-9 * float(X.norm()), float((X - Y).norm() / X.norm())
    assert torch.equal(factored_res.A_bar, dense_res.A_bar)
    for key in ("cos_fair", "cos_fedit", "rel_correction"):
        assert getattr(factored_res, key) == pytest.approx(getattr(dense_res, key), rel=1e-9, abs=1e-12), key


def test_auto_takes_the_form_with_fewer_flops() -> None:
    """768×768, r = 64: two clients stay factored; with 100 the dense ΔW is far cheaper than the Grams."""
    few = delta_form_flops(768, 768, [64] * 2, needs_norm=True, single=True)
    many = delta_form_flops(768, 768, [64] * 100, needs_norm=True, single=True)
    assert few["factored"] < few["dense"] and many["dense"] < many["factored"] / 4
    assert delta_form_flops(768, 768, [64] * 100, needs_norm=False, single=True)["factored"] < many["dense"]
    # one client of rank k: the switch sits near k = mn/(m+n) (Grams ~k²(m+n) plus M ~2k²(m+n), ΔW ~4mn·k)
    for m, n in ((768, 768), (576, 192), (4096, 4096)):
        kr = next(
            k
            for k in range(1, 10_000)
            if delta_form_flops(m, n, [k], needs_norm=True, single=False)["dense"]
            < delta_form_flops(m, n, [k], needs_norm=True, single=False)["factored"]
        )
        assert 1.0 < kr / (m * n / (m + n)) < 2.0, (m, n, kr)
    assert gram_flops(160, 8192, whole=False) == sum(2 * 40 * (160 - s) * 8192 for s in range(0, 160, 40))
    assert gram_flops(160, 8192) == 160 * 161 * 8192  # one syrk per Gram
    assert gram_flops(4096, 8192) == gram_flops(4096, 8192, whole=False)  # too large to form whole
    assert gram_cost(160, 8192) == pytest.approx(1.5 * gram_flops(160, 8192))
    assert gram_cost(4096, 8192) == gram_flops(4096, 8192)
    g = torch.Generator().manual_seed(8)
    for K, expected in ((2, "factored"), (40, "dense")):
        A = [torch.randn(8, 48, generator=g) for _ in range(K)]
        B = [torch.randn(40, 8, generator=g) for _ in range(K)]
        assert solve_lora_fair(A, B, torch.ones(K)).delta_form == expected


def test_dense_float32_redoes_cancelling_updates_in_float64(monkeypatch) -> None:
    """Nearly cancelling float32 clients: a float32 ΔW misses ΔW Āᵀ by ~1e-4; the float64 redo is exact."""
    A, B, w = CASES["cancel_hard"]()
    A32, B32 = [a.float() for a in A], [b.float() for b in B]
    dW, Ab, _ = dense([a.double() for a in A32], [b.double() for b in B32], w)
    delta = LowRankSum.stack(A32, B32, w, dtype=torch.float32)

    def errors() -> tuple[float, float]:
        M, dw_sq = lora_fair_module._dense_products(delta, Ab)
        return abs(dw_sq / float((dW**2).sum()) - 1), float((M - dW @ Ab.T).norm() / (dW @ Ab.T).norm())

    assert max(errors()) < 1e-12
    monkeypatch.setattr(lora_fair_module, "_CANCELLATION", 0.0)  # never redo: the float32 ΔW's error shows
    assert max(errors()) > 3e-5
    # and the whole solve in float32 still matches float64 on the same values, to what the float32 means allow
    exact = solve_lora_fair([a.double() for a in A32], [b.double() for b in B32], w, delta_form="dense").B_prime
    monkeypatch.undo()
    X = solve_lora_fair(A32, B32, w, delta_form="dense").B_prime.double()
    assert float((X - exact).norm() / exact.norm()) < 1e-4


# --- exact special cases --------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
def test_one_client_returns_its_factors_bit_equal(objective: str) -> None:
    g = torch.Generator().manual_seed(3)
    A1, B1 = torch.randn(4, 9, generator=g), torch.randn(7, 4, generator=g)
    Ab, Bp = lora_fair([A1], [B1], [5.0], objective=objective)
    assert torch.equal(Ab, A1) and torch.equal(Bp, B1)
    assert Ab.dtype == Bp.dtype == torch.float32
    # a zero-weight second client changes nothing either
    A2, B2 = torch.randn(4, 9, generator=g), torch.randn(7, 4, generator=g)
    res = solve_lora_fair([A1, A2], [B1, B2], [3.0, 0.0], objective=objective)
    assert torch.equal(res.A_bar, A1) and torch.equal(res.B_prime, B1)
    # float32 clients: ‖ΔW‖² (either form) carries float32 rounding, so the cosine is 1 to float32 precision
    assert res.rel_correction == 0.0 and res.cos_fair == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
def test_weights_are_normalised(objective: str) -> None:
    A, B, w = CASES["random2"]()
    Ab1, X1 = lora_fair(A, B, w, objective=objective)
    Ab2, X2 = lora_fair(A, B, (123.0 * w).tolist(), objective=objective)
    assert torch.allclose(Ab1, Ab2, rtol=1e-12, atol=0) and torch.allclose(X1, X2, rtol=1e-9, atol=1e-15)


def test_returns_input_dtype_and_clients_agree_on_shapes() -> None:
    A, B, w = CASES["random0"]()
    Ab, X = lora_fair([a.float() for a in A], [b.float() for b in B], w)
    assert Ab.dtype == X.dtype == torch.float32
    assert Ab.shape == A[0].shape and X.shape == B[0].shape
    assert X.is_contiguous() and Ab.is_contiguous()


def test_never_forms_the_dense_matrix() -> None:
    """m = n = 200 000: ΔW would need 320 GB in float64."""
    g = torch.Generator().manual_seed(4)
    m = n = 200_000
    A = [torch.randn(2, n, generator=g) for _ in range(3)]
    B = [torch.randn(m, 2, generator=g) for _ in range(3)]
    for objective in ("cosine", "frobenius"):
        res = solve_lora_fair(A, B, [1.0, 2.0, 3.0], objective=objective)
        assert res.B_prime.shape == (m, 2) and res.cos_fair >= res.cos_fedit - 1e-9


# --- errors ---------------------------------------------------------------------------------


def _ok() -> Case:
    A, B, w = random_case(5, K=3, m=6, n=5, r=2)
    return A, B, w


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda A, B, w: ([], [], []), "at least one client"),
        (lambda A, B, w: (A, B[:2], w), "3 A factors but 2 B factors"),
        (lambda A, B, w: (A, B, w[:2]), "expected 3 weights"),
        (lambda A, B, w: ([A[0], A[1][:1], A[2]], B, w), r"client 1: A is \(1, 5\) \(r×n\) but B is \(6, 2\)"),
        (lambda A, B, w: ([A[0], A[1], A[2][:, :4]], B, w), r"client 2: B·A is 6×4, client 0's is 6×5"),
        (lambda A, B, w: (A, [B[0], B[1][:5], B[2]], w), r"client 1: B·A is 5×5, client 0's is 6×5"),
        (lambda A, B, w: ([A[0], A[1][:1], A[2]], [B[0], B[1][:, :1], B[2]], w), "client 1: A has rank 1"),
        (lambda A, B, w: (A, [B[0], B[1], B[2].flatten()], w), r"client 2: B must be a 2-D tensor, got \(12,\)"),
        (lambda A, B, w: ([A[0].long(), A[1], A[2]], B, w), "client 0: A must be floating point"),
        (lambda A, B, w: (A, [B[0], B[1] * float("nan"), B[2]], w), r"client 1: B \(6, 2\) has non-finite"),
        (lambda A, B, w: ([A[0], A[1], A[2] * float("inf")], B, w), r"client 2: A \(2, 5\) has non-finite"),
        (lambda A, B, w: (A, B, [1.0, -1.0, 2.0]), "non-negative"),
        (lambda A, B, w: (A, B, [0.0, 0.0, 0.0]), "not all be zero"),
        (lambda A, B, w: (A, B, [1.0, float("nan"), 1.0]), "finite"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match: str) -> None:
    A, B, w = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        lora_fair(A, B, w)


@pytest.mark.parametrize("delta_form", ["factored", "dense"])
@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_one_non_finite_entry_is_named_on_every_path(delta_form: str, objective: str, dtype, factor: str) -> None:
    """The factored cosine path reads finiteness off the Grams' diagonals; a client with weight 0 counts too."""
    A, B, _ = random_case(6, K=3, m=40, n=30, r=2)
    A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
    bad = (A if factor == "A" else B)[1].clone()
    bad[1, 1] = float("nan")
    (A if factor == "A" else B)[1] = bad
    shape = tuple(bad.shape)
    with pytest.raises(ValueError, match=rf"client 1: {factor} \({shape[0]}, {shape[1]}\) has non-finite"):
        lora_fair(A, B, [1.0, 0.0, 2.0], objective=objective, delta_form=delta_form)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objective": "l1"}, "unknown objective 'l1'"),
        ({"lam": -0.1}, "lam must be a finite number >= 0"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0"),
        ({"lam": 0.0}, "lam must be > 0 for the cosine objective"),
        ({"delta_form": "sparse"}, r"unknown delta_form 'sparse'; allowed: \['auto', 'factored', 'dense'\]"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    A, B, w = _ok()
    with pytest.raises(ValueError, match=match):
        lora_fair(A, B, w, **kwargs)
    with pytest.raises(ValueError, match=match):
        LoraFair(**kwargs)


# --- factored algebra and metrics ------------------------------------------------------------


@pytest.mark.parametrize("case", ["random0", "many_clients", "ill1", "cancel", "cancel_hard"])
def test_factored_norm_and_inner_products_equal_dense(case: str, monkeypatch) -> None:
    A, B, w = CASES[case]()
    dW, Ab, Bb = dense(A, B, w)
    for whole, block_elems in ((1 << 22, 1 << 22), (0, 1 << 22), (0, 7)):  # syrk; one slab; one row per slab
        monkeypatch.setattr(factored, "_GRAM_WHOLE_ELEMS", whole)
        monkeypatch.setattr(factored, "_GRAM_BLOCK_ELEMS", block_elems)
        delta = LowRankSum.stack(A, B, w)
        assert float(delta.sq_norm()) == pytest.approx(float((dW**2).sum()), rel=1e-9, abs=1e-13)
    X = torch.randn(Bb.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert float(delta.inner(X, Ab)) == pytest.approx(float((dW * (X @ Ab)).sum()), rel=1e-10, abs=1e-13)
    assert torch.allclose(delta.times_t(Ab), dW @ Ab.T, rtol=1e-10, atol=1e-13)
    assert torch.allclose(delta.mean_A(), Ab) and torch.allclose(delta.mean_B(), Bb)


@pytest.mark.parametrize("case", ["random0", "many_clients", "ill1", "cancel", "cancel_hard"])
def test_float32_stacks_give_the_norm_to_1e6_falling_back_to_float64_on_cancellation(case: str) -> None:
    """float32 Grams for ‖ΔW‖², redone in float64 when the terms cancel (the `cancel` cases)."""
    A, B, w = CASES[case]()
    A32, B32 = [a.float() for a in A], [b.float() for b in B]
    dW, Ab, _ = dense([a.double() for a in A32], [b.double() for b in B32], w)
    delta = LowRankSum.stack(A32, B32, w, dtype=torch.float32)
    assert delta.A.dtype == torch.float32 and delta.sq_norm().dtype == F64
    assert float(delta.sq_norm()) == pytest.approx(float((dW**2).sum()), rel=1e-6)
    # ΔW Āᵀ in float32: each entry within ~1e-5 of the size of the terms it sums (cancellation may make it tiny)
    p = w / w.sum()
    size = sum(pk * b.double().abs() @ (a.double() @ Ab.T).abs() for pk, a, b in zip(p, A32, B32))
    assert ((delta.times_t(Ab) - dW @ Ab.T).abs() <= 1e-5 * size + 1e-15).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_solving_on_gram_coordinates_equals_forming_m(case: str, dtype: torch.dtype, monkeypatch) -> None:
    """Where ‖ΔW‖² is needed the factored way solves on `Kr×r` coordinates (`_Span`); where the clients'
    updates cancel (the `cancel` cases) the Grams' rounding could show, and it forms `M` instead."""
    A, B, w = CASES[case]()
    A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
    taken: list[bool] = []
    in_span = lora_fair_module._in_span

    def spy(*args):
        out = in_span(*args)
        taken.append(out is not None)
        return out

    formed: list[int] = []
    syrk_grams = factored._syrk_grams
    monkeypatch.setattr(lora_fair_module, "_in_span", spy)
    monkeypatch.setattr(lora_fair_module, "_coordinates_pay", lambda m, n, kr: True)  # these layers are tiny
    monkeypatch.setattr(factored, "_syrk_grams", lambda *args: formed.append(1) or syrk_grams(*args))
    for objective in ("cosine", "frobenius"):
        formed.clear()
        span = solve_lora_fair(A, B, w, objective=objective, delta_form="factored")
        assert taken.pop() is not case.startswith("cancel"), objective
        assert len(formed) == (2 if case.startswith("cancel") and dtype != F64 else 1)  # float32: redone in float64
        with monkeypatch.context() as plain_route:
            plain_route.setattr(lora_fair_module, "_in_span", lambda *args: None)
            plain = solve_lora_fair(A, B, w, objective=objective, delta_form="factored")
        tol = 1e-12 if dtype == F64 else 2e-6
        X, Y = span.B_prime.double(), plain.B_prime.double()
        assert float((X - Y).norm()) <= tol * float(Y.norm()), (objective, float((X - Y).norm() / Y.norm()))
        for key in ("cos_fair", "cos_fedit", "rel_correction", "norm_ratio", "norm_ratio_fedit"):
            assert getattr(span, key) == pytest.approx(getattr(plain, key), rel=10 * tol, abs=1e-12), key


def test_coordinates_are_taken_where_their_products_cost_less_than_forming_m() -> None:
    pays = lora_fair_module._coordinates_pay
    assert pays(4096, 4096, 16 * 10) and pays(576, 576, 16 * 8)  # the headline layer; SmolLM2's q_proj, K = 8
    assert not pays(768, 768, 64 * 8) and not pays(576, 576, 16 * 50)  # measured slower there
    few, many = (delta_form_flops(768, 768, [64] * k, needs_norm=True, single=True)["factored"] for k in (2, 8))
    assert few == round(gram_cost(128, 1536)) + 2 * 128 * 64 * 768  # then only B' = B_s E is formed
    assert many == round(gram_cost(512, 1536)) + 2 * 512 * 64 * 1536  # M is formed


def test_factored_norm_with_unequal_ranks() -> None:
    g = torch.Generator().manual_seed(6)
    ranks = (1, 4, 2)
    A = [torch.randn(r, 8, generator=g, dtype=F64) for r in ranks]
    B = [torch.randn(5, r, generator=g, dtype=F64) for r in ranks]
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    dW = sum(p * b @ a for p, a, b in zip(w, A, B, strict=True))
    assert float(LowRankSum.stack(A, B, w, same_rank=False).sq_norm()) == pytest.approx(float((dW**2).sum()))


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
def test_reported_metrics_equal_dense(objective: str) -> None:
    A, B, w = CASES["random1"]()
    dW, Ab, Bb = dense(A, B, w)
    res = solve_lora_fair(A, B, w, objective=objective)

    def cos(X: torch.Tensor) -> float:
        return float((dW * (X @ Ab)).sum() / (dW.norm() * (X @ Ab).norm()))

    assert res.cos_fair == pytest.approx(cos(res.B_prime), abs=1e-12)
    assert res.cos_fedit == pytest.approx(cos(Bb), abs=1e-12)
    assert res.rel_correction == pytest.approx(float((res.B_prime - Bb).norm() / Bb.norm()), rel=1e-12)
    assert torch.equal(res.A_bar, lora_fair(A, B, w, objective=objective)[0])


# --- the aggregator -------------------------------------------------------------------------


def _toy_updates(seed: int = 7) -> tuple[list[ClientUpdate], Adapter]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (12, 10), "v": (8, 10)}  # (m, n) per layer
    updates = []
    for k, examples in enumerate((10, 30, 60)):
        factors = {
            name: (torch.randn(4, n, generator=g), 0.05 * torch.randn(m, 4, generator=g))
            for name, (m, n) in shapes.items()
        }
        head = {"weight": torch.full((3, 2), float(k)), "bias": torch.full((3,), float(k))}
        updates.append(ClientUpdate(Adapter(factors, head), num_examples=examples, node_id=k))
    current = Adapter({name: (torch.zeros(4, n), torch.zeros(m, 4)) for name, (m, n) in shapes.items()})
    return updates, current


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
def test_aggregator_on_two_layer_adapter(objective: str) -> None:
    updates, current = _toy_updates()
    agg = make_aggregator("lora_fair", lam=0.01, objective=objective)
    assert isinstance(agg, LoraFair) and AGGREGATORS["lora_fair"] is LoraFair
    new, metrics = agg.aggregate(updates, current)
    keys = ("cos_fair", "cos_fedit", "rel_correction", "norm_ratio", "norm_ratio_fedit")
    assert set(metrics) == {f"lora_fair/{k}" for k in keys}
    assert metrics["lora_fair/cos_fair"] >= metrics["lora_fair/cos_fedit"] - 1e-9
    assert metrics["lora_fair/rel_correction"] > 0
    p = [0.1, 0.3, 0.6]
    for name, (a_cur, b_cur) in current.factors.items():
        Ab, Bp = new.factors[name]
        assert Ab.shape == a_cur.shape and Bp.shape == b_cur.shape and Bp.dtype == torch.float32
        A = [u.adapter.factors[name][0] for u in updates]
        B = [u.adapter.factors[name][1] for u in updates]
        assert torch.allclose(Ab, sum(pk * a for pk, a in zip(p, A, strict=True)), atol=1e-6)
        assert torch.allclose(Bp, lora_fair(A, B, p, objective=objective)[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(new.head["weight"], torch.full((3, 2), 0.3 * 1 + 0.6 * 2))
    for form in ("factored", "dense"):
        forced, _ = make_aggregator("lora_fair", objective=objective, delta_form=form).aggregate(updates, current)
        for name in current.factors:
            assert torch.allclose(forced.factors[name][1], new.factors[name][1], rtol=1e-4, atol=1e-6), (form, name)


@pytest.mark.parametrize("objective", ["cosine", "frobenius"])
def test_norm_ratios_are_the_sizes_of_the_corrected_and_fedit_products_over_the_ideal_update(objective):
    g = torch.Generator().manual_seed(7)
    A = [torch.randn(4, 30, dtype=torch.float64, generator=g) for _ in range(3)]
    B = [torch.randn(20, 4, dtype=torch.float64, generator=g) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    res = solve_lora_fair(A, B, w, objective=objective)
    dw = sum(wk * b @ a for wk, a, b in zip(w, A, B))
    a_bar, b_bar = sum(wk * a for wk, a in zip(w, A)), sum(wk * b for wk, b in zip(w, B))
    assert res.norm_ratio == pytest.approx(float((res.B_prime @ res.A_bar).norm() / dw.norm()), rel=1e-10)
    assert res.norm_ratio_fedit == pytest.approx(float((b_bar @ a_bar).norm() / dw.norm()), rel=1e-10)
