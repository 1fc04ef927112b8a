"""Tensor messages of the edge <-> cloud service: round trips, and malformed ones refused with a clear message."""

import numpy as np
import pytest

from fairedge.common.tensor_proto import TensorError, from_proto, to_proto


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint8"])
def test_round_trip_keeps_values_shape_and_dtype(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = from_proto(to_proto("x", array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_refuses_wrong_byte_count_naming_the_tensor():
    message = to_proto("pixels", np.zeros((2, 3), np.float32))
    message.data = message.data[:-4]
    with pytest.raises(TensorError, match="'pixels'.*20 bytes.*needs 24"):
        from_proto(message)


def test_refuses_unknown_dtype_and_non_finite_values():
    message = to_proto("x", np.zeros(2, np.float32))
    message.dtype = "float64"
    with pytest.raises(TensorError, match="dtype = 'float64'"):
        from_proto(message)
    with pytest.raises(TensorError, match="non-finite"):
        from_proto(to_proto("x", np.array([1.0, np.nan], np.float32)))
    assert np.isnan(from_proto(to_proto("x", np.array([np.nan], np.float32)), finite=False)).all()
    with pytest.raises(TensorError, match="dtype float64"):
        to_proto("x", np.zeros(2))
