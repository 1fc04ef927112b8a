"""How every image becomes model input, in NumPy: training and the edge read images the same way.

Pixels in [0, 1] map to `(p - PIXEL_MEAN) / PIXEL_STD`, i.e. [-1, 1], float32, `(C, H, W)`.
No torch here, so the edge runtime can use it; torch callers convert with `torch.from_numpy`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
"""Every image task maps pixels in [0, 1] to `(p - PIXEL_MEAN) / PIXEL_STD`, i.e. [-1, 1]."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""Image files the loaders and the edge read (through Pillow)."""

_PIL_MODE = {1: "L", 3: "RGB"}


def normalize_pixels(x: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] -> the float32 scale all image tasks share."""
    return ((np.asarray(x, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


def image_pixels(img: Image.Image, height: int, width: int, channels: int) -> np.ndarray:
    """PIL image -> float32 `(C, H, W)` in [0, 1], bilinear resize: how training and the edge read images."""
    if channels not in _PIL_MODE:
        raise ValueError(f"channels = {channels}: image files give 1 (grayscale) or 3 (RGB)")
    img = img.convert(_PIL_MODE[channels]).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.reshape(height, width, channels).transpose(2, 0, 1))
