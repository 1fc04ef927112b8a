"""A small ViT image classifier, built from scratch from a `transformers.ViTConfig`.

Using the Hugging Face ViT (rather than a hand-written one) gives us the same module names
PEFT and the ONNX exporter see on real checkpoints, so LoRA targets carry over unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from fairedge.common.models.seeding import seeded


class VisionClassifier(nn.Module):
    """ViT encoder + linear head on the mean of the token states (CLS included)."""

    # Attention query/value projections; transformers 5 names them q_proj/v_proj in ViT.
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __init__(self, config: ViTConfig, num_classes: int) -> None:
        super().__init__()
        # No `self.config`: PEFT treats a module with `config.model_type` as a transformers
        # model and then needs transformers-only attributes (`base_model_prefix`).
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state  # (N, T, H)
        # Mean over tokens trains faster than the CLS token alone on small from-scratch models.
        return self.classifier(hidden.mean(dim=1))

    def prepare(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch -> forward kwargs; the training loop calls `model(**model.prepare(x))`."""
        return {"pixel_values": x}


def build_vision_classifier(
    *,
    image_size: int,
    num_channels: int,
    num_classes: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
    patch_size: int = 4,
    seed: int = 0,
) -> VisionClassifier:
    """A freshly initialised ViT; same arguments and seed give identical weights.

    Defaults suit 16x16 one-channel digits on a CPU: 16 patches of 4x4, ~140k parameters.
    The global RNG state is left untouched.
    """
    config = ViTConfig(
        image_size=image_size,
        num_channels=num_channels,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with seeded(seed):
        model = VisionClassifier(config, num_classes)
    return model.eval()  # like `from_pretrained`: callers switch to train() themselves
