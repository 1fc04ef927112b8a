"""The models of the edge study: the federated model the device serves, and the stronger teachers of the cloud.

Each is trained once and cached as a run folder under the config's `output_dir`, keyed by its config
hash: `edge-study-<hash>/` (the federation, `trained_run`) and `edge-teacher-<kind>-<hash>/`
(`trained_teacher`). A folder appears only once its training has finished (`atomic_folder`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fairedge.common.atomic_files import atomic_folder
from fairedge.common.config import RunConfig, build_config, config_hash, load_config
from fairedge.common.data.task_data import PIXEL_MEAN, PIXEL_STD, LabeledData, normalize_pixels
from fairedge.simulations.paths import CONFIG, ROOT


def study_config(config: str | Path = CONFIG, method: str = "fedit") -> RunConfig:
    """The federated run the study adapts: `config` with `aggregation.method = method`."""
    return load_config(config, [f"aggregation.method={method}"])


def trained_run(cfg: RunConfig) -> Path:
    """`runs/edge-study-<config hash>/`: trained with `simulate` once (in-process engine), then reused."""
    from fairedge.simulations.simulate import simulate

    return _train_once(
        ROOT / cfg.output_dir / f"edge-study-{config_hash(cfg)}",
        f"the federated model ({cfg.name}, {cfg.aggregation.method}, {cfg.federation.rounds} rounds)",
        lambda partial: simulate(cfg, partial, engine="inprocess"),
    )


def _train_once(run_dir: Path, what: str, train: Callable[[Path], object]) -> Path:
    """`run_dir` if it holds a trained adapter; else `train(<temporary folder>)`, then put in place whole."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    print(f"training {what} -> {run_dir}", flush=True)
    with atomic_folder(run_dir) as partial:
        train(partial)
    return run_dir


JITTER_CONTRAST = (0.1, 1.0)
JITTER_BRIGHTNESS = (0.3, 1.0)
"""Colour-jitter ranges of the foundation teacher's training: contrast factor (kept fraction of each image's
deviation from its mean) and brightness factor (multiplies every pixel), each drawn uniformly per image."""
JITTER_COPIES = 3
FOUNDATION_TRAINING = ["federation.local_steps=100"]
"""The foundation teacher trains 10 rounds x 100 steps x 6 clients = 6000 steps (the centralised one 2400)."""


def photometric_jitter(data: LabeledData, *, copies: int = JITTER_COPIES, seed: int = 0) -> LabeledData:
    """`data` plus `copies` colour-jittered copies of it (random contrast and brightness factor per image).

    The standard photometric augmentation that makes large pre-trained models robust to lighting
    changes; the federation and the device's model never see it.
    """
    if not isinstance(data.x, torch.Tensor):
        raise ValueError("photometric_jitter needs an image task (data.x of shape (N, C, H, W)), got texts")
    gen = torch.Generator().manual_seed(seed)
    x01 = data.x * PIXEL_STD + PIXEL_MEAN
    mean = x01.mean(dim=(1, 2, 3), keepdim=True)
    xs = [data.x]
    for _ in range(copies):
        shape = (len(x01), 1, 1, 1)
        contrast = torch.empty(shape).uniform_(*JITTER_CONTRAST, generator=gen)
        brightness = torch.empty(shape).uniform_(*JITTER_BRIGHTNESS, generator=gen)
        xs.append(normalize_pixels((mean + contrast * (x01 - mean)) * brightness))
    return LabeledData(torch.cat(xs), data.y.repeat(copies + 1), data.domain.repeat(copies + 1))


def trained_teacher(cfg: RunConfig, kind: str) -> Path:
    """`runs/edge-teacher-<kind>-<config hash>/`: a stronger teacher than the served model, trained once.

    `centralised`: LoRA trained without Flower on the pooled training data of all clients, by
    `fairedge.simulations.aggregation_study.centralised` (same model, rank, seeded initial adapter, steps per
    round and seeds as the federation). `foundation`: the same, but longer (FOUNDATION_TRAINING) and on
    the pooled data plus colour-jittered copies (`photometric_jitter`), standing in for a foundation
    model made robust by its training. Saved as a run folder (`write_outputs`: config.toml, adapter/,
    metrics.json) that `load_served_model(..., teacher=)` reads.
    """
    from fairedge.server.run_outputs import write_outputs
    from fairedge.simulations.aggregation_study import centralised

    if kind not in ("centralised", "foundation"):
        raise ValueError(f"teacher kind {kind!r}: allowed 'centralised', 'foundation'")
    if kind == "foundation":
        cfg = build_config(cfg.model_dump(mode="json", exclude_none=True), FOUNDATION_TRAINING)

    def train(partial: Path) -> None:
        # evaluated once, at the end: a teacher, not a learning curve
        record, model = centralised(cfg, curve=False, augment=photometric_jitter if kind == "foundation" else None)
        record.run_dir = partial
        write_outputs(record, model)

    return _train_once(
        ROOT / cfg.output_dir / f"edge-teacher-{kind}-{config_hash(cfg)}",
        f"the {kind} teacher ({cfg.name}, {cfg.federation.rounds} rounds on the pooled data)",
        train,
    )


TEACHERS = ("self", "centralised", "foundation")
"""`--teacher`: the served model teaches itself (the issue's default), or a stronger model does (`trained_teacher`)."""


def teacher_run(teacher: str, cfg: RunConfig) -> Path | None:
    """The run folder of the teacher (None: the served model itself)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r}: allowed {TEACHERS}")
    return None if teacher == "self" else trained_teacher(cfg, teacher)
