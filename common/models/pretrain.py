"""Pre-train the vision "foundation" model on the source domain, cached on disk.

Federated LoRA needs a frozen base that already knows the task on clean data; clients then
adapt it to their own (shifted) domains. Pre-training is deterministic, so its result is
keyed by a hash of everything that determines it and computed at most once per machine.
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

from fairedge.common.data.task_data import TaskData
from fairedge.common.models.evaluate import evaluate_accuracy
from fairedge.common.models.vision import VisionClassifier, build_vision_classifier

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Part of the cache key; bump it when the training recipe changes so old files are not reused."""


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
    is cached as `cache_dir / "vit-<hash>.pt"`; a second call with the same inputs loads it.
    Defaults reach 0.91-0.92 on the clean test split of the built-in digits-domains task
    (900 train images, 16x16) in ~10 s on one CPU core; label smoothing adds ~1-2 points.
    """
    x, y = _source_split(data)
    arch = {
        "image_size": data.image_size,
        "num_channels": data.num_channels,
        "num_classes": data.num_classes,
        **arch,
    }
    model = build_vision_classifier(seed=seed, **arch)
    key = {
        "version": CACHE_VERSION,
        "arch": arch,
        "train": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "label_smoothing": label_smoothing,
            "seed": seed,
        },
        "data": _fingerprint(x, y),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"vit-{digest}.pt"
    if path.exists():
        log.info("pre-trained ViT loaded from %s", path)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    _train(
        model,
        x,
        y,
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


def _source_split(data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    """The source-domain images and labels of the train split."""
    if data.source_domain not in data.domains:
        raise ValueError(f"source domain {data.source_domain!r} not in {data.domains}")
    mask = data.train.domain == data.domains.index(data.source_domain)
    if not bool(mask.any()):
        raise ValueError(f"no train samples in source domain {data.source_domain!r}")
    return data.train.x[mask], data.train.y[mask]


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and a content hash of the training set (part of the cache key)."""
    h = hashlib.sha256()
    for t in (x, y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"x_shape": list(x.shape), "x_dtype": str(x.dtype), "y_shape": list(y.shape), "sha256": h.hexdigest()}


def _train(
    model: VisionClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    label_smoothing: float,
    seed: int,
) -> None:
    """Full fine-tune; shuffling uses its own generator so results do not depend on global RNG."""
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
            evaluate_accuracy(model, x, y),
            time.perf_counter() - start,
        )
    model.eval()
