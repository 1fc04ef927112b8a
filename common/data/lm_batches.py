"""Token sequences -> fixed-length causal-LM examples, and deterministic batches of them.

Two layouts, chosen per task:
- packing: a client's texts are concatenated, each followed by EOS, and cut into blocks of `seq_len` tokens
  (no padding except in the last block; nothing is thrown away). Suits plain text such as a role's lines.
- one example per text, truncated to `seq_len` (its beginning kept) and padded. Suits conversations, where a
  block boundary would cut a reply from its prompt.
Labels are -100 on padding (and wherever the caller said so, e.g. on a chat's user turns).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that takes no part in the loss (PyTorch's and Hugging Face's convention)."""

TokenizedText = tuple[list[int], list[int]]
"""(token ids, labels) of one text; labels are the ids, or -100 where the loss must not look."""


@dataclass(frozen=True)
class LMExamples:
    """N fixed-length examples: int64 tensors of shape (N, seq_len)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def label_tokens(self) -> int:
        """Tokens that take part in the loss."""
        return int((self.labels != IGNORE_INDEX).sum().item())


def tokenize_plain(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[TokenizedText]:
    """Plain texts -> (ids, labels = ids), without the tokenizer's special tokens (packing adds EOS)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(list(ids), list(ids)) for ids in encoded]


def build_examples(texts: Sequence[TokenizedText], *, seq_len: int, pack: bool, eos_id: int, pad_id: int) -> LMExamples:
    """Tokenized texts -> fixed-length examples, packed into blocks or one per text (truncated, padded)."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be >= 2 (a token and the one it predicts)")
    for i, (ids, labels) in enumerate(texts):
        if len(ids) != len(labels):
            raise ValueError(f"text {i}: {len(ids)} ids but {len(labels)} labels")
    rows: list[tuple[list[int], list[int]]] = []
    if pack:
        stream_ids: list[int] = []
        stream_labels: list[int] = []
        for ids, labels in texts:
            if not ids:
                continue
            stream_ids += [*ids, eos_id]
            stream_labels += [*labels, eos_id]
        rows = [
            (stream_ids[i : i + seq_len], stream_labels[i : i + seq_len]) for i in range(0, len(stream_ids), seq_len)
        ]
    else:
        rows = [(ids[:seq_len], labels[:seq_len]) for ids, labels in texts if ids]
    if not rows:
        raise ValueError("no tokens: every text is empty")
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    label_tensor = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, labels) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        label_tensor[r, : len(labels)] = torch.tensor(labels)
    return LMExamples(input_ids, attention_mask, label_tensor)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(EOS id, padding id); padding falls back to EOS, as is usual for causal LMs."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, needed to separate packed texts")
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def iterate_batches(
    examples: LMExamples, batch_size: int, *, seed: int | None = None, drop_last: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of examples: shuffled by a `torch.Generator` seeded with `seed`, or in order when seed is None.

    The same seed gives the same batches on every machine; the global RNG is left alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    n = len(examples)
    if seed is None:
        order = torch.arange(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {
            "input_ids": examples.input_ids[idx],
            "attention_mask": examples.attention_mask[idx],
            "labels": examples.labels[idx],
        }
