"""The hidden states entering the lowest adapted block of a vision backbone, computed once per image.

With LoRA on the top N blocks only (`lora.top_layers`) the blocks below are frozen and the task's images carry
no random augmentation, so what enters block `start = total - N` is a fixed function of each image. A step
then runs only the top blocks (`HFVisionClassifier.forward(hidden_states=...)`): the frozen blocks run once per
image per process instead of once per step.

Kept in this process's memory, not on disk, because:
- the key is everything the hidden states depend on, read from the objects themselves rather than from a
  config that describes them: a hash of every backbone tensor outside the adapted blocks (the frozen weights,
  whatever folder or conversion they came from), the model's input transform (image size, normalisation,
  channels), `start`, the torch and transformers versions, and per entry each image's own bytes and shape.
  No seed, split or data-section hash is trusted to stand for the images, so a changed data generator can
  never meet a stale entry;
- an entry is large (DINOv2-S at 112 px: 65 tokens x 384 floats = 100 kB per image, fp32 to stay exact), so
  a disk cache would grow by hundreds of MB per data set and seed; recomputing costs one forward pass of the
  frozen blocks per image and process, and the in-process engine runs a whole study in one process;
- it is bounded: past `max_bytes` (`model.frozen_cache_mb`, over all models of the process) no entry is added
  and images not held are recomputed each time they are met (correct, only slower).
The weights are hashed once per model, on its first batch: the frozen blocks must not change afterwards
(nothing does: every aggregation rule's base-weight change is to LoRA layers, all in the adapted blocks).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import transformers
from torch import nn

_STORE: dict[str, dict[bytes, torch.Tensor]] = {}
"""frozen-part fingerprint -> {image key -> hidden states entering block `start`, (tokens, hidden), CPU}."""
_held = [0]  # bytes in _STORE


def transformer_blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the backbone's transformer blocks: its one ModuleList of `config.num_hidden_layers`
    modules (`encoder.layer` in DINOv2, `layers` in transformers 5's ViT), followed by a final `layernorm`."""
    n = int(getattr(getattr(backbone, "config", None), "num_hidden_layers", -1))
    found = [(name, m) for name, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1 or not hasattr(backbone, "layernorm"):
        raise ValueError(
            f"cannot find one list of {n} transformer blocks and a final `layernorm` in {type(backbone).__name__}: "
            "lora.top_layers needs a DINOv2- or ViT-like backbone"
        )
    return found[0]


class FrozenCache:
    """Hidden states entering block `start` for `HFVisionClassifier.prepare`, from this process's store."""

    def __init__(self, start: int, max_bytes: int) -> None:
        self.start = start
        self.max_bytes = max_bytes
        self._fingerprint: str | None = None

    def fingerprint(self, model: Any) -> str:
        """The key of everything but the images (hashed on first use, then kept with this model)."""
        if self._fingerprint is None:
            self._fingerprint = frozen_fingerprint(model, self.start)
        return self._fingerprint

    @torch.no_grad()
    def hidden_states(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """`(N, tokens, hidden)` for the task images `x`: held ones from the store, the others computed (and
        stored while the budget allows)."""
        store = _STORE.setdefault(self.fingerprint(model), {})
        keys = image_keys(x)
        missing = [i for i, k in enumerate(keys) if k not in store]
        new: dict[bytes, torch.Tensor] = {}
        if missing:
            device = model.pixel_mean.device
            computed = model.hidden_before_block(x[missing].to(device), self.start).cpu()
            for i, row in zip(missing, computed):
                new[keys[i]] = row
                size = row.numel() * row.element_size()
                if _held[0] + size <= self.max_bytes:
                    store[keys[i]] = row.clone()  # not a view: it would keep the whole batch alive
                    _held[0] += size
        return torch.stack([store[k] if k in store else new[k] for k in keys])


def image_keys(x: torch.Tensor) -> list[bytes]:
    """One digest per image of its dtype, shape and bytes."""
    arr = x.detach().cpu().contiguous().numpy()
    head = f"{arr.dtype}{arr.shape[1:]}".encode()
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in arr]


def frozen_fingerprint(model: Any, start: int) -> str:
    """Hash of what the hidden states entering block `start` depend on, besides the image."""
    backbone = model.backbone
    name, blocks = transformer_blocks(backbone)
    adapted = tuple(f"{name}.{i}." for i in range(start, len(blocks)))
    h = hashlib.blake2b(digest_size=20)
    h.update(
        repr(
            (
                type(backbone).__name__,
                torch.__version__,
                transformers.__version__,
                start,
                model.image_size,
                model.num_channels,
                model.pixel_mean.flatten().tolist(),
                model.pixel_std.flatten().tolist(),
                sorted(model._backbone_kwargs.items()),
            )
        ).encode()
    )
    for key, tensor in backbone.state_dict().items():
        if key.startswith(adapted):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clear() -> None:
    """Drop every held entry (tests; a process that wants its memory back)."""
    _STORE.clear()
    _held[0] = 0


def held_bytes() -> int:
    """Bytes of hidden states held by this process."""
    return _held[0]
