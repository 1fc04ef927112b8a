"""Local training and the one evaluation loop, shared by clients, the server, pre-training and baselines.

The data says how a batch is made and scored (`Examples.batch` / `loss_terms`: classification
`LabeledData`, causal-LM `TokenData`), so one loop serves images, text classification and
language modelling; the loss is the mean over what `loss_terms` counts (samples or tokens).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from fairedge.common.config import FederationConfig
from fairedge.common.data.task_data import Examples


def resolve_device(device: Literal["auto", "cpu", "cuda"], field: str = "federation.device") -> torch.device:
    """`auto` picks the GPU when one is present; `field` names the setting in the error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{field} = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def uses_bf16(precision: Literal["auto", "fp32", "bf16"], device: torch.device) -> bool:
    """Whether local training autocasts to bf16: asked for, or `auto` on a CUDA GPU that supports it."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def train_local(
    model: nn.Module,
    data: Examples,
    *,
    steps: int,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 5e-3,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    weight_decay: float = 0.0,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    bf16: bool = False,
) -> float:
    """Train the model's trainable parameters; return the mean training loss.

    Runs `steps` optimizer steps, or `epochs` full passes when `epochs` is set.
    Batches are drawn from a generator seeded with `seed`, so a round is reproducible.
    `bf16` autocasts the forward pass: weights, gradients and optimizer state stay float32 (mixed precision),
    so the adapter a client sends has the same dtype either way.
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, _, count = data.loss_terms(model, data.batch(model, idx, device))
        loss = loss_sum.float() / max(count, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    model.eval()
    return total / steps


def client_round_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The batch-order seed of one client's local training in one round: the same in every process."""
    return run_seed * 100_003 + server_round * 1_009 + partition_id


def train_client_round(
    model: nn.Module,
    data: Examples,
    f: FederationConfig,
    *,
    seed: int,
    device: torch.device = torch.device("cpu"),
) -> float:
    """One client's local training as `federation` configures it (steps or epochs, batch, optimizer); mean loss."""
    return train_local(
        model,
        data,
        steps=f.local_steps,
        epochs=f.local_epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        optimizer=f.optimizer,
        weight_decay=f.weight_decay,
        device=device,
        seed=seed,
        bf16=uses_bf16(f.precision, device),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Examples, *, batch_size: int | None = None, device: torch.device = torch.device("cpu")
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over `data` (per sample, or per scored token for an LM);
    leaves the model in eval mode on `device`.

    The one evaluation loop: per-group metrics, the ClientApp's evaluate and pre-training's
    progress log all call it. `batch_size` defaults to what the data suggests.
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    batch_size = batch_size or data.eval_batch_size
    model.to(device).eval()
    correct, loss, count = 0, 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch_loss, batch_correct, batch_count = data.loss_terms(model, data.batch(model, idx, device))
        loss += batch_loss.item()
        correct += batch_correct
        count += batch_count
    if count == 0:
        raise ValueError("nothing to score: the data has no labels (every LM label is -100)")
    return correct / count, loss / count


def evaluate_groups(
    model: nn.Module, data: Examples, groups: list[str], *, device: torch.device = torch.device("cpu")
) -> dict[str, dict[str, float]]:
    """`{group: {"accuracy", "loss"}}` for each group (domain, or an LM task's client) present in `data`."""
    out = {}
    for d, name in enumerate(groups):
        idx = torch.nonzero(data.domain == d).flatten()
        if len(idx):
            acc, loss = evaluate(model, data.subset(idx), device=device)
            out[name] = {"accuracy": acc, "loss": loss}
    return out


def evaluate_per_domain(
    model: nn.Module, data: Examples, domains: list[str], *, device: torch.device = torch.device("cpu")
) -> dict[str, float]:
    """Accuracy on each domain present in `data`."""
    return {name: m["accuracy"] for name, m in evaluate_groups(model, data, domains, device=device).items()}
