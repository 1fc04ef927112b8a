"""From a RunConfig to data and models: the one place that reads those config sections.

Loading is memoised per process (keyed by the relevant config), because a Flower
simulation calls the ClientApp many times in the same worker process.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fairedge.common.aggregation import Adapter
from fairedge.common.config import DataConfig, LoraSettings, ModelConfig, RunConfig
from fairedge.common.data import LabeledData, TaskData, make_digits_domains, partition_clients
from fairedge.common.data.user_data import load_hf_image_dataset, load_image_folder, load_text_table
from fairedge.common.lora import (
    add_lora,
    get_head_state,
    get_lora_factors,
    set_base_weights,
    set_head_state,
    set_lora_factors,
)
from fairedge.common.models import load_text_classifier, pretrained_vision_classifier


@functools.lru_cache(maxsize=4)
def _load_task(data_json: str, seed: int) -> TaskData:
    cfg = DataConfig.model_validate_json(data_json)
    if cfg.task == "digits-domains":
        return make_digits_domains(
            image_size=cfg.image_size,
            samples_per_domain=cfg.samples_per_domain,
            test_fraction=cfg.test_fraction,
            seed=seed,
        )
    assert cfg.path is not None  # guaranteed by DataConfig
    if cfg.task == "image-folder":
        return load_image_folder(
            cfg.path, image_size=cfg.image_size, channels=cfg.channels, test_fraction=cfg.test_fraction, seed=seed
        )
    if cfg.task == "hf-dataset":
        return load_hf_image_dataset(
            cfg.path, image_size=cfg.image_size, channels=cfg.channels, test_fraction=cfg.test_fraction, seed=seed
        )
    return load_text_table(cfg.path, test_fraction=cfg.test_fraction, seed=seed)


def load_task(cfg: RunConfig) -> TaskData:
    """The run's train/test data (all domains)."""
    return _load_task(cfg.data.model_dump_json(), cfg.seed)


def client_partition(cfg: RunConfig, partition_id: int, num_partitions: int | None = None) -> LabeledData:
    """The training data of one simulated client (of `num_partitions`, default the configured clients)."""
    num_partitions = num_partitions or cfg.federation.num_clients
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    train = load_task(cfg).train
    parts = partition_clients(
        train,
        num_partitions,
        mode=cfg.data.partition,
        dirichlet_alpha=cfg.data.dirichlet_alpha,
        seed=cfg.seed,
    )
    return train.subset(parts[partition_id])


@functools.lru_cache(maxsize=2)
def _base_model(model_json: str, data_json: str, seed: int) -> nn.Module:
    m = ModelConfig.model_validate_json(model_json)
    data = _load_task(data_json, seed)
    if m.kind == "hf-text":
        assert m.path is not None
        return load_text_classifier(m.path, num_classes=data.num_classes, max_length=m.max_length, seed=seed)
    return pretrained_vision_classifier(
        data,
        cache_dir=Path(m.cache_dir),
        epochs=m.pretrain_epochs,
        lr=m.pretrain_lr,
        seed=seed,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        patch_size=m.patch_size,
    )


def base_model(cfg: RunConfig) -> nn.Module:
    """A fresh copy of the foundation model (pre-trained once, then cached)."""
    return copy.deepcopy(_base_model(cfg.model.model_dump_json(), cfg.data.model_dump_json(), cfg.seed))


def lora_model(cfg: RunConfig) -> nn.Module:
    """The foundation model wrapped with PEFT LoRA; initial factors seeded by `cfg.seed`."""
    lora: LoraSettings = cfg.lora
    base = base_model(cfg)
    targets = list(lora.target_modules or base.lora_targets)
    linears = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in base.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith("classifier")
        }
    )
    if not set(targets) & set(linears):
        raise ValueError(
            f"lora.target_modules={targets} match no layer of model.kind={cfg.model.kind!r}; "
            f"its linear layers are named {linears}"
        )
    torch.manual_seed(cfg.seed)
    return add_lora(base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets)


def get_adapter(model: nn.Module) -> Adapter:
    """The model's trainable state as an aggregation `Adapter`."""
    return Adapter(get_lora_factors(model), get_head_state(model))


def set_adapter(model: nn.Module, adapter: Adapter, base_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load an `Adapter` into a LoRA model, in place.

    `base_weights` are the pristine `W0` of the LoRA layers (`fairedge.common.lora.get_base_weights`
    of the model as built). With them every such layer's base weight becomes
    `W0 + P @ Q` from `adapter.base_delta`, or `W0` where it has no entry, so a
    model can be reused across rounds. An adapter with a base delta needs them.
    """
    set_lora_factors(model, adapter.factors)
    set_head_state(model, adapter.head)
    if base_weights is None:
        if adapter.base_delta:
            raise ValueError("the adapter changes base weights: pass the pristine base_weights")
        return
    unknown = sorted(set(adapter.base_delta) - set(base_weights))
    if unknown:
        raise KeyError(f"base delta for layers without base weights: {unknown[:3]}")
    set_base_weights(
        model,
        {
            name: w0 + adapter.base_delta[name][1] @ adapter.base_delta[name][0] if name in adapter.base_delta else w0
            for name, w0 in base_weights.items()
        },
    )


def config_json(cfg: RunConfig) -> str:
    """The config as compact JSON: what travels to clients in each message."""
    return json.dumps(cfg.model_dump(mode="json"), separators=(",", ":"))
