"""A text classifier on top of any local BERT-like Hugging Face encoder (e.g. MiniLM)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fairedge.common.models.seeding import seeded


class TextClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head (mean pooling is how MiniLM was trained)."""

    # Attention query/value projections of BERT-like encoders.
    lora_targets: tuple[str, ...] = ("query", "value")

    def __init__(
        self,
        encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        num_classes: int,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)

    def prepare(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> forward kwargs (padded to the longest text, truncated to `max_length`)."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.classifier.weight.device
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
        }


def load_text_classifier(path: str | Path, *, num_classes: int, max_length: int = 64, seed: int = 0) -> TextClassifier:
    """Encoder and tokenizer from a local model directory (never the hub); head from `seed`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model (config.json) at {path}")
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a text model from {path}: {e}") from e
    with seeded(seed):
        model = TextClassifier(encoder, tokenizer, num_classes, max_length=max_length)
    return model.eval()
