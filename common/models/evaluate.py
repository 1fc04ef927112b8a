"""Accuracy of any fairedge classifier (plain or PEFT-wrapped) on a labelled set."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor | list[str], y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1]; runs in eval mode and restores the previous mode after."""
    if len(y) == 0:
        raise ValueError("cannot evaluate accuracy on an empty set")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(y), batch_size):
            logits = model(**model.prepare(x[i : i + batch_size]))
            correct += int((logits.argmax(dim=-1).cpu() == y[i : i + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / len(y)
