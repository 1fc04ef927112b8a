"""Golomb-Rice code for the kept positions of a sparse block, and packed sign bits.

A block is one tensor, or (ComPEFT with one global top-k) a whole adapter's tensors
flattened and concatenated; positions are flat indices into it.

The kept entries of a ComPEFT update sit at near-random positions, so the gaps between
them are close to geometric, and a Rice code of the gaps costs within a few percent of
the entropy bound `H(k)` bits per element at any density `k`. With parameter 0 the code
is a bitmask cut after the last kept entry (gap `g` = `g` zero bits and a one bit), so the
best parameter never costs more than a plain bitmask, 50 % density included.

Bit layout (most significant bit first in every byte, zero padding at the end): the gaps
`g_i = pos_i - pos_{i-1} - 1` (with `pos_{-1} = -1`) split as `g = q * 2**k + r`; first all
remainders `r` (`k` bits each), then all quotients `q` in unary (`q` zero bits, then a one
bit). Two runs instead of interleaved codewords so that both directions are a handful of
vectorised numpy calls.

Pure numpy on int64 flat indices. Decoders raise `ValueError` saying what is wrong and
check every length against the declared sizes before allocating anything.
"""

from __future__ import annotations

import math

import numpy as np

# Largest tensor the decoder accepts: keeps every intermediate sum far below 2**63.
MAX_NUMEL = 2**30


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Gaps between ascending positions: the number of skipped elements before each one."""
    gaps = positions.copy()  # gaps[0] = positions[0] - (-1) - 1
    gaps[1:] -= positions[:-1] + 1
    return gaps


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Exact size in bits of the Rice code of `gaps` with parameter `k`."""
    return int(gaps.size * (k + 1) + np.sum(gaps >> k))


def best_rice_k(gaps: np.ndarray) -> int:
    """The Rice parameter that gives the smallest code.

    For geometric gaps of mean `m` the optimum is near `log2(ln 2 * m)`; we try the
    neighbours of that estimate (always including 0 at high density) and keep the smallest.
    """
    if gaps.size == 0:
        return 0
    mean = float(gaps.sum()) / gaps.size
    guess = max(0, round(math.log2(max(math.log(2) * mean, 1.0))))
    return min(range(max(0, guess - 1), guess + 2), key=lambda k: rice_bits(gaps, k))


def encode(positions: np.ndarray) -> tuple[int, bytes]:
    """Code ascending flat `positions`; return `(rice_k, data)` with the best parameter."""
    gaps = gaps_of(np.asarray(positions, dtype=np.int64))
    k = best_rice_k(gaps)
    return k, rice_encode(gaps, k)


def rice_encode(gaps: np.ndarray, k: int) -> bytes:
    """Rice code of non-negative int64 `gaps` (remainders first, then unary quotients)."""
    n = gaps.size
    q = gaps >> k
    bits = np.zeros(n * k + int(q.sum()) + n, dtype=np.uint8)
    if k:
        bits[: n * k] = _to_bits(gaps & ((1 << k) - 1), k).ravel()
    bits[n * k + np.cumsum(q + 1) - 1] = 1  # the terminating one of each unary quotient
    return np.packbits(bits).tobytes()


def decode(data: bytes, num_kept: int, numel: int, k: int) -> np.ndarray:
    """Ascending int64 positions from `encode`'s data; `ValueError` unless they are valid."""
    n = num_kept
    if not 0 < numel <= MAX_NUMEL:
        raise ValueError(f"{numel} elements is outside 1..{MAX_NUMEL}")
    if not 0 <= n <= numel:
        raise ValueError(f"{n} kept entries for {numel} elements")
    if not 0 <= k <= numel.bit_length():
        raise ValueError(f"rice_k {k} out of range for {numel} elements")
    # The gaps sum to at most numel - n, so the quotients take at most (numel - n) >> k
    # zero bits: anything longer cannot be a valid code.
    shortest = (n * k + n + 7) // 8
    longest = (n * k + ((numel - n) >> k) + n + 7) // 8
    if not shortest <= len(data) <= longest:
        raise ValueError(f"position data is {len(data)} bytes, valid codes of {n} positions take {shortest}..{longest}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    remainders = _from_bits(bits[: n * k].reshape(n, k)) if k else 0
    ends = np.flatnonzero(bits[n * k :])
    if ends.size != n:
        raise ValueError(f"position data holds {ends.size} gap codes, header says {n}")
    if (n * k + int(ends[-1]) + 1 + 7) // 8 != len(data):
        raise ValueError("position data has trailing bytes")
    quotients = gaps_of(ends)
    if int(quotients.max()) > (numel - 1) >> k:  # also keeps the sum below far from overflow
        raise ValueError(f"a gap exceeds the {numel} elements")
    positions = np.cumsum((quotients << k) + remainders + 1) - 1
    if int(positions[-1]) >= numel:
        raise ValueError(f"position {int(positions[-1])} out of range for {numel} elements")
    return positions


def pack_signs(negative: np.ndarray) -> bytes:
    """One bit per kept entry, 1 = negative."""
    return np.packbits(negative.astype(np.uint8)).tobytes()


def unpack_signs(data: bytes, num_kept: int) -> np.ndarray:
    """Boolean `negative` flags; `ValueError` on a wrong length or non-zero padding."""
    if len(data) != (num_kept + 7) // 8:
        raise ValueError(f"sign bits are {len(data)} bytes, {num_kept} entries need {(num_kept + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[num_kept:].any():
        raise ValueError("sign bits have non-zero padding")
    return bits[:num_kept].astype(bool)


def _to_bits(values: np.ndarray, k: int) -> np.ndarray:
    """(n,) non-negative ints below 2**k -> (n, k) bits, most significant first (k <= 32)."""
    width = 8 if k <= 8 else 16 if k <= 16 else 32
    as_bytes = values.astype(f">u{width // 8}").view(np.uint8).reshape(-1, width // 8)
    return np.unpackbits(as_bytes, axis=1)[:, width - k :]


def _from_bits(bits: np.ndarray) -> np.ndarray:
    """(n, k) bits, most significant first -> (n,) int64 (k <= 32)."""
    k = bits.shape[1]
    packed = np.packbits(bits, axis=1)  # (n, ceil(k/8)) bytes, zero-padded at the low end
    if packed.shape[1] == 3:
        packed = np.pad(packed, ((0, 0), (0, 1)))
    width = packed.shape[1]
    return (packed.view(f">u{width}").ravel() >> (8 * width - k)).astype(np.int64)
