"""Checking requests before they touch any state: each problem becomes a gRPC status and a clear message.

Messages name the field, the value received and what is allowed, so a device developer
can fix the call from the error alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc
import numpy as np

from fairedge.common.edge_model import InputSpec
from fairedge.common.tensor_proto import TensorError, from_proto
from fairedge.common.wire import edge_service_pb2 as pb

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RequestError(Exception):
    """A request the service refuses: the gRPC status code and the message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_device_id(device_id: str) -> str:
    """The device id, if it is 1-128 characters of letters, digits, `.`, `_`, `-` (it names a folder)."""
    if not DEVICE_ID.match(device_id):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"device_id = {device_id!r}: must be 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit",
        )
    return device_id


def decode_batch(
    batch: pb.SampleBatch, specs: Sequence[InputSpec], max_batch_samples: int
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The batch's input arrays (in `specs` order) and entropies, or `RequestError`.

    INVALID_ARGUMENT for wrong names, dtypes, shapes, sizes or non-finite values;
    RESOURCE_EXHAUSTED for more than `max_batch_samples` samples.
    """
    where = f"batch_id {batch.batch_id}"
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expected = [s.name for s in specs]
    got = [t.name for t in batch.inputs]
    if sorted(got) != sorted(expected):
        dup = sorted({n for n in got if got.count(n) > 1})
        raise RequestError(
            invalid,
            f"{where}: inputs are named {got}, the model expects exactly {expected}"
            + (f" (duplicated: {dup})" if dup else ""),
        )
    tensors = {t.name: t for t in batch.inputs}
    counts = {name: (int(t.shape[0]) if len(t.shape) else None) for name, t in tensors.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise RequestError(invalid, f"{where}: inputs must share a first (sample) dimension, got {counts}")
    n = next(iter(counts.values()))
    if n < 1:
        raise RequestError(invalid, f"{where}: inputs[{expected[0]!r}].shape[0] = {n}: a batch needs at least 1 sample")
    if n > max_batch_samples:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{where}: {n} samples, at most max_batch_samples = {max_batch_samples} per SampleBatch",
        )
    arrays = []
    for spec in specs:
        t = tensors[spec.name]
        field = f"{where}: inputs[{spec.name!r}]"
        if t.dtype != spec.dtype:
            raise RequestError(invalid, f"{field}.dtype = {t.dtype!r}, the model expects {spec.dtype!r}")
        if list(t.shape) != [n, *spec.shape]:
            raise RequestError(
                invalid,
                f"{field}.shape = {list(t.shape)}, the model expects "
                f"[N, {', '.join(map(str, spec.shape))}] (N = samples)",
            )
        try:
            array = from_proto(t, finite=True)
        except TensorError as err:
            raise RequestError(invalid, f"{where}: inputs: {err}") from None
        if array.dtype.kind in "iu" and array.size and array.min() < 0:
            raise RequestError(
                invalid,
                f"{field} has negative values (min {int(array.min())}); integer inputs (token ids, masks) must be >= 0",
            )
        arrays.append(array)
    entropies = None
    if len(batch.entropies):
        entropies = np.asarray(batch.entropies, dtype=np.float32)
        if len(entropies) != n:
            raise RequestError(invalid, f"{where}: entropies has {len(entropies)} values, the batch has {n} samples")
        if not np.isfinite(entropies).all() or (entropies < 0).any():
            raise RequestError(invalid, f"{where}: entropies must be finite and >= 0")
    return arrays, entropies
