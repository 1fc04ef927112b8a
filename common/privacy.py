"""The Gaussian mechanism on client updates: clip to an L2 bound, add seeded or fresh noise.

Both sides use it: the server for central DP (clip every decoded update, noise the sum), a client
for local DP (clip and noise its own update before it is compressed and sent). An update is a
name → tensor mapping (the change from the adapter the client was sent, over the tensors it
sends); its norm is the L2 norm over all of them together, as in DP-FedAvg (FlatClip of McMahan
et al. 2018). This is Flower's `clip_inputs_inplace` / `add_gaussian_noise_inplace` on torch
tensors with an explicit generator: Flower's draw from NumPy's global RNG, which a study cannot
seed per round and a test cannot pin.

The noise must be secret: `noise_generator(None, ...)` seeds from the OS (`secrets`); a fixed
`privacy.noise_seed` is for reproducible studies and tests only (whoever knows it can remove the noise).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch

Update = dict[str, torch.Tensor]

LOCAL_NOISE_KEY = "dp-noise-multiplier"
"""Round-config key: the noise multiplier a client applies under local DP."""
LOCAL_CLIP_KEY = "dp-clip-norm"
"""Round-config key: the clip norm a client applies under local DP."""


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors of an update together (float64)."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Update, float, bool]:
    """`update · min(1, clip_norm / ‖update‖)`, its norm before clipping, and whether it was scaled down."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale if scale < 1 else t.clone() for k, t in update.items()}, norm, scale < 1


def noise_generator(seed: int | None, *stream: int) -> torch.Generator:
    """A CPU generator: from `seed` and the stream ids (round, client, ...) if a seed is set, else from the OS."""
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(secrets.randbits(63))
    else:
        mixed = seed
        for s in stream:
            mixed = (mixed * 1_000_003 + s + 1) % (1 << 63)
        gen.manual_seed(mixed)
    return gen


def add_noise(update: Mapping[str, torch.Tensor], std: float, gen: torch.Generator) -> Update:
    """Each tensor plus i.i.d. `N(0, std²)` per entry (drawn in float64, returned in the tensor's dtype)."""
    if std < 0:
        raise ValueError(f"noise std must be non-negative, got {std!r}")
    out = {}
    for k, t in update.items():
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64) * std
        out[k] = (t.double() + noise).to(t.dtype)
    return out


def privatize_local(
    update: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float, gen: torch.Generator
) -> tuple[Update, bool]:
    """Local DP: the update clipped to `clip_norm` plus `N(0, (noise_multiplier·clip_norm)²)`; and whether it clipped."""
    clipped, _, was_clipped = clip_update(update, clip_norm)
    return add_noise(clipped, noise_multiplier * clip_norm, gen), was_clipped
