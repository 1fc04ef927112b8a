"""An image classifier on any local transformers image backbone (DINOv2, ViT, ...): pre-trained, adapted by LoRA.

The task data stays task-agnostic (the shared `[-1, 1]` pixel scale, 1 or 3 channels, the task's size);
the model itself turns a batch into what its backbone was trained on: 3 channels, `image_size` pixels
(a multiple of the patch size; DINOv2 interpolates its position table), the backbone's own
normalisation (ImageNet's unless the folder's `preprocessor_config.json` says otherwise). This happens
in `forward`, not in `prepare`, so an exported model takes the same inputs as every other image model.

With LoRA on the top blocks only (`lora.top_layers`), the blocks below are frozen and the task's images
carry no random augmentation, so what enters the lowest adapted block is a fixed function of each image:
`use_frozen_cache` makes `prepare` return those hidden states (computed once per image, `frozen_cache`)
and `forward(hidden_states=...)` runs only the top blocks. `forward(pixel_values)` stays the full model.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from fairedge.common.models.frozen_cache import FrozenCache, transformer_blocks
from fairedge.common.models.seeding import seeded
from fairedge.common.pixels import PIXEL_MEAN, PIXEL_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Attention query/value projection names, newest transformers naming first (DINOv2 and ViT: q_proj/v_proj).
_QV_NAMES = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"))


class HFVisionClassifier(nn.Module):
    """Backbone + linear head on [CLS token, mean of the patch tokens] (DINOv2's linear-probe features)."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        backbone: PreTrainedModel,
        num_classes: int,
        *,
        image_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        # No `self.config`: PEFT would treat this wrapper as a transformers model (see VisionClassifier).
        self.backbone = backbone
        self.image_size = image_size
        self.num_channels = int(getattr(backbone.config, "num_channels", 3))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.lora_targets = _attention_qv(backbone)
        # ViT-like models keep their trained position table unless told to interpolate it; DINOv2 always does.
        takes = inspect.signature(backbone.forward).parameters
        self._backbone_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in takes else {}
        self.classifier = nn.Linear(2 * int(backbone.config.hidden_size), num_classes)
        self.frozen_cache: FrozenCache | None = None

    def backbone_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Task images `(N, 1 or 3, H, W)` on the shared `[-1, 1]` scale -> the backbone's `(N, 3, S, S)` input."""
        p = x * PIXEL_STD + PIXEL_MEAN  # back to [0, 1]
        if p.shape[1] != self.num_channels:
            if p.shape[1] != 1:
                raise ValueError(f"images of {p.shape[1]} channels for a backbone of {self.num_channels}")
            p = p.expand(-1, self.num_channels, -1, -1)  # grayscale: the same value in every channel
        if tuple(p.shape[-2:]) != (self.image_size, self.image_size):
            p = F.interpolate(p, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (p - self.pixel_mean) / self.pixel_std

    def forward(
        self, pixel_values: torch.Tensor | None = None, hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from task images, or from `hidden_states` entering block `frozen_cache.start` (see `prepare`)."""
        if hidden_states is not None:
            if self.frozen_cache is None:
                raise ValueError("hidden_states input without use_frozen_cache: the model cannot know their block")
            return self.forward_from_block(hidden_states, self.frozen_cache.start)
        if pixel_values is None:
            raise ValueError("HFVisionClassifier needs pixel_values or hidden_states")
        out = self.backbone(pixel_values=self.backbone_pixels(pixel_values), **self._backbone_kwargs)
        return self._head(out.last_hidden_state)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(N, 1 + patches, H)` last hidden state -> logits, from [CLS, mean of the patch tokens]."""
        return self.classifier(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1))

    def prepare(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch -> forward kwargs; the training loop calls `model(**model.prepare(x))`.

        With `use_frozen_cache`: the hidden states entering the lowest adapted block (each image's computed once
        per process), so the frozen blocks run once per image instead of once per step.
        """
        if self.frozen_cache is not None:
            return {"hidden_states": self.frozen_cache.hidden_states(self, x)}
        return {"pixel_values": x}

    def use_frozen_cache(self, start: int, max_bytes: int) -> None:
        """Let `prepare` hand blocks `start..` cached hidden states (the blocks below must stay frozen).

        Only when the frozen part is deterministic in training (no dropout, no stochastic depth): otherwise the
        full model in train mode differs from the cached path, and `prepare` keeps returning pixels.
        """
        name, blocks = transformer_blocks(self.backbone)
        if not 0 < start < len(blocks):
            raise ValueError(f"frozen cache from block {start}: the backbone has blocks 0..{len(blocks) - 1}")
        adapted = tuple(f"{name}.{i}." for i in range(start, len(blocks)))
        live = [n for n, p in self.backbone.named_parameters() if not n.startswith(adapted) and p.requires_grad]
        live += [n for n, _ in self.backbone.named_modules() if not n.startswith(adapted) and n.endswith(".lora_A")]
        if live:
            raise ValueError(f"frozen cache from block {start}, but {live[0]} below it trains or is adapted")
        config = self.backbone.config
        noisy = [k for k in _DROPOUTS if float(getattr(config, k, 0.0) or 0.0) > 0]
        self.frozen_cache = None if noisy or max_bytes <= 0 else FrozenCache(start, max_bytes)

    def hidden_before_block(self, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
        """The hidden states entering block `start`, computed by the backbone's own forward (stopped there)."""
        _, blocks = transformer_blocks(self.backbone)
        seen: list[torch.Tensor] = []

        def stop(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Reached

        handle = blocks[start].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.backbone(pixel_values=self.backbone_pixels(pixel_values), **self._backbone_kwargs)
        except _Reached:
            pass
        finally:
            handle.remove()
        return seen[0]

    def forward_from_block(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from the hidden states entering block `start`: blocks `start..`, final layer norm, head."""
        _, blocks = transformer_blocks(self.backbone)
        for block in blocks[start:]:
            hidden = block(hidden, None)  # no attention mask, as the backbone's own loop passes for images
        norm: nn.Module = getattr(self.backbone, "layernorm")  # noqa: B009  (transformer_blocks checked it)
        return self._head(norm(hidden))


_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")


class _Reached(Exception):
    """Raised by the pre-hook of the first cached block: the backbone's forward has computed what we need."""


def _attention_qv(backbone: nn.Module) -> tuple[str, ...]:
    """The backbone's attention query/value projection names (the default LoRA targets); () if unknown."""
    linears = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    return next((pair for pair in _QV_NAMES if set(pair) <= linears), ())


def load_vision_backbone(path: str | Path) -> PreTrainedModel:
    """The image backbone in a local Hugging Face folder (`AutoModel`, float32, eval mode); never the hub.

    Refuses, before loading any weights, a folder whose model does not take images (`pixel_values`).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r}: no Hugging Face model (config.json) in that folder")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={str(path)!r}: cannot read its config.json: {e}") from e
    class_name = MODEL_MAPPING_NAMES.get(config.model_type)
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None or getattr(model_class, "main_input_name", None) != "pixel_values":
        saved_as = ", ".join(config.architectures or []) or "no architecture"
        raise ValueError(
            f"model.path={str(path)!r} holds a {config.model_type!r} model ({saved_as}), not an image backbone: "
            "model.kind 'hf-vision' needs a transformers vision model that takes pixel_values (e.g. dinov2, vit)"
        )
    if not isinstance(getattr(config, "hidden_size", None), int):
        raise ValueError(f"model.path={str(path)!r}: a {config.model_type!r} model has no token hidden_size")
    try:
        backbone = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={str(path)!r}: cannot load the image backbone: {e}") from e
    return backbone.eval()


def load_hf_vision_classifier(
    path: str | Path, *, num_classes: int, image_size: int = 112, seed: int = 0
) -> HFVisionClassifier:
    """Backbone from a local folder, head drawn from `seed` (eval mode; callers switch to train() themselves)."""
    backbone = load_vision_backbone(path)
    patch = getattr(backbone.config, "patch_size", None)
    if isinstance(patch, int) and image_size % patch:
        raise ValueError(
            f"model.image_size={image_size} is not a multiple of the backbone's patch size {patch} "
            f"(e.g. {max(1, round(image_size / patch)) * patch})"
        )
    mean, std = _normalisation(Path(path))
    with seeded(seed):
        model = HFVisionClassifier(backbone, num_classes, image_size=image_size, mean=mean, std=std)
    return model.eval()


def _normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The folder's image_mean/image_std (`preprocessor_config.json`), else ImageNet's."""
    file = path / "preprocessor_config.json"
    if file.is_file():
        info: dict[str, Any] = json.loads(file.read_text())
        mean, std = info.get("image_mean"), info.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD
