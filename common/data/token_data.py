"""Causal-LM examples as one split of a task: fixed-length token rows, each owned by a client.

The classification container (`LabeledData`) holds inputs, labels and a domain id per sample;
this one holds token ids, attention masks and next-token labels (-100 where the loss must not
look), and the id of the client whose text a row is (`domain`, so feature partitioning and
per-group evaluation work unchanged: a client's own text is its domain). Both containers give
the training and evaluation loops the same three things: `batch`, `loss_terms` and
`eval_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairedge.common.data.lm_batches import IGNORE_INDEX, LMExamples
from fairedge.common.data.task_data import Indices


@dataclass(frozen=True)
class TokenData:
    """N rows of `seq_len` tokens (int64 tensors (N, seq_len)) and the client id of each row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    domain: torch.Tensor  # int64 (N,), index into TaskData.domains (the clients)

    eval_batch_size = 8
    """rows per evaluation forward pass: logits are (rows, seq_len, vocabulary), large for an LM."""

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if not (len(self.attention_mask) == len(self.labels) == len(self.domain) == n):
            raise ValueError("input_ids, attention_mask, labels and domain must have the same number of rows")

    @classmethod
    def of(cls, examples: LMExamples, domain: int) -> TokenData:
        """One client's examples."""
        n = len(examples)
        return cls(examples.input_ids, examples.attention_mask, examples.labels, torch.full((n,), domain))

    @classmethod
    def concat(cls, parts: list[TokenData]) -> TokenData:
        return cls(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("input_ids", "attention_mask", "labels", "domain"))
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def label_tokens(self) -> int:
        """Tokens that take part in the loss (the ones that predict a next token)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum().item())

    def subset(self, idx: Indices) -> TokenData:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64).reshape(-1))
        return TokenData(self.input_ids[index], self.attention_mask[index], self.labels[index], self.domain[index])

    def batch(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The rows at `idx` as model inputs plus `labels`, on `device`."""
        return {
            "input_ids": self.input_ids[idx].to(device),
            "attention_mask": self.attention_mask[idx].to(device),
            "labels": self.labels[idx].to(device),
        }

    @staticmethod
    def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        """(summed next-token cross-entropy, correct next-token predictions, tokens scored) of a batch.

        The token at t predicts the one at t+1; labels -100 are not scored. The labels are shifted (the last
        position gets -100), not the logits: slicing the (rows, seq_len, vocabulary) logits would copy them
        and their gradient in every training step, some 4 % of a step on a CPU.
        """
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        scored = targets != IGNORE_INDEX
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        correct = int(((logits.argmax(-1) == targets) & scored).sum().item())
        return loss, correct, int(scored.sum().item())
