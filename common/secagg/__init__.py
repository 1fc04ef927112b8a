"""Secure aggregation (SecAgg+, Bell et al. 2020) shared by server and client: fixed-point
encoding of updates and the masks, keys and secret shares of the protocol.

Built on Flower's SecAgg+ primitives (`flwr.common.secure_aggregation`: Shamir shares over
pycryptodome, ECDH + HKDF shared keys, Fernet encryption) and `cryptography`'s AES-CTR as the
mask generator. The protocol itself runs in `fairedge.server.secagg` and `fairedge.client.secagg`.
"""

from .fixed_point import FixedPoint, Layout, layer_product
from .masking import (
    SECAGG_KEY,
    KeyPair,
    Stage,
    blob,
    blobs,
    combine,
    ints,
    mask_vector,
    open_shares,
    pairwise_mask,
    prg,
    seal_shares,
    shared_key,
    split,
)

__all__ = [
    "SECAGG_KEY",
    "FixedPoint",
    "KeyPair",
    "Layout",
    "Stage",
    "blob",
    "blobs",
    "combine",
    "ints",
    "layer_product",
    "mask_vector",
    "open_shares",
    "pairwise_mask",
    "prg",
    "seal_shares",
    "shared_key",
    "split",
]
