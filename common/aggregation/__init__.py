"""Server-side aggregation rules for LoRA adapters, one per module, selected by name."""

from __future__ import annotations

import inspect

from .base import (
    PERSONAL_B,
    TRAIN_FACTORS,
    Adapter,
    Aggregator,
    BaseDelta,
    ClientConfig,
    ClientUpdate,
    LayerFactors,
    client_weights,
    extend_base_delta,
    reply_factors,
    weighted_mean,
)
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedsa_lora import FedSALoRA
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA, flexlora
from .flora import FLoRA
from .lora_fair import LoraFair, LoraFairResult, frobenius_from_sums, lora_fair, solve_lora_fair
from .rolora import RoLoRA

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (FedIT, LoraFair, FlexLoRA, FFALoRA, FLoRA, FedExLoRA, FedSALoRA, RoLoRA)
}


def make_aggregator(name: str, **options: object) -> Aggregator:
    """The aggregation rule registered under `name`, built from the `options` its constructor takes.

    A run config holds the options of every rule (e.g. LoRA-FAIR's `lam`, the model's
    `lora_scale`), so options another rule takes are passed over; an option no rule
    takes is an error (a typo), and so is a missing or bad value for this rule.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation method {name!r}; allowed: {sorted(AGGREGATORS)}")
    known = {p for cls in AGGREGATORS.values() for p in inspect.signature(cls).parameters}
    if unknown := sorted(set(options) - known):
        raise ValueError(f"no aggregation method takes the option(s) {unknown}; known options: {sorted(known)}")
    cls = AGGREGATORS[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "AGGREGATORS",
    "PERSONAL_B",
    "TRAIN_FACTORS",
    "Adapter",
    "Aggregator",
    "BaseDelta",
    "ClientConfig",
    "ClientUpdate",
    "FFALoRA",
    "FLoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "LayerFactors",
    "LoraFair",
    "LoraFairResult",
    "RoLoRA",
    "client_weights",
    "extend_base_delta",
    "flexlora",
    "frobenius_from_sums",
    "lora_fair",
    "make_aggregator",
    "reply_factors",
    "solve_lora_fair",
    "weighted_mean",
]
