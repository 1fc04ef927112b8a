"""How an `Adapter` travels in a Flower message: one flat ArrayRecord.

Keys are `lora/<layer>/A`, `lora/<layer>/B` and `head/<name>`, so the receiver
can check names and shapes before using anything.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.aggregation import Adapter


class MalformedAdapter(ValueError):
    """A received adapter has missing, extra, mis-shaped or non-finite arrays."""


def adapter_to_record(adapter: Adapter) -> ArrayRecord:
    """Flatten an Adapter into an ArrayRecord of float32 numpy arrays."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, (a, b) in adapter.factors.items():
        tensors[f"lora/{layer}/A"] = a
        tensors[f"lora/{layer}/B"] = b
    for name, t in adapter.head.items():
        tensors[f"head/{name}"] = t
    return ArrayRecord({k: Array(t.detach().cpu().float().numpy()) for k, v in tensors.items() for t in [v]})


def adapter_from_record(record: ArrayRecord, like: Adapter | None = None) -> Adapter:
    """Rebuild an Adapter; with `like`, require exactly its names and shapes and finite values."""
    arrays = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}
    factors: dict[str, list[torch.Tensor | None]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "lora" and rest.endswith(("/A", "/B")):
            layer, which = rest[:-2], rest[-1]
            factors.setdefault(layer, [None, None])["AB".index(which)] = t
        elif kind == "head" and rest:
            head[rest] = t
        else:
            raise MalformedAdapter(f"unexpected array key {key!r}")
    for layer, pair in factors.items():
        if pair[0] is None or pair[1] is None:
            raise MalformedAdapter(f"layer {layer!r} lacks its {'A' if pair[0] is None else 'B'} factor")
    adapter = Adapter({k: (v[0], v[1]) for k, v in factors.items()}, head)  # type: ignore[misc]
    if like is not None:
        check_like(adapter, like)
    return adapter


def check_like(adapter: Adapter, like: Adapter) -> None:
    """Raise MalformedAdapter unless `adapter` has `like`'s names and shapes, all finite."""
    if set(adapter.factors) != set(like.factors) or set(adapter.head) != set(like.head):
        missing = (set(like.factors) | set(like.head)) - (set(adapter.factors) | set(adapter.head))
        extra = (set(adapter.factors) | set(adapter.head)) - (set(like.factors) | set(like.head))
        raise MalformedAdapter(f"names differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    pairs = [(f"{k}/A", adapter.factors[k][0], like.factors[k][0]) for k in like.factors]
    pairs += [(f"{k}/B", adapter.factors[k][1], like.factors[k][1]) for k in like.factors]
    pairs += [(k, adapter.head[k], like.head[k]) for k in like.head]
    for name, got, want in pairs:
        if got.shape != want.shape:
            raise MalformedAdapter(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise MalformedAdapter(f"{name}: non-finite values")


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's serialised arrays (values plus their small npy headers)."""
    return sum(len(arr.data) for arr in record.values())
