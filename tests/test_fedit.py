"""FedIT: weighted averages of A, B and the head, against a plain reference."""

import pytest
import torch

from fairedge.common.aggregation import Adapter, ClientUpdate, FedIT, client_weights, make_aggregator


def _updates(k=3, m=6, n=5, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for i in range(k):
        factors = {"l0": (torch.randn(r, n, generator=g), torch.randn(m, r, generator=g))}
        head = {"w": torch.randn(4, m, generator=g)}
        ups.append(ClientUpdate(Adapter(factors, head), num_examples=10 * (i + 1), node_id=i))
    return ups


def test_fedit_is_the_weighted_mean_of_each_factor_and_head():
    ups = _updates()
    new, metrics = FedIT().aggregate(ups, ups[0].adapter)
    p = [10 / 60, 20 / 60, 30 / 60]
    a_ref = sum(pk * u.adapter.factors["l0"][0] for pk, u in zip(p, ups))
    b_ref = sum(pk * u.adapter.factors["l0"][1] for pk, u in zip(p, ups))
    h_ref = sum(pk * u.adapter.head["w"] for pk, u in zip(p, ups))
    torch.testing.assert_close(new.factors["l0"][0], a_ref)
    torch.testing.assert_close(new.factors["l0"][1], b_ref)
    torch.testing.assert_close(new.head["w"], h_ref)
    assert metrics == {}


def test_fedit_product_differs_from_ideal_update():
    """The aggregation bias LoRA-FAIR corrects: B̄Ā ≠ Σ p_k B_k A_k in general."""
    ups = _updates()
    new, _ = FedIT().aggregate(ups, ups[0].adapter)
    p = client_weights(ups)
    ideal = sum(float(pk) * (u.adapter.factors["l0"][1] @ u.adapter.factors["l0"][0]) for pk, u in zip(p, ups))
    assert (new.factors["l0"][1] @ new.factors["l0"][0] - ideal).abs().max() > 1e-3


def test_identical_clients_give_that_client():
    ups = _updates(k=1)
    same = [ClientUpdate(ups[0].adapter, n) for n in (5, 7, 11)]
    new, _ = FedIT().aggregate(same, ups[0].adapter)
    torch.testing.assert_close(new.factors["l0"][0], ups[0].adapter.factors["l0"][0])


def test_weights_errors_and_registry():
    with pytest.raises(ValueError, match="zero client updates"):
        client_weights([])
    ups = _updates(k=2)
    bad = [ClientUpdate(u.adapter, 0) for u in ups]
    with pytest.raises(ValueError, match="positive sum"):
        client_weights(bad)
    assert isinstance(make_aggregator("fedit"), FedIT)
    with pytest.raises(ValueError, match="unknown aggregation method"):
        make_aggregator("nope")
