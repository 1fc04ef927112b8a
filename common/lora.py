"""LoRA adapters through PEFT, and the small surface federated rounds need on top of them.

Per adapted layer with base weight `W0 (m x n)` PEFT keeps `A = lora_A (r x n)` and
`B = lora_B (m x r)`; the effective weight is `W0 + s * B @ A` with `s = alpha / r`.
Layers are named by their path in the wrapped model (e.g. `vit.layers.0.attention.q_proj`),
so names read the same on every client and on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

ADAPTER = "default"
"""The one adapter `add_lora` creates; PEFT's default name."""

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def add_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    head_modules: Sequence[str] = ("classifier",),
) -> PeftModel:
    """Wrap `model` (modified in place) so only LoRA factors and the head train.

    `target_modules` are module-name suffixes (`["q_proj", "v_proj"]` for the ViT,
    `["query", "value"]` for BERT-like encoders); `head_modules` get a trainable copy.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(head_modules),
        init_lora_weights=True,
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        expected = ".lora_" in name or ".modules_to_save." in name
        if param.requires_grad != expected:
            raise RuntimeError(f"unexpected trainability of {name}: requires_grad={param.requires_grad}")
    return peft_model


def lora_scale(model: PeftModel) -> float:
    """`s = alpha / r`, the factor on `B @ A` in the effective weight."""
    config = model.peft_config[ADAPTER]
    return config.lora_alpha / config.r


def _lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def _heads(model: PeftModel) -> dict[str, nn.Module]:
    return {
        name: module.modules_to_save[ADAPTER]
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper) and ADAPTER in module.modules_to_save
    }


def get_lora_factors(model: PeftModel) -> Factors:
    """`{layer: (A (r x n), B (m x r))}` as detached float32 CPU copies, in model order."""
    return {
        name: (
            layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
            layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32).clone(),
        )
        for name, layer in _lora_layers(model).items()
    }


@torch.no_grad()
def set_lora_factors(model: PeftModel, factors: Factors) -> None:
    """Copy `factors` into the adapter in place; every name and shape is checked before any copy."""
    layers = _lora_layers(model)
    for name, (a, b) in factors.items():
        if name not in layers:
            raise KeyError(f"no LoRA layer named {name!r}")
        want_a = layers[name].lora_A[ADAPTER].weight.shape
        want_b = layers[name].lora_B[ADAPTER].weight.shape
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(
                f"{name}: factors of shape A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected A {tuple(want_a)}, B {tuple(want_b)}"
            )
    for name, (a, b) in factors.items():
        layers[name].lora_A[ADAPTER].weight.copy_(a)
        layers[name].lora_B[ADAPTER].weight.copy_(b)


def get_base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """`{layer: W0 (m x n)}`: each LoRA layer's frozen base weight, as detached float32 CPU copies."""
    return {
        name: layer.get_base_layer().weight.detach().to("cpu", torch.float32).clone()
        for name, layer in _lora_layers(model).items()
    }


@torch.no_grad()
def set_base_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the LoRA layers' base weights in place; names and shapes checked before any copy."""
    layers = _lora_layers(model)
    for name, w in weights.items():
        if name not in layers:
            raise KeyError(f"no LoRA layer named {name!r}")
        want = layers[name].get_base_layer().weight.shape
        if w.shape != want:
            raise ValueError(f"{name}: base weight of shape {tuple(w.shape)}, expected {tuple(want)}")
    for name, w in weights.items():
        layers[name].get_base_layer().weight.copy_(w)


def set_trainable_factors(model: PeftModel, factors: str) -> None:
    """Let only the named LoRA factors train: "AB" (both), "A" or "B"; the head keeps training."""
    if factors not in ("AB", "A", "B"):
        raise ValueError(f"factors must be 'AB', 'A' or 'B', got {factors!r}")
    for layer in _lora_layers(model).values():
        layer.lora_A[ADAPTER].weight.requires_grad_("A" in factors)
        layer.lora_B[ADAPTER].weight.requires_grad_("B" in factors)


def get_head_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable non-LoRA parameters (heads), keyed like the plain model (`classifier.weight`)."""
    return {
        f"{name}.{key}": value.detach().to("cpu", torch.float32).clone()
        for name, head in _heads(model).items()
        for key, value in head.state_dict().items()
    }


@torch.no_grad()
def set_head_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `get_head_state`; unknown names raise `KeyError`, wrong shapes `ValueError`."""
    targets = {
        f"{name}.{key}": value
        for name, head in _heads(model).items()
        for key, value in head.state_dict(keep_vars=True).items()
    }
    for key, value in state.items():
        if key not in targets:
            raise KeyError(f"no head parameter named {key!r}")
        if value.shape != targets[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(targets[key].shape)}")
    for key, value in state.items():
        targets[key].copy_(value)


def save_adapter(model: PeftModel, directory: str | Path) -> None:
    """PEFT's own format; reload with `PeftModel.from_pretrained(identically_built_base, directory)`."""
    model.save_pretrained(str(directory))
