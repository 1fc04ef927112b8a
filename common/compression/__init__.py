"""Compression of adapter updates for the uplink: ComPEFT ternary sparsification + entropy-coded positions.

`compress` turns name -> delta tensors into `fairedge.v1.AdapterUpdate` bytes; `decompress`
turns untrusted bytes back into tensors or raises `PayloadError`. See `codec.py` for the exact
conventions and `golomb.py` for the position code.
"""

from fairedge.common.compression.codec import (
    FORMAT_VERSION,
    Header,
    PayloadError,
    Scope,
    TensorInfo,
    compress,
    decompress,
    kept_count,
    read_header,
)

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "PayloadError",
    "Scope",
    "TensorInfo",
    "compress",
    "decompress",
    "kept_count",
    "read_header",
]
