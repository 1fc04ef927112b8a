"""Adapters in Flower ArrayRecords: round trip and the checks applied to replies."""

import pytest
import torch

from fairedge.common.adapter_record import (
    MalformedAdapter,
    adapter_from_record,
    adapter_to_record,
    record_bytes,
    shapes,
)
from fairedge.common.aggregation import Adapter


def _adapter():
    g = torch.Generator().manual_seed(1)
    return Adapter(
        {
            "enc.0.q": (torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)),
            "enc.0.v": (torch.randn(4, 8, generator=g), torch.zeros(8, 4)),
        },
        {"classifier.weight": torch.randn(3, 8, generator=g), "classifier.bias": torch.zeros(3)},
    )


def test_round_trip_is_exact_and_bytes_counted():
    a = _adapter()
    rec = adapter_to_record(a)
    back = adapter_from_record(rec, like=a)
    for k in a.factors:
        assert torch.equal(back.factors[k][0], a.factors[k][0]) and torch.equal(back.factors[k][1], a.factors[k][1])
    assert torch.equal(back.head["classifier.weight"], a.head["classifier.weight"])
    raw = 4 * (2 * (32 + 32) + 24 + 3)
    assert raw <= record_bytes(rec) <= raw + 200 * len(rec)  # values plus per-array npy framing


def test_wrong_shape_nonfinite_and_missing_names_are_rejected():
    a = _adapter()
    wrong = Adapter(dict(a.factors), dict(a.head))
    wrong.factors["enc.0.q"] = (torch.randn(5, 8), a.factors["enc.0.q"][1])
    with pytest.raises(MalformedAdapter, match=r"enc.0.q/A: shape \(5, 8\), expected \(4, 8\)"):
        adapter_from_record(adapter_to_record(wrong), like=a)
    nan = Adapter(dict(a.factors), {**a.head, "classifier.bias": torch.tensor([0.0, float("nan"), 0.0])})
    with pytest.raises(MalformedAdapter, match="classifier.bias: non-finite"):
        adapter_from_record(adapter_to_record(nan), like=a)
    missing = Adapter({"enc.0.q": a.factors["enc.0.q"]}, dict(a.head))
    with pytest.raises(MalformedAdapter, match="missing"):
        adapter_from_record(adapter_to_record(missing), like=a)


def test_base_delta_travels_down_but_replies_are_checked_on_factors_and_head_only():
    a = _adapter()
    with_base = Adapter(a.factors, a.head, {"enc.0.q": (torch.randn(2, 8), torch.randn(8, 2))})
    back = adapter_from_record(adapter_to_record(with_base), like=a)  # `like` has no base delta: fine
    assert torch.equal(back.base_delta["enc.0.q"][1], with_base.base_delta["enc.0.q"][1])
    assert set(shapes(with_base)) == set(shapes(a)) and not any(k.startswith("base/") for k in shapes(with_base))
    assert set(shapes(a, "A")) == {"lora/enc.0.q/A", "lora/enc.0.v/A", "head/classifier.weight", "head/classifier.bias"}
    lonely = adapter_to_record(with_base)
    del lonely["base/enc.0.q/P"]
    with pytest.raises(MalformedAdapter, match="lacks its P factor"):
        adapter_from_record(lonely)
