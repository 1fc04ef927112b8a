"""From a RunConfig to data and models: the one place that reads those config sections.

Nothing is memoised here: every call loads what it needs (the pre-trained ViT from its file in
the model cache, a Hugging Face model from its folder), so a process holds no hidden state
between calls. A caller that needs the data and the model together loads the task once and
passes it on (`task=`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from fairedge.common.aggregation import Adapter
from fairedge.common.config import RunConfig
from fairedge.common.data import TaskData, make_digit_shift, make_digits_domains
from fairedge.common.data.lm_task import DEFAULT_PROMPTS, load_lm_task, prompt_input
from fairedge.common.data.partition import client_indices
from fairedge.common.data.task_data import Examples
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
from fairedge.common.models.causal_lm import LORA_TARGET_PRESETS, builtin_model_dir, generate_greedy, load_causal_lm
from fairedge.common.models.dinov2_onnx import builtin_vision_dir
from fairedge.common.models.frozen_cache import transformer_blocks
from fairedge.common.models.hf_vision import HFVisionClassifier, load_hf_vision_classifier


def causal_lm_dir(cfg: RunConfig) -> Path:
    """The causal LM's Hugging Face folder: `model.path`, or the built-in SmolLM2 (converted once into the cache)."""
    return _model_path(cfg) or builtin_model_dir(cfg.model.cache_path())


def vision_model_dir(cfg: RunConfig) -> Path:
    """The image backbone's Hugging Face folder: `model.path`, or the built-in DINOv2 (converted once into the cache)."""
    return _model_path(cfg) or builtin_vision_dir(cfg.model.cache_path())


def _model_path(cfg: RunConfig) -> Path | None:
    if not cfg.model.path:
        return None
    path = Path(cfg.model.path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.path={cfg.model.path!r} is not a folder on this machine")
    return path


def load_task(cfg: RunConfig, *, client: int | None = None) -> TaskData:
    """The run's train/test data (all domains, or an LM task's clients), split with `cfg.seed`.

    `client` (a partition id of `federation.num_clients`): an LM task builds only that client's rows.
    """
    d, seed = cfg.data, cfg.seed
    if d.task in ("shakespeare", "chat"):
        tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir(cfg), local_files_only=True)
        return load_lm_task(
            d,
            tokenizer,
            num_clients=cfg.federation.num_clients,
            seed=seed,
            cache_dir=cfg.model.cache_path(),
            only=client,
        )
    if d.task in ("digits-domains", "digit-shift"):
        make = make_digits_domains if d.task == "digits-domains" else make_digit_shift
        chosen = {"domains": d.domains} if d.domains else {}
        return make(
            image_size=d.image_size,
            samples_per_domain=d.samples_per_domain,
            test_fraction=d.test_fraction,
            seed=seed,
            **chosen,
        )
    assert d.path is not None  # guaranteed by DataConfig
    if d.task == "image-folder":
        return load_image_folder(
            d.path, image_size=d.image_size, channels=d.channels, test_fraction=d.test_fraction, seed=seed
        )
    if d.task == "hf-dataset":
        return load_hf_image_dataset(
            d.path, image_size=d.image_size, channels=d.channels, test_fraction=d.test_fraction, seed=seed
        )
    return load_text_table(d.path, test_fraction=d.test_fraction, seed=seed)


def client_partition(
    cfg: RunConfig, partition_id: int, num_partitions: int | None = None, *, task: TaskData | None = None
) -> Examples:
    """The training data of one simulated client (of `num_partitions`, default the configured clients).

    `task` is `load_task(cfg)`, loaded here unless given.
    """
    num_partitions = num_partitions or cfg.federation.num_clients
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    task = task or load_task(cfg, client=partition_id if num_partitions == cfg.federation.num_clients else None)
    train = task.train
    if task.kind == "causal-lm" and num_partitions == len(task.domains):  # a client per domain: all its rows
        return train.subset(torch.nonzero(train.domain == partition_id).flatten())  # (also when only it is loaded)
    part = client_indices(  # this client's share only: its cost does not grow with num_partitions
        train,
        num_partitions,
        partition_id,
        mode=cfg.data.partition,
        dirichlet_alpha=cfg.data.dirichlet_alpha,
        seed=cfg.seed,
    )
    return train.subset(part)


def server_test_split(cfg: RunConfig, task: TaskData) -> Examples:
    """The test data the server scores each round: all of it, or `federation.eval_clients` of a causal-LM
    task's clients (drawn once with the run's seed), a cost independent of the run's client count."""
    k = cfg.federation.eval_clients
    if k is None:
        return task.test
    if task.kind != "causal-lm":
        raise ValueError(f"federation.eval_clients={k} applies to causal-LM tasks only (data.task={cfg.data.task!r})")
    if k >= len(task.domains):
        return task.test
    chosen = torch.from_numpy(np.random.default_rng([cfg.seed, k]).choice(len(task.domains), size=k, replace=False))
    return task.test.subset(torch.nonzero(torch.isin(task.test.domain, chosen)).flatten())


def base_model(cfg: RunConfig, *, task: TaskData | None = None) -> nn.Module:
    """A fresh foundation model: the built-in ViT (pre-trained once on the task, then read from
    `model.cache_path()`), a pre-trained Hugging Face image backbone (`hf-vision`) or text encoder (`hf-text`)
    with a head drawn from `cfg.seed`, or a causal LM.

    `task` is `load_task(cfg)`, loaded here unless given (the built-in ViT is pre-trained on it; the head's
    size is its number of classes).
    """
    m, seed = cfg.model, cfg.seed
    if m.kind == "hf-causal-lm":
        return load_causal_lm(causal_lm_dir(cfg))[0]
    task = task or load_task(cfg)
    if m.kind == "hf-text":
        assert m.path is not None  # guaranteed by ModelConfig
        return load_text_classifier(m.path, num_classes=task.num_classes, max_length=m.max_length, seed=seed)
    if m.kind == "hf-vision":  # pre-trained: not trained on the task here
        return load_hf_vision_classifier(
            vision_model_dir(cfg), num_classes=task.num_classes, image_size=m.image_size, seed=seed
        )
    return pretrained_vision_classifier(
        task,
        cache_dir=m.cache_path(),
        epochs=m.pretrain_epochs,
        lr=m.pretrain_lr,
        seed=seed,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        patch_size=m.patch_size,
    )


def lora_model(cfg: RunConfig, *, task: TaskData | None = None) -> PeftModel:
    """The foundation model wrapped with PEFT LoRA; initial factors drawn from `cfg.seed`."""
    lora = cfg.lora
    base = base_model(cfg, task=task)
    if cfg.model.kind == "hf-causal-lm":
        layers = None
        if lora.top_layers is not None:
            total = int(cast(Any, base).config.num_hidden_layers)
            layers = list(range(max(0, total - lora.top_layers), total))
        targets = lora.target_modules or list(LORA_TARGET_PRESETS["attention"])
        return add_lora(
            base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets,
            head_modules=(), layers=layers, task_type="CAUSAL_LM", seed=cfg.seed,
        )  # fmt: skip
    default_targets: tuple[str, ...] = getattr(base, "lora_targets", ())  # the model's attention query/value
    targets = list(lora.target_modules or default_targets)
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
    if lora.top_layers is None:
        return add_lora(
            base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets, seed=cfg.seed
        )
    return _top_layers_vision(cfg, base, targets)


def _top_layers_vision(cfg: RunConfig, base: nn.Module, targets: list[str]) -> PeftModel:
    """hf-vision with `lora.top_layers`: LoRA on the top N blocks, and `prepare` handing them the cached hidden
    states entering block `total - N` (`HFVisionClassifier.use_frozen_cache`, up to `model.frozen_cache_mb`)."""
    lora, top = cfg.lora, cast(int, cfg.lora.top_layers)
    classifier = cast(HFVisionClassifier, base)
    name, blocks = transformer_blocks(classifier.backbone)
    if top >= len(blocks):
        raise ValueError(
            f"lora.top_layers={top}: the backbone has {len(blocks)} blocks; use at most {len(blocks) - 1} "
            "(or unset it to adapt every block)"
        )
    start = len(blocks) - top
    model = add_lora(
        base, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets,
        layers=list(range(start, len(blocks))), layers_pattern=name.rsplit(".", 1)[-1], seed=cfg.seed,
    )  # fmt: skip
    if not get_lora_factors(model):
        raise ValueError(f"lora.target_modules={targets} match no layer of the top {top} blocks")
    classifier.use_frozen_cache(start, cfg.model.frozen_cache_mb * 2**20)
    return model


def get_adapter(model: PeftModel) -> Adapter:
    """The model's trainable state as an aggregation `Adapter`."""
    return Adapter(get_lora_factors(model), get_head_state(model))


def set_adapter(model: PeftModel, adapter: Adapter, base_weights: Mapping[str, torch.Tensor] | None = None) -> None:
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


def greedy_replies(cfg: RunConfig, model: nn.Module) -> dict[str, str]:
    """`{prompt: the model's greedy reply}` for `data.prompts`, else the task's fixed prompts."""
    prompts = cfg.data.prompts or DEFAULT_PROMPTS[cfg.data.task]
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir(cfg), local_files_only=True)
    return {
        p: generate_greedy(model, tokenizer, prompt_input(cfg.data.task, p), max_new_tokens=cfg.data.reply_tokens)
        for p in prompts
    }
