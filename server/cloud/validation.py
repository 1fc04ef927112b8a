"""Checking requests before they touch any state: each problem is a domain error
(`fairedge.server.cloud.errors`) whose message names the field, the value received and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from fairedge.common.edge_format import InputSpec
from fairedge.common.tensor_proto import TensorError, from_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.server.cloud.errors import BatchTooLarge, InvalidRequest

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EPOCH = re.compile(r"^[A-Za-z0-9_-]{0,64}$")


def check_device_id(device_id: str) -> str:
    """The device id, if it is 1-128 characters of letters, digits, `.`, `_`, `-` (it names a folder)."""
    if not DEVICE_ID.match(device_id):
        raise InvalidRequest(
            f"device_id = {device_id!r}: must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit",
        )
    return device_id


def check_epoch(epoch: str) -> str:
    """The epoch, if it is at most 64 characters of letters, digits, `_`, `-` (empty is an epoch too)."""
    if not EPOCH.match(epoch):
        raise InvalidRequest(f"epoch = {epoch!r}: must be at most 64 characters of A-Z a-z 0-9 _ -")
    return epoch


def decode_batch(
    batch: pb.SampleBatch, specs: Sequence[InputSpec], max_batch_samples: int
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The batch's input arrays (in `specs` order) and entropies.

    InvalidRequest for wrong names, dtypes, shapes, sizes or non-finite values;
    BatchTooLarge for more than `max_batch_samples` samples.
    """
    where = f"batch_id {batch.batch_id}"
    expected = [s.name for s in specs]
    got = [t.name for t in batch.inputs]
    if sorted(got) != sorted(expected):
        dup = sorted({n for n in got if got.count(n) > 1})
        raise InvalidRequest(
            f"{where}: inputs are named {got}, the model expects exactly {expected}"
            + (f" (duplicated: {dup})" if dup else ""),
        )
    tensors = {t.name: t for t in batch.inputs}
    counts = {name: (int(t.shape[0]) if len(t.shape) else None) for name, t in tensors.items()}
    sizes = set(counts.values())
    n = sizes.pop() if sizes else None
    if sizes or n is None:
        raise InvalidRequest(f"{where}: inputs must share a first (sample) dimension, got {counts}")
    if n < 1:
        raise InvalidRequest(f"{where}: inputs[{expected[0]!r}].shape[0] = {n}: a batch needs at least 1 sample")
    if n > max_batch_samples:
        raise BatchTooLarge(
            f"{where}: {n} samples, at most max_batch_samples = {max_batch_samples} per SampleBatch",
        )
    arrays = []
    for spec in specs:
        t = tensors[spec.name]
        field = f"{where}: inputs[{spec.name!r}]"
        if t.dtype != spec.dtype:
            raise InvalidRequest(f"{field}.dtype = {t.dtype!r}, the model expects {spec.dtype!r}")
        if list(t.shape) != [n, *spec.shape]:
            raise InvalidRequest(
                f"{field}.shape = {list(t.shape)}, the model expects "
                f"[N, {', '.join(map(str, spec.shape))}] (N = samples)",
            )
        try:
            array = from_proto(t, finite=True)
        except TensorError as err:
            raise InvalidRequest(f"{where}: inputs: {err}") from None
        if array.dtype.kind in "iu" and array.size and array.min() < 0:
            raise InvalidRequest(
                f"{field} has negative values (min {int(array.min())}); integer inputs (token ids, masks) must be >= 0",
            )
        arrays.append(array)
    entropies = None
    if len(batch.entropies):
        entropies = np.asarray(batch.entropies, dtype=np.float32)
        if len(entropies) != n:
            raise InvalidRequest(f"{where}: entropies has {len(entropies)} values, the batch has {n} samples")
        if not np.isfinite(entropies).all() or (entropies < 0).any():
            raise InvalidRequest(f"{where}: entropies must be finite and >= 0")
    return arrays, entropies
