"""LoRA adapters through PEFT, and the small surface federated rounds need on top of them.

Per adapted layer with base weight `W0 (m x n)` PEFT keeps `A = lora_A (r x n)` and
`B = lora_B (m x r)`; the effective weight is `W0 + s * B @ A` with `s = alpha / r`.
Layers are named by their path in the wrapped model (e.g. `vit.layers.0.attention.q_proj`),
so names read the same on every client and on the server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fairedge.common.models.seeding import seeded

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
    layers: Sequence[int] | None = None,
    layers_pattern: str = "layers",
    task_type: str | None = None,
    seed: int = 0,
) -> PeftModel:
    """Wrap `model` (modified in place) so only LoRA factors and the head train.

    `target_modules` are module-name suffixes (`["q_proj", "v_proj"]` for the ViT,
    `["query", "value"]` for BERT-like encoders); `head_modules` get a trainable copy.
    `["all-linear"]` adapts every linear layer but the output head (PEFT's preset). `layers`
    restricts LoRA to those transformer blocks (indices into the model's list of blocks, named
    `layers_pattern`: `layers` in causal LMs, `layer` in DINOv2);
    `task_type` is PEFT's (`"CAUSAL_LM"`: the adapter then loads as a causal-LM adapter).
    PEFT's init (`A` Kaiming-uniform, `B = 0`) draws from `seed`, so the same seed gives the
    same adapter and the caller's RNG is left alone.
    """
    targets: list[str] | str = "all-linear" if list(target_modules) == ["all-linear"] else list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int by PEFT; a float scale alpha / r works
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(head_modules) or None,
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern=layers_pattern if layers is not None else None,
        init_lora_weights=True,
        task_type=task_type,
    )
    with seeded(seed):
        peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        expected = ".lora_" in name or ".modules_to_save." in name
        if param.requires_grad != expected:
            raise RuntimeError(f"unexpected trainability of {name}: requires_grad={param.requires_grad}")
    return peft_model


def lora_scale(model: PeftModel) -> float:
    """`s = alpha / r`, the factor on `B @ A` in the effective weight."""
    config = cast(LoraConfig, model.peft_config[ADAPTER])
    return config.lora_alpha / config.r


def _weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a LoRA factor or base layer (all `nn.Linear` here)."""
    return cast(nn.Linear, linear).weight


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
            _weight(layer.lora_A[ADAPTER]).detach().to("cpu", torch.float32).clone(),
            _weight(layer.lora_B[ADAPTER]).detach().to("cpu", torch.float32).clone(),
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
        want_a = _weight(layers[name].lora_A[ADAPTER]).shape
        want_b = _weight(layers[name].lora_B[ADAPTER]).shape
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(
                f"{name}: factors of shape A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"expected A {tuple(want_a)}, B {tuple(want_b)}"
            )
    for name, (a, b) in factors.items():
        _weight(layers[name].lora_A[ADAPTER]).copy_(a)
        _weight(layers[name].lora_B[ADAPTER]).copy_(b)


def get_base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """`{layer: W0 (m x n)}`: each LoRA layer's frozen base weight, as detached float32 CPU copies."""
    return {
        name: _weight(layer.get_base_layer()).detach().to("cpu", torch.float32).clone()
        for name, layer in _lora_layers(model).items()
    }


@torch.no_grad()
def set_base_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the LoRA layers' base weights in place; names and shapes checked before any copy."""
    layers = _lora_layers(model)
    for name, w in weights.items():
        if name not in layers:
            raise KeyError(f"no LoRA layer named {name!r}")
        want = _weight(layers[name].get_base_layer()).shape
        if w.shape != want:
            raise ValueError(f"{name}: base weight of shape {tuple(w.shape)}, expected {tuple(want)}")
    for name, w in weights.items():
        _weight(layers[name].get_base_layer()).copy_(w)


def set_trainable_factors(model: PeftModel, factors: str) -> None:
    """Let only the named LoRA factors train: "AB" (both), "A" or "B"; the head keeps training."""
    if factors not in ("AB", "A", "B"):
        raise ValueError(f"factors must be 'AB', 'A' or 'B', got {factors!r}")
    for layer in _lora_layers(model).values():
        _weight(layer.lora_A[ADAPTER]).requires_grad_("A" in factors)
        _weight(layer.lora_B[ADAPTER]).requires_grad_("B" in factors)


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
    """PEFT's own format; reload with `PeftModel.from_pretrained(identically_built_base, directory)`.

    The files are byte-identical for the same adapter in any process: PEFT writes set-valued
    config fields (`target_modules`) in the set's iteration order, which depends on the
    process's string hash seed, so they are rewritten sorted.
    """
    model.save_pretrained(str(directory))
    path = Path(directory) / "adapter_config.json"
    saved = json.loads(path.read_text())
    sets = {k: sorted(v) for k, v in model.peft_config[ADAPTER].to_dict().items() if isinstance(v, set)}
    path.write_text(json.dumps({**saved, **sets}, indent=2, sort_keys=True))  # PEFT's own layout
