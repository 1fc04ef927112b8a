"""The containers every task produces and every trainer consumes.

A task is a train and a test split of labelled inputs; each sample also carries the id of
the domain it comes from, because feature non-IID partitioning and per-domain evaluation
both need it. Images are already normalised float tensors, so a model never needs to know
where they came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairedge.common import pixels
from fairedge.common.pixels import PIXEL_MEAN, PIXEL_STD

__all__ = ["PIXEL_MEAN", "PIXEL_STD", "LabeledData", "TaskData", "normalize_pixels", "stratified_split"]

Indices = Sequence[int] | np.ndarray | torch.Tensor


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """`fairedge.common.pixels.normalize_pixels` for a CPU tensor (the edge uses the NumPy one)."""
    return torch.from_numpy(pixels.normalize_pixels(x.detach().cpu().numpy()))


@dataclass(frozen=True)
class LabeledData:
    """Inputs, labels and domain ids of one split."""

    x: torch.Tensor | list[str]  # images float32 (N, C, H, W), normalised; or texts
    y: torch.Tensor  # int64 (N,)
    domain: torch.Tensor  # int64 (N,), index into TaskData.domains

    def __post_init__(self) -> None:
        if not (len(self.x) == len(self.y) == len(self.domain)):
            raise ValueError(
                f"x, y and domain must have the same length, got {len(self.x)}, {len(self.y)} and {len(self.domain)}"
            )

    eval_batch_size = 256
    """samples per evaluation forward pass."""

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The samples at `idx` as model inputs (the model's own `prepare`) plus `labels`, on `device`."""
        x = [self.x[i] for i in idx.tolist()] if isinstance(self.x, list) else self.x[idx]
        prepare = cast(Callable[[Any], dict[str, torch.Tensor]], model.prepare)  # PEFT forwards it to the model
        inputs = {k: v.to(device) for k, v in prepare(x).items()}
        return {**inputs, "labels": self.y[idx].to(device)}

    @staticmethod
    def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        """(summed cross-entropy, correct predictions, samples) of a batch."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, y = model(**inputs), batch["labels"]
        return F.cross_entropy(logits, y, reduction="sum"), int((logits.argmax(-1) == y).sum().item()), len(y)

    def subset(self, idx: Indices) -> LabeledData:
        """The samples at `idx` (in that order), for tensor images and text lists alike."""
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        if isinstance(self.x, torch.Tensor):
            x: torch.Tensor | list[str] = self.x[index]
        else:
            x = [self.x[i] for i in index.tolist()]
        return LabeledData(x=x, y=self.y[index], domain=self.domain[index])


class Examples(Protocol):
    """One split of any task, as the training and evaluation loops see it (LabeledData, TokenData)."""

    @property
    def domain(self) -> torch.Tensor: ...
    @property
    def eval_batch_size(self) -> int: ...

    def __len__(self) -> int: ...
    def subset(self, idx: Indices) -> Examples: ...
    def batch(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]: ...
    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]: ...


@dataclass(frozen=True)
class TaskData:
    """A task: train/test splits plus the names behind label and domain ids.

    Classification (`kind` image or text): `LabeledData` splits, `classes` its labels, `domains` the
    visual or textual domains. Causal LM (`kind` causal-lm): `TokenData` splits, no classes, and one
    domain per client (its own text), `source_domain` empty.
    """

    train: Any  # LabeledData, or TokenData for causal-lm (both `Examples`)
    test: Any
    classes: list[str]
    domains: list[str]
    source_domain: str  # the domain a foundation model is pre-trained on
    kind: Literal["image", "text", "causal-lm"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_channels(self) -> int:
        return self._images().shape[1]

    @property
    def image_size(self) -> int:
        return self._images().shape[2]

    def _images(self) -> torch.Tensor:
        if self.kind != "image" or not isinstance(self.train.x, torch.Tensor):
            raise ValueError(f"a {self.kind} task has no image shape")
        return self.train.x


def stratified_split(
    labels: np.ndarray | torch.Tensor, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split that keeps each class's share in both splits.

    Each class puts `round(n * test_fraction)` samples in test, but at least one in each
    split when it has two or more, so tiny user datasets still test every class.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
