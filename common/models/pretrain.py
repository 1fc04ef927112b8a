"""Pre-train the vision "foundation" model on the source domain, cached on disk.

Federated LoRA needs a frozen base that already knows the task on clean data; clients then
adapt it to their own (shifted) domains. Pre-training is deterministic, so its result is
keyed by a hash of everything that determines it and computed at most once per cache folder;
every later load, in any process, reads that file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fairedge.common.data.task_data import LabeledData, TaskData
from fairedge.common.models.vision import VisionClassifier, build_vision_classifier
from fairedge.common.training import evaluate

log = logging.getLogger(__name__)

CACHE_VERSION = 3
"""Part of the cache key; bump it when the training recipe or the model code changes so old files are not reused."""


def pretrained_vision_classifier(
    data: TaskData,
    *,
    cache_dir: Path,
    epochs: int = 20,
    lr: float = 2e-3,
    batch_size: int = 16,
    weight_decay: float = 0.01,
    label_smoothing: float = 0.1,
    seed: int = 0,
    **arch: Any,
) -> VisionClassifier:
    """A ViT fully fine-tuned (AdamW, one-cycle LR) on `data.source_domain` of `data.train`.

    `arch` goes to `build_vision_classifier` (hidden_size, num_layers, ...). The state dict
    is cached as `cache_dir / "vit-<key>.pt"` (see `cache_key`); a later call with the same
    inputs, in any process, loads it. Defaults reach 0.91-0.92 on the clean test split of the
    built-in digits-domains task (900 train images, 16x16) in ~10 s on one CPU core; label
    smoothing adds ~1-2 points.
    """
    source = _source_split(data)
    model = build_vision_classifier(
        image_size=data.image_size, num_channels=data.num_channels, num_classes=data.num_classes, seed=seed, **arch
    )
    recipe = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "seed": seed,
    }
    path = Path(cache_dir) / f"vit-{cache_key(model, recipe, source)}.pt"
    if path.exists():
        log.info("pre-trained ViT loaded from %s", path)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    _train(
        model,
        source,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        seed=seed,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: concurrent callers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("pre-trained ViT cached at %s", path)
    return model.eval()


def cache_key(model: VisionClassifier, recipe: dict[str, Any], source: LabeledData) -> str:
    """16 hex digits of a hash over everything the pre-trained weights depend on.

    That is the format version, the whole ViT configuration (every architecture field, including
    the transformers defaults behind the ones we set) and the head size, the training recipe
    (epochs, lr, batch size, weight decay, label smoothing, seed: the seed also draws the initial
    weights) and the source-domain training data itself (shape, dtype and a content hash, so every
    data setting that changes those samples changes the key). Library versions are left out: a
    cached base stays the one that earlier runs' adapters were trained on.
    """
    config = model.vit.config.to_dict()
    config.pop("transformers_version", None)
    key = {
        "version": CACHE_VERSION,
        "arch": {"vit": config, "num_classes": model.classifier.out_features},
        "train": recipe,
        "data": _fingerprint(source),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_split(data: TaskData) -> LabeledData:
    """The source-domain images and labels of the train split."""
    if data.kind != "image" or not isinstance(data.train.x, torch.Tensor):
        raise ValueError(f"the built-in ViT pre-trains on images; this task is of kind {data.kind!r}")
    if data.source_domain not in data.domains:
        raise ValueError(f"source domain {data.source_domain!r} not in {data.domains}")
    mask = data.train.domain == data.domains.index(data.source_domain)
    if not bool(mask.any()):
        raise ValueError(f"no train samples in source domain {data.source_domain!r}")
    return data.train.subset(torch.nonzero(mask).flatten())


def _fingerprint(source: LabeledData) -> dict[str, Any]:
    """Shape, dtype and a content hash of the training set (part of the cache key)."""
    assert isinstance(source.x, torch.Tensor)  # checked by _source_split
    h = hashlib.sha256()
    for t in (source.x, source.y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {
        "x_shape": list(source.x.shape),
        "x_dtype": str(source.x.dtype),
        "y_shape": list(source.y.shape),
        "sha256": h.hexdigest(),
    }


def _train(
    model: VisionClassifier,
    source: LabeledData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
) -> None:
    """Full fine-tune; shuffling uses its own generator so results do not depend on global RNG."""
    x, y = source.x, source.y
    assert isinstance(x, torch.Tensor)  # checked by _source_split
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(pixel_values=x[idx]), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info(
            "pre-train epoch %d/%d  loss %.4f  train acc %.3f  %.1fs",
            epoch + 1,
            epochs,
            total / len(y),
            evaluate(model, source)[0],
            time.perf_counter() - start,
        )
    model.eval()
