"""Local training and the one evaluation loop, shared by clients, the server, pre-training and baselines.

Every model here exposes `prepare(x_batch) -> dict of tensors` and
`forward(**inputs) -> logits`, so one loop serves images and text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from fairedge.common.data import LabeledData


def resolve_device(device: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """`auto` picks the GPU when one is present."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("federation.device = 'cuda' but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batch(model: nn.Module, data: LabeledData, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Forward kwargs for the samples `idx`: the model's own `prepare` (PEFT forwards it to the wrapped model)."""
    x = [data.x[i] for i in idx.tolist()] if isinstance(data.x, list) else data.x[idx]
    prepare = cast(Callable[[Any], dict[str, torch.Tensor]], model.prepare)
    return {k: v.to(device) for k, v in prepare(x).items()}


def train_local(
    model: nn.Module,
    data: LabeledData,
    *,
    steps: int,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 5e-3,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    weight_decay: float = 0.0,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
) -> float:
    """Train the model's trainable parameters; return the mean training loss.

    Runs `steps` optimizer steps, or `epochs` full passes when `epochs` is set.
    Batches are drawn from a generator seeded with `seed`, so a round is reproducible.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    bs = min(batch_size, n)
    if epochs is not None:
        steps = epochs * math.ceil(n / bs)
    model.to(device).train()
    total, order, pos = 0.0, torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        logits = model(**_batch(model, data, idx, device))
        loss = F.cross_entropy(logits, data.y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    model.eval()
    return total / steps


@torch.no_grad()
def evaluate(
    model: nn.Module, data: LabeledData, *, batch_size: int = 256, device: torch.device = torch.device("cpu")
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over `data`; leaves the model in eval mode on `device`.

    The one evaluation loop: per-domain accuracy, the ClientApp's evaluate and pre-training's
    progress log all call it.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.to(device).eval()
    correct, loss = 0, 0.0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        logits = model(**_batch(model, data, idx, device))
        y = data.y[idx].to(device)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return correct / len(data), loss / len(data)


def evaluate_per_domain(
    model: nn.Module, data: LabeledData, domains: list[str], *, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Accuracy on each domain present in `data`."""
    out = {}
    for d, name in enumerate(domains):
        idx = torch.nonzero(data.domain == d).flatten()
        if len(idx):
            out[name] = evaluate(model, data.subset(idx), device=device)[0]
    return out
