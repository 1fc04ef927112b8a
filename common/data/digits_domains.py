"""Built-in task "digits-domains": sklearn's handwritten digits seen through six visual domains.

It stands in for DomainNet (the LoRA-FAIR paper's feature non-IID benchmark) on a laptop:
same labels, clearly different input statistics per domain, fully offline. A model is
pre-trained on "clean"; the other domains are the shifts federated fine-tuning must learn.

Only 1 797 source images exist, so each domain sample gets its own random transform
parameters (shift, angle, blur width, ...) to make many distinct samples. The split is made
on source images first: test samples of every domain come from source images that no
domain's train split ever sees.

Every sample is shifted by up to ~1 pixel, then corrupted by its domain's transform
(`digit_corruptions`: clean, rotated, inverted, noisy, blurred, thick).
A CNN trained on clean only scores ~0.93 on clean, ~0.3 rotated, ~0 inverted, ~0.6 thick,
~0.7 blurred, ~0.78 noisy; trained on each domain it reaches 0.77..0.94 (noise stays hardest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.data.digit_corruptions import (
    CORRUPTIONS,
    check_domain_args,
    corrupt,
    domain_generator,
    draw_evenly,
)
from fairedge.common.data.task_data import LabeledData, TaskData, normalize_pixels, stratified_split

DIGITS_DOMAINS = CORRUPTIONS


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
        xs = [corrupt(images[ids[d]], name, domain_generator(seed, name, part)) for d, name in enumerate(domains)]
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
    train_ids = [draw_evenly(train_src, n_train, domain_generator(seed, name, "train-ids")) for name in domains]
    test_ids = [draw_evenly(test_src, n_test, domain_generator(seed, name, "test-ids")) for name in domains]
    return train_ids, test_ids


def _load_digits() -> Any:
    """sklearn's 1 797 8x8 digits (values 0..16), read from sklearn's package data (~5 ms).

    Imported lazily: sklearn takes a second to import.
    """
    from sklearn.datasets import load_digits

    return load_digits()


def _check_args(image_size: int, samples_per_domain: int, test_fraction: float, domains: Sequence[str]) -> None:
    check_domain_args(
        "digits",
        DIGITS_DOMAINS,
        domains,
        image_size=image_size,
        samples_per_domain=samples_per_domain,
        test_fraction=test_fraction,
    )
