"""The edge study's input: test images under corruptions the federation never trained on, one after another.

The paper streams one ImageNet-C corruption after another; here each corruption of `STREAM_CORRUPTIONS`
comes mild then severe (`SEGMENTS`). A seed draws which test images each segment shows, their order
and any corruption noise (`corruption_generator`), so a stream is the same for the same seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.data.task_data import PIXEL_MEAN, PIXEL_STD, LabeledData, normalize_pixels

CORRUPTIONS: dict[str, tuple[float, float]] = {
    # name: (mild, severe) strength; none of these is among the federation's training domains
    # (rotated, inverted, gaussian-noisy, blurred, thick strokes)
    "contrast": (0.35, 0.15),  # keep this fraction of each image's deviation from its own mean
    "brightness": (0.3, 0.5),  # add this to every pixel, not clipped (a sensor offset: a washed-out image)
    "darken": (0.6, 0.35),  # multiply every pixel by this (a dim scene)
    "pixelate": (6, 4),  # average over a coarse grid of this many cells per side, then blow up (16 px images)
    "salt_pepper": (0.10, 0.22),  # fraction of pixels set to black or white
    "occlusion": (6, 9),  # side (px) of a mid-grey square at a random place
}
STREAM_CORRUPTIONS = ("contrast", "brightness", "darken", "pixelate")
"""The stream's corruptions: those that norm parameters can partly undo (`--headroom`: learning them from
the true labels gains 9-27 points on each, 0-2 points on salt_pepper and occlusion, which are left out)."""
SEGMENTS: list[tuple[str, int]] = [(name, sev) for name in STREAM_CORRUPTIONS for sev in (1, 2)]
"""The stream order: each corruption mild (1) then severe (2), corruptions one after another."""
PER_SEGMENT = 384
"""Test images per segment unless a study says otherwise (`--per-segment`)."""
SEEDS = (0, 1, 2)
"""The streams a study runs unless it says otherwise (`--seeds`)."""


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """One independent random stream per (seed, corruption, severity)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"edge-study/{name}/{severity}".encode()))


def corrupt(x01: torch.Tensor, name: str, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Corrupt images `(N, C, H, W)` with pixels on the [0, 1] scale; returns a new tensor, same scale."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {sorted(CORRUPTIONS)}")
    if severity not in (1, 2):
        raise ValueError(f"severity must be 1 (mild) or 2 (severe), got {severity}")
    if x01.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x01.shape)}")
    level = CORRUPTIONS[name][severity - 1]
    n, _, h, w = x01.shape
    if name == "contrast":
        mean = x01.mean(dim=(1, 2, 3), keepdim=True)
        return mean + level * (x01 - mean)
    if name == "brightness":
        return x01 + level
    if name == "darken":
        return x01 * level
    if name == "pixelate":
        coarse = F.adaptive_avg_pool2d(x01, int(level))
        return F.interpolate(coarse, size=(h, w), mode="nearest")
    if name == "salt_pepper":
        hit = torch.rand(x01.shape, generator=gen) < level
        value = (torch.rand(x01.shape, generator=gen) < 0.5).to(x01.dtype)
        return torch.where(hit, value, x01)
    side = int(level)  # occlusion
    top = torch.randint(0, h - side + 1, (n,), generator=gen)
    left = torch.randint(0, w - side + 1, (n,), generator=gen)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + side).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + side).view(n, 1, 1))
    )
    return torch.where(inside.unsqueeze(1), torch.full_like(x01, 0.5), x01)


@dataclass(frozen=True)
class Stream:
    """The study's input stream: normalised images, labels, and which segment each sample is in."""

    x: np.ndarray  # float32 (N, C, H, W) on the task's pixel scale
    y: np.ndarray  # int64 (N,)
    segment: np.ndarray  # int64 (N,), index into `segments`
    domain: np.ndarray  # int64 (N,), the test image's own (training) domain
    segments: list[str]  # "contrast-1", ...

    def __len__(self) -> int:
        return len(self.y)

    def boundaries(self) -> list[int]:
        """Index of the first sample of every segment (and the end)."""
        return [int(np.searchsorted(self.segment, i)) for i in range(len(self.segments))] + [len(self)]


def build_stream(test: LabeledData, *, seed: int, per_segment: int) -> Stream:
    """`per_segment` test images (a seeded draw over all domains) per entry of `SEGMENTS`, in that order."""
    if not isinstance(test.x, torch.Tensor) or test.x.ndim != 4:
        raise ValueError("the edge study needs an image task (test.x of shape (N, C, H, W))")
    if not 1 <= per_segment <= len(test):
        raise ValueError(f"per_segment = {per_segment}: must be in [1, {len(test)}] (test images available)")
    xs, ys, segs, doms = [], [], [], []
    for k, (name, sev) in enumerate(SEGMENTS):
        gen = corruption_generator(seed, name, sev)
        idx = torch.randperm(len(test), generator=gen)[:per_segment]
        x01 = test.x[idx] * PIXEL_STD + PIXEL_MEAN
        xs.append(normalize_pixels(corrupt(x01, name, sev, gen)))
        ys.append(test.y[idx])
        doms.append(test.domain[idx])
        segs.append(torch.full((per_segment,), k, dtype=torch.int64))
    return Stream(
        torch.cat(xs).numpy(),
        torch.cat(ys).numpy(),
        torch.cat(segs).numpy(),
        torch.cat(doms).numpy(),
        [f"{name}-{sev}" for name, sev in SEGMENTS],
    )
