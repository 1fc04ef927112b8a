"""How an `Adapter` travels: one flat name → tensor mapping.

Keys are `lora/<layer>/A`, `lora/<layer>/B` and `head/<name>`, so the receiver
can check names and shapes before using anything. The same keys name the
tensors in a compressed update (`common.compression`) and in a Flower ArrayRecord.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.aggregation import Adapter


class MalformedAdapter(ValueError):
    """A received adapter has missing, extra, mis-shaped or non-finite arrays."""


def flatten(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their wire names."""
    out: dict[str, torch.Tensor] = {}
    for layer, (a, b) in adapter.factors.items():
        out[f"lora/{layer}/A"] = a
        out[f"lora/{layer}/B"] = b
    for name, t in adapter.head.items():
        out[f"head/{name}"] = t
    return out


def unflatten(tensors: Mapping[str, torch.Tensor], like: Adapter | None = None) -> Adapter:
    """Rebuild an Adapter; with `like`, require exactly its names and shapes and finite values."""
    factors: dict[str, list[torch.Tensor | None]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "lora" and rest.endswith(("/A", "/B")):
            factors.setdefault(rest[:-2], [None, None])["AB".index(rest[-1])] = t
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
    got, want = flatten(adapter), flatten(like)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise MalformedAdapter(f"names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in got.items():
        if t.shape != want[name].shape:
            raise MalformedAdapter(f"{name}: shape {tuple(t.shape)}, expected {tuple(want[name].shape)}")
        if not torch.isfinite(t).all():
            raise MalformedAdapter(f"{name}: non-finite values")


def shapes(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """Wire name → shape: what a receiver expects."""
    return {k: tuple(t.shape) for k, t in flatten(adapter).items()}


def adapter_to_record(adapter: Adapter, dtype: Literal["fp32", "fp16"] = "fp32") -> ArrayRecord:
    """An ArrayRecord of the adapter's tensors, as float32 or float16 numpy arrays."""
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    return ArrayRecord({k: Array(t.detach().cpu().numpy().astype(np_dtype)) for k, t in flatten(adapter).items()})


def adapter_from_record(record: ArrayRecord, like: Adapter | None = None) -> Adapter:
    """Rebuild an Adapter (float32) from an ArrayRecord; see `unflatten` for the checks."""
    tensors = {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32, copy=True)) for k, v in record.items()}
    return unflatten(tensors, like)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's serialised arrays (values plus their small npy headers)."""
    return sum(len(arr.data) for arr in record.values())


def fp32_bytes(adapter: Adapter) -> int:
    """What the adapter's tensors cost as raw float32: the baseline for compression ratios."""
    return sum(4 * t.numel() for t in flatten(adapter).values())
