"""A finished run's global model, rebuilt from its folder: the way to use what a run trained.

A run folder holds `config.toml`, `adapter/` (PEFT) and, for rules that change the base weights
(FLoRA, FedEx-LoRA), `base_delta.safetensors`. The base model is rebuilt from the config exactly as
during the run, the base delta is added to its weights, then the adapter is loaded and merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from fairedge.common.adapter_record import unflatten
from fairedge.common.config import RunConfig, load_config
from fairedge.common.data import TaskData
from fairedge.common.task import base_model


def load_run_model(run_dir: str | Path, *, task: TaskData | None = None) -> tuple[RunConfig, nn.Module]:
    """(config, the merged global model in eval mode, frozen) of a finished run folder.

    `task` is the run's `load_task(cfg)` when the caller has it (the ViT's base is pre-trained on it).
    """
    run_dir = Path(run_dir)
    for need in ("config.toml", "adapter/adapter_config.json"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {need} is missing")
    cfg = load_config(run_dir / "config.toml")
    base = base_model(cfg, task=task)
    delta_file = run_dir / "base_delta.safetensors"
    if delta_file.is_file():
        delta = unflatten(load_file(str(delta_file))).base_delta
        with torch.no_grad():
            for layer, (q, p) in delta.items():
                try:
                    weight = base.get_submodule(layer).get_parameter("weight")
                except AttributeError:
                    raise ValueError(f"{delta_file}: delta for {layer!r}, which the base model does not have") from None
                if tuple(weight.shape) != (p.shape[0], q.shape[1]):
                    raise ValueError(
                        f"{delta_file}: delta of {layer} is {p.shape[0]}x{q.shape[1]}, "
                        f"the weight is {tuple(weight.shape)}"
                    )
                weight.add_(p @ q)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload().eval()
    model.requires_grad_(False)
    return cfg, model
