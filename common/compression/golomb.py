"""Position codes for sparse tensors: Golomb-Rice coded gaps, or a plain bitmask.

The kept entries of a ComPEFT update sit at near-random positions, so the gaps between
them are close to geometric; a Rice code of the gaps costs within a few percent of the
entropy bound `H(k)` bits per element at any density `k`, where a bitmask always costs 1.
Near 50 % density the two meet, so the encoder keeps whichever is smaller.

Bit layout (most significant bit first in every byte, zero padding at the end):
- Rice: the gaps `g_i = pos_i - pos_{i-1} - 1` (with `pos_{-1} = -1`) split as
  `g = q * 2**k + r`; first all remainders `r` (`k` bits each), then all quotients `q`
  in unary (`q` zero bits, then a one bit). Two runs instead of interleaved codewords
  so that both sides are a handful of vectorised numpy calls.
- Bitmask: one bit per element, 1 = kept.

Pure numpy on int64 flat indices. Decoders raise `ValueError` saying what is wrong and
check every length against the declared sizes before allocating anything.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Code = Literal["rice", "bitmask"]

# Largest tensor the decoders accept: keeps every intermediate sum far below 2**63.
MAX_NUMEL = 2**30


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Exact size in bits of the Rice code of `gaps` with parameter `k`."""
    return int(gaps.size * (k + 1) + np.sum(gaps >> k))


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Gaps between ascending positions: the number of skipped elements before each one."""
    return np.diff(positions, prepend=-1) - 1


def best_rice_k(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter that gives the smallest code, and that code's size in bits.

    For geometric gaps of mean `m` the optimum is near `log2(ln 2 * m)`; we try the
    neighbours of that estimate and keep the smallest exact size.
    """
    if gaps.size == 0:
        return 0, 0
    mean = float(gaps.sum()) / gaps.size
    guess = max(0, round(math.log2(max(math.log(2) * mean, 1.0))))
    return min(((k, rice_bits(gaps, k)) for k in range(max(0, guess - 1), guess + 2)),
               key=lambda kb: kb[1])


def encode(positions: np.ndarray, numel: int) -> tuple[Code, int, bytes]:
    """Code ascending flat `positions` in `[0, numel)`; return `(code, rice_k, data)`.

    Picks whichever of Rice or bitmask is smaller (`rice_k` is 0 for the bitmask).
    """
    positions = np.asarray(positions, dtype=np.int64)
    gaps = gaps_of(positions)
    k, bits = best_rice_k(gaps)
    if bits <= numel:
        return "rice", k, rice_encode(gaps, k)
    return "bitmask", 0, bitmask_encode(positions, numel)


def decode(code: Code, data: bytes, num_kept: int, numel: int, rice_k: int) -> np.ndarray:
    """Inverse of `encode`: the ascending int64 positions, or `ValueError`."""
    if code == "rice":
        return rice_decode(data, num_kept, numel, rice_k)
    if code == "bitmask":
        return bitmask_decode(data, num_kept, numel)
    raise ValueError(f"unknown position code {code!r}")


def rice_encode(gaps: np.ndarray, k: int) -> bytes:
    """Rice code of non-negative int64 `gaps` (remainders first, then unary quotients)."""
    n = gaps.size
    q = gaps >> k
    bits = np.zeros(n * k + int(q.sum()) + n, dtype=np.uint8)
    if k:
        bits[: n * k] = _to_bits(gaps & ((1 << k) - 1), k).ravel()
    bits[n * k + np.cumsum(q + 1) - 1] = 1  # the terminating one of each unary quotient
    return np.packbits(bits).tobytes()


def rice_decode(data: bytes, num_kept: int, numel: int, k: int) -> np.ndarray:
    """Positions from a Rice code of their gaps; `ValueError` unless they are a valid set."""
    n = num_kept
    if not 0 < numel <= MAX_NUMEL:
        raise ValueError(f"{numel} elements is outside 1..{MAX_NUMEL}")
    if not 0 <= n <= numel:
        raise ValueError(f"{n} kept entries for {numel} elements")
    if not 0 <= k <= max(1, numel.bit_length()):
        raise ValueError(f"rice_k {k} out of range for {numel} elements")
    # The gaps sum to at most numel - n, so the quotients take at most (numel - n) >> k
    # zero bits: anything longer cannot be a valid code.
    longest = (n * k + ((numel - n) >> k) + n + 7) // 8
    shortest = (n * k + n + 7) // 8
    if not shortest <= len(data) <= longest:
        raise ValueError(f"position data is {len(data)} bytes, "
                         f"valid codes of {n} positions take {shortest}..{longest}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    remainders = _from_bits(bits[: n * k].reshape(n, k)) if k else np.zeros(n, np.int64)
    ends = np.flatnonzero(bits[n * k :])
    if ends.size != n:
        raise ValueError(f"position data holds {ends.size} gap codes, header says {n}")
    if (n * k + int(ends[-1]) + 1 + 7) // 8 != len(data):
        raise ValueError("position data has trailing bytes")
    quotients = np.diff(ends, prepend=-1) - 1
    if int(quotients.max()) > (numel - 1) >> k:  # also keeps the sums below far from overflow
        raise ValueError(f"a gap exceeds the {numel} elements")
    positions = np.cumsum((quotients << k) + remainders + 1) - 1
    if int(positions[-1]) >= numel:
        raise ValueError(f"position {int(positions[-1])} out of range for {numel} elements")
    return positions


def bitmask_encode(positions: np.ndarray, numel: int) -> bytes:
    mask = np.zeros(numel, dtype=np.uint8)
    mask[positions] = 1
    return np.packbits(mask).tobytes()


def bitmask_decode(data: bytes, num_kept: int, numel: int) -> np.ndarray:
    """Positions from a bitmask; `ValueError` unless it has `num_kept` ones and zero padding."""
    if len(data) != (numel + 7) // 8:
        raise ValueError(f"bitmask is {len(data)} bytes, {numel} elements need {(numel + 7) // 8}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[numel:].any():
        raise ValueError("bitmask has non-zero padding bits")
    positions = np.flatnonzero(bits).astype(np.int64)
    if positions.size != num_kept:
        raise ValueError(f"bitmask marks {positions.size} entries, header says {num_kept}")
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
    """(n,) non-negative ints below 2**k -> (n, k) bits, most significant first."""
    width = 8 if k <= 8 else 16 if k <= 16 else 32 if k <= 32 else 64
    as_bytes = values.astype(f">u{width // 8}").view(np.uint8).reshape(-1, width // 8)
    return np.unpackbits(as_bytes, axis=1)[:, width - k :]


def _from_bits(bits: np.ndarray) -> np.ndarray:
    """(n, k) bits, most significant first -> (n,) int64."""
    n, k = bits.shape
    width = 8 if k <= 8 else 16 if k <= 16 else 32 if k <= 32 else 64
    padded = np.zeros((n, width), dtype=np.uint8)
    padded[:, width - k :] = bits
    return np.packbits(padded, axis=1).view(f">u{width // 8}").ravel().astype(np.int64)
