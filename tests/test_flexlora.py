"""FlexLoRA against the dense truncated SVD of ΔW = Σ p_k B_k A_k."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fairedge.common.aggregation import AGGREGATORS, Adapter, ClientUpdate, FlexLoRA, flexlora, make_aggregator

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def factors(seed: int, ranks: tuple[int, ...], m: int, n: int, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g, dtype=dtype) for r in ranks]
    B = [torch.randn(m, r, generator=g, dtype=dtype) for r in ranks]
    return A, B, torch.rand(len(ranks), generator=g, dtype=F64) + 0.1


def dense_delta(A, B, w) -> torch.Tensor:
    p = w / w.sum()
    return sum(pk * b.to(F64) @ a.to(F64) for pk, a, b in zip(p, A, B, strict=True))


def best_rank(dW: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


@pytest.mark.parametrize(
    ("ranks", "m", "n", "rank"),
    [
        ((4, 4, 4), 30, 40, 4),
        ((8,) * 5, 64, 48, 8),
        ((2, 6, 3), 25, 20, 4),  # heterogeneous client ranks
        ((3, 3, 3, 3), 6, 7, 3),  # K·r = 12 > m, n: wide QR
    ],
)
def test_equals_dense_truncated_svd(ranks: tuple[int, ...], m: int, n: int, rank: int) -> None:
    A, B, w = factors(0, ranks, m, n)
    A_new, B_new = flexlora(A, B, w, rank)
    assert A_new.shape == (rank, n) and B_new.shape == (m, rank)
    dW = dense_delta(A, B, w)
    expected = best_rank(dW, rank)
    assert torch.allclose(B_new @ A_new, expected, rtol=0, atol=1e-6 * float(dW.abs().max()))
    assert torch.allclose(B_new @ A_new, expected, rtol=0, atol=1e-10 * float(dW.abs().max()))
    # Eckart–Young: what is left is exactly the dropped singular values
    S = torch.linalg.svdvals(dW)
    assert float(((dW - B_new @ A_new) ** 2).sum()) == pytest.approx(float((S[rank:] ** 2).sum()), rel=1e-8, abs=1e-20)


def test_singular_values_are_split_evenly() -> None:
    A, B, w = factors(1, (4, 4, 4), 20, 16)
    A_new, B_new = flexlora(A, B, w, 4)
    S = torch.linalg.svdvals(dense_delta(A, B, w))[:4]
    assert torch.allclose(B_new.T @ B_new, torch.diag(S), atol=1e-10)
    assert torch.allclose(A_new @ A_new.T, torch.diag(S), atol=1e-10)


def test_one_client_reproduces_its_update_exactly() -> None:
    A, B, _ = factors(2, (5,), 12, 9)
    A_new, B_new = flexlora(A, B, [3.0], 5)
    assert torch.allclose(B_new @ A_new, B[0] @ A[0], rtol=0, atol=1e-12)


def test_rank_above_the_update_rank_pads_with_zeros() -> None:
    A, B, w = factors(3, (2, 2), 10, 8)  # ΔW has rank 4
    A_new, B_new = flexlora(A, B, w, 6)
    assert A_new.shape == (6, 8) and B_new.shape == (10, 6)
    assert torch.allclose(B_new @ A_new, dense_delta(A, B, w), atol=1e-12)
    A_tiny, B_tiny = flexlora(*factors(4, (3, 3), 2, 2), 3)  # rank > min(m, n)
    assert A_tiny.shape == (3, 2) and B_tiny.shape == (2, 3)


def test_returns_input_dtype_and_weights_are_normalised() -> None:
    A, B, w = factors(5, (4, 4), 16, 12, dtype=torch.float32)
    A1, B1 = flexlora(A, B, w, 4)
    A2, B2 = flexlora(A, B, (9.0 * w).tolist(), 4)
    assert A1.dtype == B1.dtype == torch.float32
    assert torch.allclose(B1 @ A1, B2 @ A2, atol=1e-6)


def test_never_forms_the_dense_matrix() -> None:
    """m = n = 200 000: ΔW would need 320 GB in float64."""
    A, B, w = factors(6, (2, 2, 2), 200_000, 200_000, dtype=torch.float32)
    A_new, B_new = flexlora(A, B, w, 2)
    assert A_new.shape == (2, 200_000) and B_new.shape == (200_000, 2)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([], [], [], 2), "at least one client"),
        (([torch.ones(2, 3)], [torch.ones(4, 3)], [1.0], 2), r"client 0: A is \(2, 3\) \(r×n\) but B is \(4, 3\)"),
        (([torch.ones(2, 3)], [torch.ones(4, 2)], [1.0], 0), "rank must be a positive integer"),
        (([torch.ones(2, 3)], [torch.full((4, 2), float("nan"))], [1.0], 2), "client 0: B .* non-finite"),
        (([torch.ones(2, 3)], [torch.ones(4, 2)], [-1.0], 2), "non-negative"),
    ],
)
def test_bad_inputs_raise(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        flexlora(*args)


def test_aggregator_keeps_ranks_and_averages_heads() -> None:
    g = torch.Generator().manual_seed(7)
    updates = []
    for k, examples in enumerate((1, 3)):
        factors_k = {"q": (torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g))}
        updates.append(ClientUpdate(Adapter(factors_k, {"w": torch.full((2,), float(k))}), examples, k))
    current = Adapter({"q": (torch.zeros(4, 10), torch.zeros(12, 4))})
    agg = make_aggregator("flexlora")
    assert isinstance(agg, FlexLoRA) and AGGREGATORS["flexlora"] is FlexLoRA
    new, _ = agg.aggregate(updates, current)
    A_new, B_new = new.factors["q"]
    assert A_new.shape == (4, 10) and B_new.shape == (12, 4)
    A = [u.adapter.factors["q"][0] for u in updates]
    B = [u.adapter.factors["q"][1] for u in updates]
    expected = best_rank(dense_delta(A, B, torch.tensor([1.0, 3.0], dtype=F64)), 4)
    assert torch.allclose((B_new @ A_new).to(F64), expected, atol=1e-5)
    assert torch.allclose(new.head["w"], torch.full((2,), 0.75))
    narrow, _ = FlexLoRA(rank=2).aggregate(updates, current)
    assert narrow.factors["q"][0].shape == (2, 10)
    with pytest.raises(ValueError, match="rank"):
        FlexLoRA(rank=0)
