"""Which samples a device uploads: CEMA's entropy window with dynamic exclusion and a redundancy filter.

CEMA (Chen et al., ICLR 2024) uploads a sample only if the entropy `E` of the edge prediction lies in
`E_min < E < E_max(t)`: very confident samples teach the cloud nothing, very uncertain ones are
unreliable. `E_max` starts at `e_max · ln C` and, once a warm-up of samples has fixed a reference
mean entropy, follows the running mean: `E_max(t) = e_max · ln C · coeff · mean(t) / mean(warm-up)`
(the rule of the paper's public code). We cap it at its starting value, so as the model adapts and
its mean entropy falls the window only narrows. The optional redundancy filter (also from the paper's
code) keeps a sample only if its softmax is not close, by cosine, to an exponential moving average of
the softmax of the samples kept before.

Pure NumPy: a selector sees logits, keeps a little state, and is tested on synthetic numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fairedge.common.config import EdgeConfig


def softmax_entropy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and their entropies in nats (N,), computed stably from logits."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return p, np.maximum(-(p * log_p).sum(axis=1), 0.0)  # rounding can give -1e-16 for a one-hot softmax


@dataclass
class Selection:
    """What a selector decided for one batch."""

    mask: np.ndarray  # bool (N,): upload this sample
    entropy: np.ndarray  # float (N,), nats
    e_max: float  # the upper threshold used, nats


@dataclass
class SelectionStats:
    """Counts over the whole stream, so a run can report why samples were not uploaded."""

    seen: int = 0
    selected: int = 0
    below_e_min: int = 0
    above_e_max: int = 0
    redundant: int = 0
    e_max_history: list[float] = field(default_factory=list)  # the threshold at each batch, nats


class CemaSelector:
    """CEMA's selection rule (see the module docstring); `select` is called once per batch, in stream order."""

    def __init__(
        self,
        num_classes: int,
        *,
        e_min: float = 0.02,
        e_max: float = 0.4,
        dynamic_exclusion: bool = True,
        warmup_samples: int = 256,
        e_max_coeff: float = 1.0,
        redundancy_filter: bool = False,
        redundancy_margin: float = 0.5,
        redundancy_momentum: float = 0.9,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes = {num_classes}: need at least 2 classes for an entropy")
        if not 0 <= e_min < e_max <= 1:
            raise ValueError(f"need 0 <= e_min < e_max <= 1 (fractions of ln C), got e_min={e_min}, e_max={e_max}")
        self.num_classes = num_classes
        self.e_min = e_min * math.log(num_classes)
        self.e_max_start = e_max * math.log(num_classes)
        self.dynamic_exclusion = dynamic_exclusion
        self.warmup_samples = warmup_samples
        self.e_max_coeff = e_max_coeff
        self.redundancy_filter = redundancy_filter
        self.redundancy_margin = redundancy_margin
        self.redundancy_momentum = redundancy_momentum
        self.stats = SelectionStats()
        self._entropy_sum = 0.0
        self._reference_mean: float | None = None  # mean entropy once the warm-up is over
        self._mean_kept_probs: np.ndarray | None = None

    @classmethod
    def from_config(cls, cfg: EdgeConfig, num_classes: int) -> CemaSelector:
        return cls(
            num_classes,
            e_min=cfg.e_min,
            e_max=cfg.e_max,
            dynamic_exclusion=cfg.dynamic_exclusion,
            warmup_samples=cfg.warmup_samples,
            e_max_coeff=cfg.e_max_coeff,
            redundancy_filter=cfg.redundancy_filter,
            redundancy_margin=cfg.redundancy_margin,
        )

    @property
    def mean_entropy(self) -> float:
        """Mean entropy of every sample seen so far (nats)."""
        return self._entropy_sum / self.stats.seen if self.stats.seen else 0.0

    @property
    def e_max_now(self) -> float:
        """The current upper threshold in nats."""
        if not self.dynamic_exclusion or self._reference_mean is None or self._reference_mean <= 0:
            return self.e_max_start
        ratio = self.mean_entropy / self._reference_mean
        return min(self.e_max_start, self.e_max_start * self.e_max_coeff * ratio)

    def select(self, logits: np.ndarray) -> Selection:
        probs, ent = softmax_entropy(logits)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"logits have {probs.shape[1]} classes, the selector was built for {self.num_classes}")
        # Like the paper's code: the batch enters the running mean before its own threshold is set.
        self.stats.seen += len(ent)
        self._entropy_sum += float(ent[np.isfinite(ent)].sum())
        if self._reference_mean is None and self.stats.seen >= self.warmup_samples:
            self._reference_mean = self.mean_entropy
        e_max = self.e_max_now
        low = ent <= self.e_min
        high = ~(ent < e_max)  # NaN (a broken input) counts as unreliable
        mask = ~low & ~high
        redundant = np.zeros_like(mask)
        if self.redundancy_filter and mask.any():
            redundant = self._redundant(probs, mask)
            mask &= ~redundant
        self.stats.selected += int(mask.sum())
        self.stats.below_e_min += int(low.sum())
        self.stats.above_e_max += int((high & ~low).sum())
        self.stats.redundant += int(redundant.sum())
        self.stats.e_max_history.append(e_max)
        return Selection(mask=mask, entropy=ent.astype(np.float32), e_max=e_max)

    def _redundant(self, probs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Candidates whose softmax has cosine >= margin with the running mean of kept softmaxes."""
        redundant = np.zeros_like(candidates)
        if self._mean_kept_probs is None:  # nothing kept yet: nothing is redundant
            kept = candidates
        else:
            ref = self._mean_kept_probs
            cos = probs @ ref / (np.linalg.norm(probs, axis=1) * np.linalg.norm(ref) + 1e-12)
            redundant = candidates & (cos >= self.redundancy_margin)
            kept = candidates & ~redundant
        if kept.any():
            batch_mean = probs[kept].mean(axis=0)
            m = self.redundancy_momentum
            old = self._mean_kept_probs
            self._mean_kept_probs = batch_mean if old is None else m * old + (1 - m) * batch_mean
        return redundant


class FixedSelector:
    """Upload every sample (the study's upper baseline) or none (no adaptation); same interface as CemaSelector."""

    def __init__(self, num_classes: int, *, upload: bool) -> None:
        self.num_classes = num_classes
        self.upload = upload
        self.stats = SelectionStats()

    def select(self, logits: np.ndarray) -> Selection:
        _, ent = softmax_entropy(logits)
        mask = np.full(len(ent), self.upload) & np.isfinite(ent)  # the cloud refuses non-finite samples
        self.stats.seen += len(ent)
        self.stats.selected += int(mask.sum())
        return Selection(mask=mask, entropy=ent.astype(np.float32), e_max=math.inf if self.upload else 0.0)


def make_selector(cfg: EdgeConfig, num_classes: int) -> CemaSelector | FixedSelector:
    """The selector `edge.select` names: "cema", "all" or "none"."""
    if cfg.select == "cema":
        return CemaSelector.from_config(cfg, num_classes)
    return FixedSelector(num_classes, upload=cfg.select == "all")
