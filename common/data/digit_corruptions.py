"""Per-sample random corruptions of grey digit images, shared by the digits-domains and digit-shift tasks.

Every corruption first shifts the image by up to `MAX_SHIFT` of its half-width (~1 pixel at
16x16); then (constants below):
  clean     nothing else                  rotated   rotation by ±(30..60)°
  inverted  1 - x (white background)      noisy     gaussian noise, std 0.3..0.45
  blurred   gaussian blur, sigma 1.2..2   thick     strokes dilated by a 3x3 or 5x5 max
Shift, blur width and dilation are given for 16x16 digits-domains images and scale with the
image size, or with `stroke_scale` (the digit's size relative to those).

Each sample draws its own parameters from a seeded generator, so a few source images make
many distinct samples and the same generator gives bit-identical output.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CORRUPTIONS = ("clean", "rotated", "inverted", "noisy", "blurred", "thick")

MAX_SHIFT = 0.15  # of the half-width (affine_grid units), ~1 pixel at 16x16
ROTATION_DEG = (30.0, 60.0)  # |angle| range of "rotated"; the sign is random too
NOISE_STD = (0.3, 0.45)  # gaussian noise std on [0, 1] pixels
BLUR_SIGMA = (1.2, 2.0)  # in pixels at image_size 16, scaled with the size


def domain_generator(seed: int, domain: str, purpose: str) -> torch.Generator:
    """One independent stream per (seed, domain, purpose): a domain does not depend on the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{domain}/{purpose}".encode()))


def draw_evenly(pool: np.ndarray, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` ids from `pool`, cycling through fresh permutations so every source is used evenly."""
    pool_t = torch.from_numpy(pool).to(torch.int64)
    rounds = math.ceil(n / len(pool_t))
    order = torch.cat([torch.randperm(len(pool_t), generator=gen) for _ in range(rounds)])[:n]
    return pool_t[order]


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """`n` draws from U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=gen)


def corrupt(
    x: torch.Tensor, corruption: str, gen: torch.Generator, *, stroke_scale: float | None = None
) -> torch.Tensor:
    """Apply `corruption`'s per-sample random transform to (N, 1, H, W) pixels in [0, 1].

    `stroke_scale` multiplies the shift (in pixels), blur width and dilation, which are set for the
    digits of digits-domains' 16x16 images; unset = image size / 16 (MNIST at 28x28 is at 1).
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; allowed: {list(CORRUPTIONS)}")
    n, size = x.shape[0], x.shape[-1]
    scale = size / 16 if stroke_scale is None else stroke_scale
    max_shift = MAX_SHIFT if stroke_scale is None else MAX_SHIFT * stroke_scale * 16 / size
    angle = torch.zeros(n)
    if corruption == "rotated":
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        angle = sign * uniform(n, *ROTATION_DEG, gen) * math.pi / 180
    shift = uniform(2 * n, -max_shift, max_shift, gen).view(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if corruption == "inverted":
        x = 1.0 - x
    elif corruption == "noisy":
        x = x + uniform(n, *NOISE_STD, gen).view(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    elif corruption == "blurred":
        x = gaussian_blur(x, uniform(n, *BLUR_SIGMA, gen) * scale)
    elif corruption == "thick":
        # Dilation by a 3x3 or 5x5 max (at 16x16; wider on larger images), chosen per sample.
        k = 2 * max(1, round(scale)) + 1
        small = F.max_pool2d(x, k, stride=1, padding=k // 2)
        large = F.max_pool2d(x, k + 2, stride=1, padding=k // 2 + 1)
        pick_large = torch.rand(n, generator=gen).view(n, 1, 1, 1) < 0.5
        x = torch.where(pick_large, large, small)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each (N, 1, H, W) image with its own sigma: one grouped conv with a kernel per sample."""
    n, _, h, w = x.shape
    radius = math.ceil(3 * float(sigma.max()))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    g = g / g.sum(dim=1, keepdim=True)  # (N, K)
    kernel = g.view(n, 1, -1, 1) * g.view(n, 1, 1, -1)  # (N, 1, K, K)
    out = F.conv2d(x.view(1, n, h, w), kernel, padding=radius, groups=n)
    return out.view(n, 1, h, w)


def check_domain_args(
    task: str,
    allowed: Sequence[str],
    domains: Sequence[str],
    *,
    image_size: int,
    samples_per_domain: int,
    test_fraction: float,
) -> None:
    """The argument checks both digit tasks share; errors name the argument and what is allowed."""
    unknown = [d for d in domains if d not in allowed]
    if unknown:
        raise ValueError(f"unknown {task} domain(s) {unknown}; allowed: {list(allowed)}")
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be a non-empty list without repeats, got {list(domains)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if samples_per_domain < 20:
        raise ValueError(f"samples_per_domain must be >= 20, got {samples_per_domain}")
