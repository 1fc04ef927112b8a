"""NumPy arrays <-> `fairedge.v1.Tensor` messages (proto/edge_service.proto), checked on the way in.

Both ends of the edge <-> cloud service use these, so a malformed tensor is refused with
the same message wherever it is read.
"""

from __future__ import annotations

import numpy as np

from fairedge.common.wire import edge_service_pb2 as pb

DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ("float32", "float16", "int64", "int32", "uint8")}
"""The dtypes a Tensor may carry, little-endian."""


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array (bad dtype, shape, size, or values)."""


def to_proto(name: str, array: np.ndarray) -> pb.Tensor:
    """A Tensor message holding `array` (row-major, little-endian)."""
    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise TensorError(f"tensor {name!r}: dtype {array.dtype.name} is not one of {sorted(DTYPES)}")
    data = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name]).tobytes()
    return pb.Tensor(name=name, shape=list(array.shape), dtype=array.dtype.name, data=data)


def from_proto(tensor: pb.Tensor, *, finite: bool = True) -> np.ndarray:
    """The array a Tensor message holds; `TensorError` naming the tensor and the field if it is malformed.

    With `finite`, floating-point values must all be finite.
    """
    name = tensor.name or "<unnamed>"
    if tensor.dtype not in DTYPES:
        raise TensorError(f"tensor {name!r}: dtype = {tensor.dtype!r}, allowed: {sorted(DTYPES)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor {name!r}: shape = {list(shape)} has a negative dimension")
    dtype = DTYPES[tensor.dtype]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor {name!r}: data has {len(tensor.data)} bytes, shape {list(shape)} of {tensor.dtype} needs {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise TensorError(f"tensor {name!r}: has non-finite values (NaN or Inf)")
    return array
