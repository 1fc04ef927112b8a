"""The DINOv2 aggregation study's setting: what every run pins, its CPU budget, and a step-time measurement.

The cheaper mode every run uses (the centralised references too): LoRA on q/v of the top N of DINOv2 ViT-S/14's
12 blocks only (`lora.top_layers`). The blocks below are frozen and digit-shift's images carry no random
augmentation, so each image's hidden states entering block 12 - N are computed once per process and reused
(`fairedge.common.models.frozen_cache`): a step runs N blocks forward and backward, not 12 forward.

Sizing (the default, `FULL`): 8 digit-shift domains, one client each (feature non-IID; feature-label adds
Dirichlet label skew, each client keeping a label-skewed half of its domain), 600 samples per domain (450
train, 150 test), 56 px input (4 x 4 patches of 14 on the 28 px digits), top 4 blocks, 8 rounds of 8 local
steps of batch 32. That is ~0.6 epochs of a feature client's data per round (~1.1 for feature-label) and
512 optimizer steps per run; the whole study (6 methods + lambda = 0 + 2 centralised references per
partition, 2 partitions, 3 seeds, 2 replays) is estimated at ~7-8 CPU-hours on 2 cores (`estimate_seconds`).
112 px would cost ~3.4x per step (measured) and does not fit the budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from fairedge.common.config import RunConfig
from fairedge.common.data.digit_shift import DIGIT_SHIFT_DOMAINS
from fairedge.simulations.paths import ROOT

VISION_CONFIG = ROOT / "simulations" / "configs" / "vision.toml"
CORES = 2

# Wall-clock seconds assumed by the estimate, for 2 uncontended cores: the single-thread CPU-seconds measured
# while another study kept both cores busy (a cautious stand-in), at 56 px with LoRA r8 on q/v of the top 4
# blocks, batch 32 (`python -m fairedge.simulations.dino_aggregation_study --measure`): a cached step 0.22 s
# (whole model 0.69 s, top 4 without the cache 0.43 s); filling the cache 9 ms per image (8 frozen blocks).
# Other sizes scale with the tokens per image and the blocks run; scoring a test image costs about a third of a
# training step's per-image cost (forward only).
STEP_S = 0.25
"""one optimizer step of batch 32 on the cached path, 56 px, top 4 blocks."""
FILL_IMAGE_S = 0.010
"""one image through the 8 frozen blocks (once per image and seed in the study's process)."""
CLIENT_ROUND_OVERHEAD_S = 1.5
"""a client's message: build the task's images, load the backbone, hash its frozen blocks."""
RUN_OVERHEAD_S = 10.0


def _tokens(image_size: int) -> int:
    return 1 + (image_size // 14) ** 2


@dataclass(frozen=True)
class Setting:
    """What every run of the study shares; `overrides` pins all of it over the demo config."""

    domains: tuple[str, ...]
    samples_per_domain: int
    image_size: int
    top_layers: int
    rounds: int
    local_steps: int
    batch_size: int
    rank: int = 8
    alpha: int = 16
    lr: float = 0.003
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def clients(self) -> int:
        return len(self.domains)

    def overrides(self) -> list[str]:
        n = self.clients
        return [
            "data.task=digit-shift",
            f"data.domains={json.dumps(list(self.domains))}",
            f"data.samples_per_domain={self.samples_per_domain}",
            "model.kind=hf-vision",
            f"model.image_size={self.image_size}",
            f"lora.rank={self.rank}",
            f"lora.alpha={self.alpha}",
            f"lora.top_layers={self.top_layers}",
            f"federation.num_clients={n}",
            f"federation.min_train_nodes={n}",  # every client in every round: a failed client fails the run
            "federation.fraction_train=1.0",
            f"federation.rounds={self.rounds}",
            f"federation.local_steps={self.local_steps}",
            f"federation.batch_size={self.batch_size}",
            f"federation.lr={self.lr}",
            "compression.enabled=false",  # the study compares aggregation rules, not codecs
        ]

    def step_seconds(self) -> float:
        scale = _tokens(self.image_size) / _tokens(56) * self.top_layers / 4 * self.batch_size / 32
        return STEP_S * scale

    def run_seconds(self, *, federated: bool = True) -> float:
        """Estimated wall-clock seconds of one run (the centralised references take as many steps, no clients)."""
        test_images = self.clients * round(self.samples_per_domain * 0.25)
        steps = self.rounds * self.clients * self.local_steps
        evaluation = (self.rounds + 1) * test_images * self.step_seconds() / self.batch_size / 3
        clients = self.rounds * self.clients * CLIENT_ROUND_OVERHEAD_S if federated else 0.0
        return steps * self.step_seconds() + evaluation + clients + RUN_OVERHEAD_S

    def fill_seconds(self) -> float:
        """Filling the cache with one seed's images (every image once)."""
        blocks = 12 - self.top_layers
        return self.clients * self.samples_per_domain * FILL_IMAGE_S * _tokens(self.image_size) / 17 * blocks / 8


FULL = Setting(
    domains=DIGIT_SHIFT_DOMAINS, samples_per_domain=600, image_size=56, top_layers=4, rounds=8, local_steps=8,
    batch_size=32,
)  # fmt: skip
QUICK = Setting(
    domains=("mnist", "digits"), samples_per_domain=20, image_size=56, top_layers=2, rounds=1, local_steps=2,
    batch_size=8, seeds=(0,),
)  # fmt: skip
"""A smoke of the pipeline, not a result. Two local steps: after one step from B = 0 LoRA-FAIR has nothing to correct."""


def estimate_seconds(setting: Setting, federated: int, centralised: int, replays: int) -> float:
    """Wall-clock seconds of `federated` + `centralised` runs and `replays` on 2 cores, cache fills included."""
    runs = (federated + replays) * setting.run_seconds() + centralised * setting.run_seconds(federated=False)
    return runs + len(setting.seeds) * setting.fill_seconds()


def measure_step_seconds(cfg: RunConfig, steps: int = 3) -> dict[str, float]:
    """CPU-seconds per optimizer step of one batch of `cfg` on this machine: the whole model (LoRA in every
    block), the top `lora.top_layers` blocks without and with the frozen cache; and the cache fill per image."""
    import torch

    from fairedge.common.models import frozen_cache
    from fairedge.common.task import load_task, lora_model

    task = load_task(cfg)
    x, y = task.train.x[: cfg.federation.batch_size], task.train.y[: cfg.federation.batch_size]
    variants = {
        "whole model": cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"top_layers": None})}),
        "top blocks, no cache": cfg.model_copy(update={"model": cfg.model.model_copy(update={"frozen_cache_mb": 0})}),
        "top blocks, cached": cfg,
    }
    out: dict[str, float] = {}
    for name, variant in variants.items():
        frozen_cache.clear()
        model = lora_model(variant, task=task).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        start = time.process_time()
        model.prepare(x)  # the cached variant computes the frozen blocks here, once
        if name == "top blocks, cached":
            out["cache fill per image"] = (time.process_time() - start) / len(x)
        for i in range(steps + 1):  # the first is a warm-up
            if i == 1:
                start = time.process_time()
            loss = torch.nn.functional.cross_entropy(model(**model.prepare(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[name] = (time.process_time() - start) / steps
    frozen_cache.clear()
    return out
