"""A tiny DINOv2 folder for tests that need a real transformers image backbone but not its weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model


def save_tiny_dinov2(folder: Path, layers: int) -> Path:
    """A tiny randomly initialised DINOv2 (hidden 32, patch 7, seed 0) saved as a Hugging Face folder."""
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, patch_size=7,
        image_size=28,
    )  # fmt: skip
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    torch.random.set_rng_state(state)
    return folder
