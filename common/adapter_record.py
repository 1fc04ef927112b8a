"""How an `Adapter` travels: one flat name → tensor mapping.

Keys are `lora/<layer>/A`, `lora/<layer>/B`, `head/<name>` and, for a change of
the base weights, `base/<layer>/Q`, `base/<layer>/P`, so the receiver can check
names and shapes before using anything. The same keys name the tensors in a
compressed update (`fairedge.common.compression`) and in a Flower ArrayRecord.

Downlink (server → client) carries everything. A reply (client → server) carries
the head and the LoRA factors the client was asked to send (`reply_factors` of
the round config: all of them unless some are frozen or personal), never a base
delta; reply checks and compressed-update layouts cover exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fairedge.common.aggregation import Adapter


class MalformedAdapter(ValueError):
    """A received adapter has missing, extra, mis-shaped or non-finite arrays."""


def reply_tensors(adapter: Adapter, factors: str = "AB") -> dict[str, torch.Tensor]:
    """The tensors a reply carries: per layer the factors named in `factors` ("AB", "A", "B"), then the head."""
    out: dict[str, torch.Tensor] = {}
    for layer, (a, b) in adapter.factors.items():
        if "A" in factors:
            out[f"lora/{layer}/A"] = a
        if "B" in factors:
            out[f"lora/{layer}/B"] = b
    for name, t in adapter.head.items():
        out[f"head/{name}"] = t
    return out


def flatten(adapter: Adapter) -> dict[str, torch.Tensor]:
    """All of the adapter's tensors under their wire names: factors, head, then the base delta."""
    out = reply_tensors(adapter)
    for layer, (q, p) in adapter.base_delta.items():
        out[f"base/{layer}/Q"] = q
        out[f"base/{layer}/P"] = p
    return out


def unflatten(tensors: Mapping[str, torch.Tensor], like: Adapter | None = None) -> Adapter:
    """Rebuild an Adapter; with `like`, require exactly its factor and head names and shapes, finite."""
    factors: dict[str, list[torch.Tensor | None]] = {}
    base: dict[str, list[torch.Tensor | None]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "lora" and rest.endswith(("/A", "/B")):
            factors.setdefault(rest[:-2], [None, None])["AB".index(rest[-1])] = t
        elif kind == "base" and rest.endswith(("/Q", "/P")):
            base.setdefault(rest[:-2], [None, None])["QP".index(rest[-1])] = t
        elif kind == "head" and rest:
            head[rest] = t
        else:
            raise MalformedAdapter(f"unexpected array key {key!r}")
    for layer, pair in factors.items():
        if pair[0] is None or pair[1] is None:
            raise MalformedAdapter(f"layer {layer!r} lacks its {'A' if pair[0] is None else 'B'} factor")
    for layer, pair in base.items():
        if pair[0] is None or pair[1] is None:
            raise MalformedAdapter(f"base delta of {layer!r} lacks its {'Q' if pair[0] is None else 'P'} factor")
    adapter = Adapter(
        {k: (v[0], v[1]) for k, v in factors.items()},  # type: ignore[misc]
        head,
        {k: (v[0], v[1]) for k, v in base.items()},  # type: ignore[misc]
    )
    if like is not None:
        check_like(adapter, like)
    return adapter


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise MalformedAdapter unless `tensors` has exactly `expected`'s names and shapes, all finite."""
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise MalformedAdapter(f"names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise MalformedAdapter(f"{name}: shape {tuple(t.shape)}, expected {tuple(expected[name])}")
        if not torch.isfinite(t).all():
            raise MalformedAdapter(f"{name}: non-finite values")


def check_like(adapter: Adapter, like: Adapter) -> None:
    """Raise MalformedAdapter unless `adapter`'s factors and head have `like`'s names and shapes, all finite."""
    check_tensors(reply_tensors(adapter), shapes(like))


def shapes(adapter: Adapter, factors: str = "AB") -> dict[str, tuple[int, ...]]:
    """Wire name → shape of what a reply carries (`reply_tensors`): what a receiver expects."""
    return {k: tuple(t.shape) for k, t in reply_tensors(adapter, factors).items()}


def tensors_to_record(tensors: Mapping[str, torch.Tensor], dtype: Literal["fp32", "fp16"] = "fp32") -> ArrayRecord:
    """An ArrayRecord of named tensors, as float32 or float16 numpy arrays."""
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    return ArrayRecord({k: Array(t.detach().cpu().numpy().astype(np_dtype)) for k, t in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord's arrays as float32 tensors, in record order."""
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32, copy=True)) for k, v in record.items()}


def adapter_to_record(adapter: Adapter, dtype: Literal["fp32", "fp16"] = "fp32") -> ArrayRecord:
    """An ArrayRecord of all the adapter's tensors (`flatten`)."""
    return tensors_to_record(flatten(adapter), dtype)


def adapter_from_record(record: ArrayRecord, like: Adapter | None = None) -> Adapter:
    """Rebuild an Adapter (float32) from an ArrayRecord; see `unflatten` for the checks."""
    return unflatten(record_tensors(record), like)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's serialised arrays (values plus their small npy headers)."""
    return sum(len(arr.data) for arr in record.values())


def fp32_bytes(adapter: Adapter, factors: str = "AB") -> int:
    """What a reply with these factors (`reply_tensors`) costs as raw float32: the baseline for compression ratios."""
    return sum(4 * t.numel() for t in reply_tensors(adapter, factors).values())
