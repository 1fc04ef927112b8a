"""Server-side aggregation rules for LoRA adapters, one per module, selected by name."""

from __future__ import annotations

from .base import Adapter, Aggregator, ClientUpdate, LayerFactors, client_weights, weighted_mean
from .fedit import FedIT
from .flexlora import FlexLoRA, flexlora
from .lora_fair import LoraFair, LoraFairResult, lora_fair, solve_lora_fair

AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (FedIT, LoraFair, FlexLoRA)}


def make_aggregator(name: str, **params: object) -> Aggregator:
    """The aggregation rule registered under `name`, built with `params`."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation method {name!r}; allowed: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](**params)


__all__ = [
    "AGGREGATORS",
    "Adapter",
    "Aggregator",
    "ClientUpdate",
    "FedIT",
    "FlexLoRA",
    "LayerFactors",
    "LoraFair",
    "LoraFairResult",
    "client_weights",
    "flexlora",
    "lora_fair",
    "make_aggregator",
    "solve_lora_fair",
    "weighted_mean",
]
