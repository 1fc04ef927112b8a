"""SecAgg+ masks, keys and secret shares (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"; the same protocol as Flower's `SecAggPlusWorkflow`).

Client `u` of a round has, per phase `p` (LoRA-FAIR's two-phase round has two), a key pair `(sk1, pk1)`
for pairwise masks and a self-mask seed `b`, plus one pair `(sk2, pk2)` that encrypts the shares it
sends its neighbours. It sends

    y_u = x_u + PRG(b_u) + Σ_{v neighbour, v < u} PRG(s_uv) − Σ_{v neighbour, v > u} PRG(s_uv)   (mod 2^bits)

with `s_uv = ECDH(sk1_u, pk1_v)`. The pairwise masks cancel in `Σ y_u`; the server removes each
survivor's `PRG(b_u)` from `t` Shamir shares of `b_u`, and a dropped client's pairwise masks from `t`
shares of its `sk1` (never both for one client and phase: that would reveal its `x_u`).

Primitives come from Flower (`flwr.common.secure_aggregation`: Shamir over pycryptodome, ECDH on
SECP384R1 + HKDF, Fernet) and `cryptography`. The PRG is AES-256 in counter mode keyed by SHA-256
of the seed, with the phase as nonce; Flower's `pseudo_rand_gen` instead folds the seed into 32 bits
for NumPy's Mersenne Twister, few enough seeds to search.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

SECAGG_KEY = "fairedge-secagg"
"""Name of the ConfigRecord that carries the protocol's fields in both directions."""


class Stage:
    """The protocol's messages, in order; `MASKED` and `UNMASK` repeat once per phase."""

    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    MASKED = "masked"
    UNMASK = "unmask"


@dataclass(frozen=True)
class KeyPair:
    """An EC key pair as bytes (PEM private key, public key)."""

    private: bytes
    public: bytes

    @classmethod
    def new(cls) -> KeyPair:
        sk, pk = generate_key_pairs()
        return cls(private_key_to_bytes(sk), public_key_to_bytes(pk))


def shared_key(private: bytes, public: bytes) -> bytes:
    """The ECDH + HKDF key two parties derive from one's private and the other's public key."""
    return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))


def prg(seed: bytes, phase: int, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """`length` pseudo-random ring elements from `seed` for `phase`: AES-256-CTR's keystream."""
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(phase.to_bytes(16, "big"))).encryptor()
    return np.frombuffer(stream.update(bytes(length * np.dtype(dtype).itemsize)), dtype=dtype)


def pairwise_mask(own: int, other: int, key: bytes, phase: int, length: int, dtype: type) -> np.ndarray:
    """What `own` adds for its pair with `other` (`other` adds the negation): `+PRG` if own > other."""
    mask = prg(key, phase, length, dtype)
    return mask if own > other else (-mask).astype(dtype)


def mask_vector(vector: np.ndarray, own: int, seed: bytes, pair_keys: dict[int, bytes], phase: int) -> np.ndarray:
    """`vector + PRG(seed) ± PRG(s_uv)` over the pairs, in the vector's ring (unsigned wrap-around)."""
    out = vector + prg(seed, phase, len(vector), vector.dtype.type)
    for other, key in pair_keys.items():
        out += pairwise_mask(own, other, key, phase, len(vector), vector.dtype.type)
    return out


def split(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` Shamir shares of `secret`, any `threshold` of which rebuild it."""
    return create_shares(secret, threshold, num)


def combine(shares: list[bytes]) -> bytes:
    """The secret from `threshold` or more of its shares."""
    return combine_shares(shares)


def _pack(parts: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _unpack(data: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        parts.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return parts


def seal_shares(key: bytes, src: int, dst: int, shares: list[bytes]) -> bytes:
    """Encrypt the shares `src` gives `dst` (per phase: seed share, sk1 share), bound to both ids."""
    return encrypt(key, _pack([src.to_bytes(8, "big"), dst.to_bytes(8, "big"), *shares]))


def open_shares(key: bytes, ciphertext: bytes, src: int, dst: int) -> list[bytes]:
    """Decrypt `seal_shares`' output; ValueError if it was not made by `src` for `dst`."""
    parts = _unpack(decrypt(key, ciphertext))
    if int.from_bytes(parts[0], "big") != src or int.from_bytes(parts[1], "big") != dst:
        raise ValueError(f"node {dst}: shares said to come from {src} were sealed for another pair")
    return parts[2:]


def ints(record: Mapping[str, object], key: str) -> list[int]:
    """A protocol field that is a list of ints."""
    return [int(v) for v in cast(list[int], record[key])]


def blobs(record: Mapping[str, object], key: str) -> list[bytes]:
    """A protocol field that is a list of bytes."""
    return [bytes(v) for v in cast(list[bytes], record[key])]


def blob(record: Mapping[str, object], key: str) -> bytes:
    """A protocol field that is bytes."""
    return bytes(cast(bytes, record[key]))
