"""Fixed-point encoding of weighted client updates into the ring `Z / 2^modulus_bits`.

Masks are uniform in the ring, so only integers can be masked. A client sends

    [n_k, clipped_k, round(w_k·loss_k·2^16), q(w_k·(x_k − ref))...]      w_k = n_k / max_weight

with `q(v) = round(clamp(v, ±c) / step)`, `step = 2c / 2^bits`, in two's complement: the ring's
wrap-around adds the clients' signed values exactly as long as the sum of `K` of them stays
within `±2^(modulus_bits−1)` (the config checks `bits + log2 K < modulus_bits`). The sum, decoded
and divided by `Σ w_k = Σ n_k / max_weight`, is the example-weighted mean change of plaintext
FedAvg up to `K·step/2` per entry. Rounding is to nearest (deterministic, so a round's result is
reproducible); Flower's own SecAgg+ rounds stochastically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

HEADER = 3
"""Integers before the values: examples, clamped entries, weighted loss."""
LOSS_SCALE = 1 << 16


@dataclass(frozen=True)
class FixedPoint:
    """The quantiser and the ring: `clip_range` (c), `bits` of levels over `[-c, c]`, `modulus_bits` (32 or 64)."""

    clip_range: float
    bits: int
    modulus_bits: int

    @property
    def step(self) -> float:
        return 2 * self.clip_range / (1 << self.bits)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.modulus_bits == 32 else np.uint64

    def to_ring(self, q: np.ndarray) -> np.ndarray:
        """Signed int64 values as ring elements (two's complement)."""
        return q.astype(np.int64).view(np.uint64).astype(self.dtype)

    def from_ring(self, u: np.ndarray) -> np.ndarray:
        """Ring elements as signed int64 (the inverse of `to_ring` for values within ±2^(modulus_bits−1))."""
        if self.modulus_bits == 64:
            return u.astype(np.uint64).view(np.int64)
        signed = u.astype(np.int64)
        return np.where(signed >= 1 << 31, signed - (1 << 32), signed)

    def encode(self, values: np.ndarray, examples: int, loss: float, weight: float) -> np.ndarray:
        """The client's ring vector for `weight · values` (float64), with its header."""
        scaled = np.asarray(values, dtype=np.float64) * weight
        clamped = int(np.count_nonzero(np.abs(scaled) > self.clip_range))
        q = np.rint(np.clip(scaled, -self.clip_range, self.clip_range) / self.step)
        header = np.array([examples, clamped, round(weight * loss * LOSS_SCALE)], dtype=np.int64)
        return self.to_ring(np.concatenate([header, q.astype(np.int64)]))

    def decode(self, total: np.ndarray) -> tuple[int, int, float, np.ndarray]:
        """Of a summed ring vector: `Σ n_k`, entries clamped, `Σ w_k loss_k`, and `Σ w_k·values` (float64)."""
        signed = self.from_ring(total)
        return int(signed[0]), int(signed[1]), float(signed[2]) / LOSS_SCALE, signed[HEADER:] * self.step


@dataclass(frozen=True)
class Layout:
    """Named tensors in a fixed (sorted) order as one flat vector, and back."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple((k, tuple(tensors[k].shape)) for k in sorted(tensors)))

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.shapes)

    def flat(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        got = {k: tuple(t.shape) for k, t in tensors.items()}
        if got != dict(self.shapes):
            raise ValueError(f"tensors {got} do not fit the layout {dict(self.shapes)}")
        return np.concatenate([tensors[k].detach().double().cpu().numpy().ravel() for k, _ in self.shapes])

    def split(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for k, shape in self.shapes:
            n = int(np.prod(shape))
            out[k] = torch.from_numpy(np.array(vector[at : at + n], dtype=np.float64)).reshape(shape)
            at += n
        return out


def layer_product(tensors: Mapping[str, torch.Tensor], a_key: str, abar: torch.Tensor) -> torch.Tensor:
    """`B (A Āᵀ)` (float64) of the layer whose A is `tensors[a_key]` (`lora/<layer>/A`, B under `.../B`):
    a client's term of LoRA-FAIR's `M = Σ p_k B_k A_k Āᵀ`."""
    b_key = a_key.removesuffix("/A") + "/B"
    abar_t = abar.double().T.contiguous()  # a transposed operand is far slower for small float64 products
    return tensors[b_key].double() @ (tensors[a_key].double() @ abar_t)
