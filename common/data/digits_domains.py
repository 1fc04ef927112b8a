"""Built-in task "digits-domains": sklearn's handwritten digits seen through six visual domains.

It stands in for DomainNet (the LoRA-FAIR paper's feature non-IID benchmark) on a laptop:
same labels, clearly different input statistics per domain, fully offline. A model is
pre-trained on "clean"; the other domains are the shifts federated fine-tuning must learn.

Only 1 797 source images exist, so each domain sample gets its own random transform
parameters (shift, angle, blur width, ...) to make many distinct samples. The split is made
on source images first: test samples of every domain come from source images that no
domain's train split ever sees.

Every sample is shifted by up to ~1 pixel; on top of that (constants below):
  clean     nothing else                  rotated   rotation by ±(30..60)°
  inverted  1 - x (white background)      noisy     gaussian noise, std 0.3..0.45
  blurred   gaussian blur, sigma 1.2..2   thick     strokes dilated by a 3x3 or 5x5 max
A CNN trained on clean only scores ~0.93 on clean, ~0.3 rotated, ~0 inverted, ~0.6 thick,
~0.7 blurred, ~0.78 noisy; trained on each domain it reaches 0.77..0.94 (noise stays hardest).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.data.task_data import LabeledData, TaskData, normalize_pixels, stratified_split

DIGITS_DOMAINS = ("clean", "rotated", "inverted", "noisy", "blurred", "thick")

MAX_SHIFT = 0.15  # of the half-width (affine_grid units), ~1 pixel at 16x16
ROTATION_DEG = (30.0, 60.0)  # |angle| range of "rotated"; the sign is random too
NOISE_STD = (0.3, 0.45)  # gaussian noise std on [0, 1] pixels
BLUR_SIGMA = (1.2, 2.0)  # in pixels at image_size 16, scaled with the size


def make_digits_domains(
    *,
    image_size: int = 16,
    samples_per_domain: int = 1200,
    test_fraction: float = 0.25,
    domains: Sequence[str] = DIGITS_DOMAINS,
    seed: int = 0,
) -> TaskData:
    """Build the task; same arguments give bit-identical tensors.

    Each domain holds `samples_per_domain` samples, `test_fraction` of them in test.
    Domain ids index `domains` in the given order; `source_domain` is always "clean".
    """
    _check_args(image_size, samples_per_domain, test_fraction, domains)
    digits = _load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).to(torch.int64)

    train_ids, test_ids = _source_ids(digits.target, samples_per_domain, test_fraction, domains, seed)
    splits = []
    for part, ids in (("train", train_ids), ("test", test_ids)):
        xs = [_transform(images[ids[d]], name, _generator(seed, name, part)) for d, name in enumerate(domains)]
        domain = torch.cat([torch.full((len(i),), d, dtype=torch.int64) for d, i in enumerate(ids)])
        splits.append(LabeledData(x=normalize_pixels(torch.cat(xs)), y=labels[torch.cat(ids)], domain=domain))
    return TaskData(
        train=splits[0],
        test=splits[1],
        classes=[str(c) for c in digits.target_names],
        domains=list(domains),
        source_domain="clean",
        kind="image",
    )


def digits_domains_source_ids(
    *,
    samples_per_domain: int = 1200,
    test_fraction: float = 0.25,
    domains: Sequence[str] = DIGITS_DOMAINS,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Source image ids (rows of `load_digits()`) behind each domain's train and test samples.

    Returns `(train_ids, test_ids)`, one int64 tensor per domain, in the order the samples
    appear in `make_digits_domains(...)` with the same arguments.
    """
    _check_args(16, samples_per_domain, test_fraction, domains)
    return _source_ids(_load_digits().target, samples_per_domain, test_fraction, domains, seed)


def _source_ids(
    target: np.ndarray, samples_per_domain: int, test_fraction: float, domains: Sequence[str], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    train_src, test_src = stratified_split(target, test_fraction, seed)
    n_test = round(samples_per_domain * test_fraction)
    n_train = samples_per_domain - n_test
    train_ids = [_draw(train_src, n_train, _generator(seed, name, "train-ids")) for name in domains]
    test_ids = [_draw(test_src, n_test, _generator(seed, name, "test-ids")) for name in domains]
    return train_ids, test_ids


def _load_digits() -> Any:
    """sklearn's 1 797 8x8 digits (values 0..16), read from sklearn's package data (~5 ms).

    Imported lazily: sklearn takes a second to import.
    """
    from sklearn.datasets import load_digits

    return load_digits()


def _check_args(image_size: int, samples_per_domain: int, test_fraction: float, domains: Sequence[str]) -> None:
    unknown = [d for d in domains if d not in DIGITS_DOMAINS]
    if unknown:
        raise ValueError(f"unknown digits domain(s) {unknown}; allowed: {list(DIGITS_DOMAINS)}")
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains must be a non-empty list without repeats, got {list(domains)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the source images are 8x8), got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if samples_per_domain < 20:
        raise ValueError(f"samples_per_domain must be >= 20, got {samples_per_domain}")


def _generator(seed: int, domain: str, purpose: str) -> torch.Generator:
    """One independent stream per (seed, domain, purpose): a domain does not depend on the others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{domain}/{purpose}".encode()))


def _draw(pool: np.ndarray, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` ids from `pool`, cycling through fresh permutations so every source is used evenly."""
    pool_t = torch.from_numpy(pool).to(torch.int64)
    rounds = math.ceil(n / len(pool_t))
    order = torch.cat([torch.randperm(len(pool_t), generator=gen) for _ in range(rounds)])[:n]
    return pool_t[order]


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _transform(x: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    """Apply `domain`'s per-sample random transform to (N, 1, H, W) pixels in [0, 1]."""
    n, size = x.shape[0], x.shape[-1]
    angle = torch.zeros(n)
    if domain == "rotated":
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        angle = sign * _uniform(n, *ROTATION_DEG, gen) * math.pi / 180
    shift = _uniform(2 * n, -MAX_SHIFT, MAX_SHIFT, gen).view(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if domain == "inverted":
        x = 1.0 - x
    elif domain == "noisy":
        x = x + _uniform(n, *NOISE_STD, gen).view(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    elif domain == "blurred":
        x = _gaussian_blur(x, _uniform(n, *BLUR_SIGMA, gen) * size / 16)
    elif domain == "thick":
        # Dilation by a 3x3 or 5x5 max (at 16x16; wider on larger images), chosen per sample.
        k = 2 * max(1, round(size / 16)) + 1
        small = F.max_pool2d(x, k, stride=1, padding=k // 2)
        large = F.max_pool2d(x, k + 2, stride=1, padding=k // 2 + 1)
        pick_large = torch.rand(n, generator=gen).view(n, 1, 1, 1) < 0.5
        x = torch.where(pick_large, large, small)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma: one grouped conv with a kernel per sample."""
    n, _, h, w = x.shape
    radius = math.ceil(3 * float(sigma.max()))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    g = g / g.sum(dim=1, keepdim=True)  # (N, K)
    kernel = g.view(n, 1, -1, 1) * g.view(n, 1, 1, -1)  # (N, 1, K, K)
    out = F.conv2d(x.view(1, n, h, w), kernel, padding=radius, groups=n)
    return out.view(n, 1, h, w)
