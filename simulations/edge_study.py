"""CEMA on a drifting edge stream: no adaptation vs CEMA vs uploading every sample (issue 5, study 1).

    python -m fairedge.simulations.edge_study [--teacher self|centralised|foundation] [--seeds 0 1 2] [--run RUN_DIR]
    python -m fairedge.simulations.edge_study --teacher foundation --tune     # only the seed-0 settings search

The federated model (`--run`, or by default `simulations/configs/default.toml` trained here once
and cached as `runs/edge-study-<config hash>/`) is merged, exported to ONNX, and run by the real
edge runtime (`fairedge.client.edge.EdgeRuntime`) against a real CEMA cloud service
(`fairedge.server.cloud.CloudService`) on loopback gRPC with token auth, a fresh state and queue folder
per run. The stream is the task's test images (all six domains the federation trained on)
under corruptions it never trained on, one corruption after another, mild then severe (the
paper streams one ImageNet-C corruption after another): `SEGMENTS`. Each run steps in lockstep
with the cloud (after each batch: uploads acknowledged, every possible update done, the new
parameters swapped in), so a run is deterministic per seed and independent of thread timing.

A seed draws the stream (which test images, their order, the corruption noise) and the
cloud's replay sampling; the trained model is the same for every seed. Per teacher, the TUNING
settings run on seed 0, `chosen_setting` picks one, and every seed runs with it. Two yardsticks
use the true labels (not deployable): `norm_headroom` (what fitted norm parameters gain per
corruption) and `label_oracle` (the same, online, on the stream). The cloud's teacher is the
served model itself (`--teacher self`, the issue's default) or a stronger one trained once and
cached (`trained_teacher`: `centralised` LoRA on the pooled client data, or `foundation`, the
same trained longer with colour-jitter augmentation); each teacher has its own result files.

Writes `simulations/results/edge_stream*.json` (every run, per-batch records), `edge_stream*.png`
(accuracy along the stream) per teacher, and `edge.md` (all of them; plus a summary of
`edge_latency.md` when the latency benchmark has written it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.atomic_files import atomic_write_bytes
from fairedge.common.config import RunConfig, build_config, config_hash, load_config
from fairedge.common.data.task_data import PIXEL_MEAN, PIXEL_STD, LabeledData, normalize_pixels

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).parent / "configs" / "default.toml"
MODES = ("none", "cema", "all")
TOKEN = "edge-study-token"

# ---------------------------------------------------------------- the stream

CORRUPTIONS: dict[str, tuple[float, float]] = {
    # name: (mild, severe) strength; none of these is among the federation's training domains
    # (rotated, inverted, gaussian-noisy, blurred, thick strokes)
    "contrast": (0.35, 0.15),  # keep this fraction of each image's deviation from its own mean
    "brightness": (0.3, 0.5),  # add this to every pixel, not clipped (a sensor offset: a washed-out image)
    "darken": (0.6, 0.35),  # multiply every pixel by this (a dim scene)
    "pixelate": (6, 4),  # average over a coarse grid of this many cells per side, then blow up (16 px images)
    "salt_pepper": (0.10, 0.22),  # fraction of pixels set to black or white
    "occlusion": (6, 9),  # side (px) of a mid-grey square at a random place
}
STREAM_CORRUPTIONS = ("contrast", "brightness", "darken", "pixelate")
"""The stream's corruptions: those that norm parameters can partly undo (`--headroom`: learning them from
the true labels gains 9-27 points on each, 0-2 points on salt_pepper and occlusion, which are left out)."""
SEGMENTS: list[tuple[str, int]] = [(name, sev) for name in STREAM_CORRUPTIONS for sev in (1, 2)]
"""The stream order: each corruption mild (1) then severe (2), corruptions one after another."""


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """One independent random stream per (seed, corruption, severity)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"edge-study/{name}/{severity}".encode()))


def corrupt(x01: torch.Tensor, name: str, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Corrupt images `(N, C, H, W)` with pixels on the [0, 1] scale; returns a new tensor, same scale."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {sorted(CORRUPTIONS)}")
    if severity not in (1, 2):
        raise ValueError(f"severity must be 1 (mild) or 2 (severe), got {severity}")
    if x01.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x01.shape)}")
    level = CORRUPTIONS[name][severity - 1]
    n, _, h, w = x01.shape
    if name == "contrast":
        mean = x01.mean(dim=(1, 2, 3), keepdim=True)
        return mean + level * (x01 - mean)
    if name == "brightness":
        return x01 + level
    if name == "darken":
        return x01 * level
    if name == "pixelate":
        coarse = F.adaptive_avg_pool2d(x01, int(level))
        return F.interpolate(coarse, size=(h, w), mode="nearest")
    if name == "salt_pepper":
        hit = torch.rand(x01.shape, generator=gen) < level
        value = (torch.rand(x01.shape, generator=gen) < 0.5).to(x01.dtype)
        return torch.where(hit, value, x01)
    side = int(level)  # occlusion
    top = torch.randint(0, h - side + 1, (n,), generator=gen)
    left = torch.randint(0, w - side + 1, (n,), generator=gen)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + side).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + side).view(n, 1, 1))
    )
    return torch.where(inside.unsqueeze(1), torch.full_like(x01, 0.5), x01)


@dataclass(frozen=True)
class Stream:
    """The study's input stream: normalised images, labels, and which segment each sample is in."""

    x: np.ndarray  # float32 (N, C, H, W) on the task's pixel scale
    y: np.ndarray  # int64 (N,)
    segment: np.ndarray  # int64 (N,), index into `segments`
    domain: np.ndarray  # int64 (N,), the test image's own (training) domain
    segments: list[str]  # "contrast-1", ...

    def __len__(self) -> int:
        return len(self.y)

    def boundaries(self) -> list[int]:
        """Index of the first sample of every segment (and the end)."""
        return [int(np.searchsorted(self.segment, i)) for i in range(len(self.segments))] + [len(self)]


def build_stream(test: LabeledData, *, seed: int, per_segment: int) -> Stream:
    """`per_segment` test images (a seeded draw over all domains) per entry of `SEGMENTS`, in that order."""
    if not isinstance(test.x, torch.Tensor) or test.x.ndim != 4:
        raise ValueError("the edge study needs an image task (test.x of shape (N, C, H, W))")
    if not 1 <= per_segment <= len(test):
        raise ValueError(f"per_segment = {per_segment}: must be in [1, {len(test)}] (test images available)")
    xs, ys, segs, doms = [], [], [], []
    for k, (name, sev) in enumerate(SEGMENTS):
        gen = corruption_generator(seed, name, sev)
        idx = torch.randperm(len(test), generator=gen)[:per_segment]
        x01 = test.x[idx] * PIXEL_STD + PIXEL_MEAN
        xs.append(normalize_pixels(corrupt(x01, name, sev, gen)))
        ys.append(test.y[idx])
        doms.append(test.domain[idx])
        segs.append(torch.full((per_segment,), k, dtype=torch.int64))
    return Stream(
        torch.cat(xs).numpy(),
        torch.cat(ys).numpy(),
        torch.cat(segs).numpy(),
        torch.cat(doms).numpy(),
        [f"{name}-{sev}" for name, sev in SEGMENTS],
    )


# ---------------------------------------------------------------- the federated model


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
    """`run_dir` if it holds a trained adapter; else `train(<run_dir>.partial)`, then renamed into place."""
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"training {what} -> {run_dir}", flush=True)
    train(partial)
    partial.rename(run_dir)
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


def stream_accuracy(served: Any, stream: Stream, *, teacher: bool = False, batch: int = 256) -> float:
    """Accuracy of the served student (or teacher) on the stream, no adaptation (its starting norm params)."""
    module, params = (served.teacher, served.teacher_norm) if teacher else (served.student, served.student_norm)
    name, correct = served.inputs[0].name, 0
    with torch.no_grad():
        for i in range(0, len(stream), batch):
            logits = served.forward(module, params, {name: torch.from_numpy(stream.x[i : i + batch])})
            correct += int((logits.argmax(1) == torch.from_numpy(stream.y[i : i + batch])).sum())
    return correct / len(stream)


# ---------------------------------------------------------------- one run: edge runtime + cloud service

FIXED = [
    "edge.batch_size=32",
    "edge.upload_batch_size=32",
    "edge.threads=1",
    "edge.backoff_initial_s=0.05",
    "edge.backoff_max_s=1.0",
    "cloud.threads=1",
]
"""Study plumbing, not tuned: one thread each side (2 shared cores), quick retries on loopback."""

KL_FROZEN = [
    "cloud.entropy_weight=0",
    "cloud.ce_weight=0",
    "cloud.teacher_lr=0",
    "cloud.lr=0.05",
    "cloud.steps_per_update=4",
    "cloud.min_new_per_update=8",
]
TUNING: dict[str, list[str]] = {
    "defaults": [],  # the public CEMA code's values (common.config)
    "KL only": ["cloud.entropy_weight=0", "cloud.ce_weight=0", "cloud.lr=0.01", "cloud.teacher_lr=0.0025"],
    "cautious": ["cloud.e_max=0.2", "cloud.lr=0.001"],
    # the student follows a frozen teacher by KL alone, 4 steps per update, an update once 8 new samples wait
    # (so CEMA's uploads get as many updates as uploading everything does)
    "KL, frozen teacher": KL_FROZEN,
    "KL, frozen teacher, E_max 0.7": [*KL_FROZEN, "edge.e_max=0.7"],
}
"""Settings tried on the tuning seed (0) with every teacher; `chosen_setting` picks the one each study runs."""

CHOICE_RULE = (
    "the largest CEMA gain over no adaptation among the settings where CEMA uploads at most 50 % and "
    "uploading everything gains too (failing that, the largest gain of uploading everything)"
)


def chosen_setting(tuning: Sequence[dict[str, Any]]) -> str | None:
    """The TUNING label that CHOICE_RULE picks from seed-0 tuning rows (None before any complete setting)."""
    none = next((r["accuracy"] for r in tuning if r["mode"] == "none"), None)
    if none is None:
        return None
    scores = {}
    for label in TUNING:
        by = {r["mode"]: r for r in tuning if r["setting"] == label}
        if "cema" in by and "all" in by:
            scores[label] = (
                by["cema"]["accuracy"] - none,
                by["all"]["accuracy"] - none,
                by["cema"]["uploaded_fraction"],
            )
    within = {k: v for k, v in scores.items() if v[2] <= 0.5 and v[1] > 0}
    if within:
        return max(within, key=lambda k: within[k][0])
    return max(scores, key=lambda k: scores[k][1]) if scores else None


def study_settings(run_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The run's own config with FIXED and `overrides` applied (edge and cloud sections)."""
    return load_config(run_dir / "config.toml", [*FIXED, *overrides])


def run_stream(
    onnx_path: Path, served: Any, cfg: RunConfig, stream: Stream, mode: str, seed: int, workdir: Path
) -> dict[str, Any]:
    """Stream through an EdgeRuntime (select = `mode`) talking gRPC to a fresh CloudService; one result row."""
    from fairedge.client.edge import CloudEndpoint, EdgeRuntime
    from fairedge.server.cloud import CloudService

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: allowed {MODES}")
    batch = cfg.edge.batch_size
    if len(stream) % batch or stream.boundaries()[1] % batch:
        raise ValueError(
            f"segments of {stream.boundaries()[1]} samples must be a multiple of edge.batch_size={batch}, "
            "so that no batch straddles two corruptions"
        )
    device_id = f"study-{mode}-{seed}"
    edge_cfg = cfg.edge.model_copy(update={"select": mode})
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{mode}-{seed}-") as tmp:
        service = CloudService(served, Path(tmp) / "state", cfg.cloud, tokens=[TOKEN], seed=seed)
        address = service.start(port=0)
        try:
            with EdgeRuntime(
                onnx_path,
                edge_cfg,
                cloud=CloudEndpoint(address, TOKEN),
                device_id=device_id,
                queue_dir=Path(tmp) / "queue",
            ) as rt:

                def lockstep(rt: EdgeRuntime) -> None:
                    """Uploads acknowledged, every possible cloud update done, its parameters in use."""
                    if rt.sync is None:  # select = "none": nothing to wait for
                        return
                    if not (rt.drain(60) and _wait(lambda: rt.sync.status.registered, 60)):
                        raise TimeoutError(f"{device_id}: uploads not acknowledged in 60 s: {rt.sync.status}")
                    service.flush(timeout=120)
                    version = service.norm_params(device_id)[0]
                    if not rt.wait_for_params(version, 60):
                        raise TimeoutError(f"{device_id}: parameter version {version} not swapped in within 60 s")

                started = time.perf_counter()
                report = rt.run(
                    ((stream.x[i : i + batch], stream.y[i : i + batch]) for i in range(0, len(stream), batch)),
                    after_batch=lockstep,
                )
                seconds = time.perf_counter() - started
        finally:
            service.stop()
    return result_row(
        report,
        stream,
        mode=mode,
        seed=seed,
        seconds=seconds,
        cloud_update_seconds=service.log.seconds,
        cloud_updates=service.log.updates,
    )


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def result_row(
    report: dict[str, Any],
    stream: Stream,
    *,
    mode: str,
    seed: int,
    seconds: float,
    cloud_update_seconds: float = 0.0,
    cloud_updates: int = 0,
) -> dict[str, Any]:
    """The JSON row of one run: overall and per-segment accuracy, uploads, bytes, per-batch records."""
    batches = [[b["start"], b["samples"], b["correct"], b["selected"], b["params_version"]] for b in report["batches"]]
    correct = np.zeros(len(stream.segments))
    seen = np.zeros(len(stream.segments))
    for start, n, ok, _, _ in batches:
        seg = stream.segment[start]
        correct[seg] += ok
        seen[seg] += n
    return {
        "mode": mode,
        "seed": seed,
        "accuracy": report["accuracy"],
        "segment_accuracy": {name: float(c / s) for name, c, s in zip(stream.segments, correct, seen) if s},
        "samples": report["predictions"],
        "selected_fraction": report["selected_fraction"],
        "uploaded_fraction": report["uploaded_fraction"],
        "bytes_up": report["bytes_up"],
        "bytes_down": report["bytes_down"],
        "params_version": report["params_version"],
        "cloud_updates": cloud_updates,
        "cloud_update_seconds": cloud_update_seconds,
        "mean_latency_ms": report["mean_latency_ms"],
        "seconds": seconds,
        "batches": batches,  # [start, samples, correct, selected, params version]
    }


def label_oracle(served: Any, stream: Stream, *, lr: float = 0.01, batch: int = 32) -> float:
    """Stream accuracy when the same norm parameters learn online from the TRUE labels (not deployable).

    Each batch is predicted, then one SGD step (momentum 0.9) of cross-entropy on it: what adapting
    only the norm parameters could gain on this stream with labels, a yardstick for the unsupervised gains.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in served.student_norm.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=0.9)
    name, correct = served.inputs[0].name, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, len(stream), batch):
            x, y = torch.from_numpy(stream.x[i : i + batch]), torch.from_numpy(stream.y[i : i + batch])
            logits = served.forward(served.student, params, {name: x})
            correct += int((logits.detach().argmax(1) == y).sum())
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(logits, y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return correct / len(stream)


def norm_headroom(
    served: Any, test: LabeledData, *, seed: int = 0, steps: int = 150, lr: float = 0.01, batch: int = 128
) -> list[dict[str, Any]]:
    """Per corruption and severity: accuracy with the served norm params vs norm params fitted to the TRUE labels.

    The whole test set is corrupted and split in halves (seeded); the norm parameters are fitted on one
    half (Adam, `steps` steps of `batch`) and both are scored on the other. An upper bound on what any
    adaptation of only the norm parameters can gain on that corruption: the check that a stream can
    show CEMA's effect at all (not deployable: it uses labels).
    """
    name = served.inputs[0].name
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(test), generator=gen)
    fit, held = order[: len(test) // 2], order[len(test) // 2 :]

    def accuracy(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((served.forward(served.student, params, {name: x}).argmax(1) == y).float().mean())

    rows = []
    for corruption in CORRUPTIONS:
        for severity in (1, 2):
            x = normalize_pixels(
                corrupt(
                    test.x * PIXEL_STD + PIXEL_MEAN,
                    corruption,
                    severity,
                    corruption_generator(seed, corruption, severity),
                )
            )
            params = {k: v.detach().clone().requires_grad_(True) for k, v in served.student_norm.items()}
            opt = torch.optim.Adam(list(params.values()), lr=lr)
            for _ in range(steps):
                idx = fit[torch.randint(0, len(fit), (batch,), generator=gen)]
                loss = F.cross_entropy(served.forward(served.student, params, {name: x[idx]}), test.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            rows.append(
                {
                    "corruption": corruption,
                    "severity": severity,
                    "in_stream": corruption in STREAM_CORRUPTIONS,
                    "served": accuracy(served.student_norm, x[held], test.y[held]),
                    "fitted": accuracy(params, x[held], test.y[held]),
                }
            )
            print(
                f"headroom {corruption}-{severity}: served {rows[-1]['served']:.3f} fitted {rows[-1]['fitted']:.3f}",
                flush=True,
            )
    return rows


def headroom_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per corruption, served vs label-fitted norm params and the gain."""
    lines = [
        "| corruption | in the stream | served norm params | fitted to the labels | headroom (pts) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corruption']}-{r['severity']} | {'yes' if r['in_stream'] else 'no'} | {r['served']:.3f} "
            f"| {r['fitted']:.3f} | {100 * (r['fitted'] - r['served']):+.1f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- cloud updates per second


def bench_cloud_updates(served: Any, cfg: RunConfig, x: np.ndarray, *, updates: int = 40, warmup: int = 4) -> dict:
    """Time `updates` CloudService updates in-process (no gRPC): one thread, full replay buffer, disk state.

    One update = `cloud.steps_per_update` CEMA steps on `new_per_step` new + `replay_per_step` replayed
    samples, then publishing the version (written to the state folder), as the learner thread does it.
    """
    from fairedge.server.cloud import CloudService

    per = cfg.cloud.new_per_step
    need = per * (updates + warmup)
    if len(x) < need:
        raise ValueError(f"need {need} samples for {updates}+{warmup} updates of {per}, got {len(x)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            service = CloudService(served, tmp, cfg.cloud, seed=0)  # not started: update() runs on this thread
            device = service.register("bench", served.model_id, served.model_version)
            for i in range(updates + warmup):
                service.upload("bench", i, {served.inputs[0].name: x[i * per : (i + 1) * per]})
            for _ in range(warmup):  # fills the replay buffer to replay_per_step
                service.update(device)
            times = []
            for _ in range(updates):
                t0 = time.perf_counter()
                service.update(device)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    median = statistics.median(times)
    return {
        "updates": updates,
        "median_s": median,
        "updates_per_s": 1 / median,
        "new_samples_per_s": per / median,
        "steps_per_update": cfg.cloud.steps_per_update,
        "new_per_step": per,
        "replay_per_step": cfg.cloud.replay_per_step,
        "threads": 1,
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------- tables and plot (pure)


def gains(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per seed: accuracy of each mode, gains over no adaptation, and gain_cema / gain_all."""
    by = {(r["mode"], r["seed"]): r for r in rows}
    out = {}
    for seed in sorted({r["seed"] for r in rows}):
        if not all((m, seed) in by for m in MODES):
            continue
        acc = {m: by[(m, seed)]["accuracy"] for m in MODES}
        g_cema, g_all = acc["cema"] - acc["none"], acc["all"] - acc["none"]
        out[seed] = {
            **{f"acc_{m}": a for m, a in acc.items()},
            "gain_cema": g_cema,
            "gain_all": g_all,
            "gain_ratio": g_cema / g_all if g_all > 0 else math.nan,
            "uploaded_cema": by[("cema", seed)]["uploaded_fraction"],
        }
    return out


def _ms(values: Sequence[float], fmt: str = "{:.4f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(sd)}"


def mode_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per mode, mean ± std over seeds."""
    lines = [
        "| mode | accuracy | uploaded fraction | bytes up / run | bytes down / run | cloud versions "
        "| wall s / run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        mean = {k: statistics.mean(r[k] for r in sel) for k in ("bytes_up", "bytes_down", "params_version", "seconds")}
        lines.append(
            f"| {mode} | {_ms([r['accuracy'] for r in sel])} | {_ms([r['uploaded_fraction'] for r in sel], '{:.3f}')} "
            f"| {mean['bytes_up']:,.0f} | {mean['bytes_down']:,.0f} | {mean['params_version']:.1f} "
            f"| {mean['seconds']:.1f} | {len(sel)} |"
        )
    return "\n".join(lines)


def gain_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per seed and mean: accuracies, gains over no adaptation (points), the gain ratio and CEMA's uploads."""
    g = gains(rows)
    lines = [
        "| seed | none | CEMA | all | gain CEMA (pts) | gain all (pts) | gain ratio CEMA/all | CEMA uploaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, v in g.items():
        lines.append(
            f"| {seed} | {v['acc_none']:.4f} | {v['acc_cema']:.4f} | {v['acc_all']:.4f} "
            f"| {100 * v['gain_cema']:+.2f} | {100 * v['gain_all']:+.2f} | {v['gain_ratio']:.2f} "
            f"| {v['uploaded_cema']:.1%} |"
        )
    if len(g) > 1:
        col = lambda k: [v[k] for v in g.values()]  # noqa: E731
        lines.append(
            f"| mean | {_ms(col('acc_none'))} | {_ms(col('acc_cema'))} | {_ms(col('acc_all'))} "
            f"| {_ms([100 * x for x in col('gain_cema')], '{:+.2f}')} "
            f"| {_ms([100 * x for x in col('gain_all')], '{:+.2f}')} | {_ratio_cell(col('gain_ratio'))} "
            f"| {_ms([100 * x for x in col('uploaded_cema')], '{:.1f}')} % |"
        )
    return "\n".join(lines)


def _ratio_cell(ratios: Sequence[float]) -> str:
    """Mean ± std of the defined gain ratios, saying over how many seeds when some are undefined."""
    defined = [r for r in ratios if not math.isnan(r)]
    return _ms(ratios, "{:.2f}") + (f" ({len(defined)} of {len(ratios)} seeds)" if len(defined) < len(ratios) else "")


def segment_table(rows: Sequence[dict[str, Any]], segments: Sequence[str]) -> str:
    """Accuracy per corruption segment (mean over seeds), one column per mode."""
    lines = ["| segment | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for seg in segments:
        cells = []
        for mode in MODES:
            vals = [r["segment_accuracy"][seg] for r in rows if r["mode"] == mode and seg in r["segment_accuracy"]]
            cells.append(f"{statistics.mean(vals):.4f}" if vals else "-")
        lines.append(f"| {seg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def windowed_accuracy(batches: Sequence[Sequence[int]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples seen, accuracy over the last `window` samples) after each batch of `[start, n, correct, ...]`."""
    n = np.array([b[1] for b in batches], dtype=float)
    ok = np.array([b[2] for b in batches], dtype=float)
    seen, hits = np.cumsum(n), np.cumsum(ok)
    acc = np.empty(len(n))
    for i, s in enumerate(seen):
        j = int(np.searchsorted(seen, s - window, side="right")) - 1  # last batch fully before the window
        base_n, base_ok = (seen[j], hits[j]) if j >= 0 else (0.0, 0.0)
        acc[i] = (hits[i] - base_ok) / (s - base_n)
    return seen, acc


def plot(
    rows: Sequence[dict[str, Any]],
    boundaries: Sequence[int],
    segments: Sequence[str],
    path: Path,
    *,
    window: int = 256,
    title: str = "",
) -> Path:
    """Windowed accuracy along the stream (mean over seeds) per mode, corruption boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gain, ax2) = plt.subplots(
        3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.5, 1]}
    )
    colors = {"none": "tab:gray", "cema": "tab:blue", "all": "tab:orange"}
    labels = {"none": "no adaptation", "cema": "CEMA", "all": "upload every sample"}
    mean_curve: dict[str, np.ndarray] = {}
    x = np.zeros(0)
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        curves = [windowed_accuracy(r["batches"], window) for r in sel]
        x = curves[0][0]
        mean_curve[mode] = np.mean([c[1] for c in curves], axis=0)
        ax.plot(
            x,
            mean_curve[mode],
            color=colors[mode],
            label=f"{labels[mode]} ({statistics.mean(r['accuracy'] for r in sel):.3f})",
        )
        if mode == "cema":
            picked = np.cumsum(np.mean([[b[3] for b in r["batches"]] for r in sel], axis=0))
            j = np.searchsorted(x, x - window, side="right") - 1  # last batch before each window
            before_n, before_k = np.where(j >= 0, x[j], 0.0), np.where(j >= 0, picked[j], 0.0)
            ax2.plot(
                x,
                (picked - before_k) / (x - before_n),
                color=colors[mode],
                label=f"CEMA: fraction uploaded (last {window} samples)",
            )
    for mode in ("cema", "all"):
        if mode in mean_curve and "none" in mean_curve:
            ax_gain.plot(x, 100 * (mean_curve[mode] - mean_curve["none"]), color=colors[mode], label=labels[mode])
    ax_gain.axhline(0, color=colors["none"], lw=0.8)
    ax_gain.set_ylabel("vs no adaptation\n(points)")
    ax_gain.legend(loc="lower left", fontsize=8)
    ax_gain.grid(alpha=0.3)
    for a in (ax, ax_gain, ax2):
        for b in boundaries[1:-1]:
            a.axvline(b, color="black", lw=0.6, ls=":")
    for name, lo, hi in zip(segments, boundaries[:-1], boundaries[1:]):
        ax.text((lo + hi) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"accuracy (last {window} samples)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_ylabel("uploaded")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("samples seen")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the study


def export_model(run_dir: Path) -> Path:
    """The run's merged model as ONNX (`<run_dir>/edge-study/model.onnx`, exported once per model version)."""
    from fairedge.common.edge_model import export_onnx, load_edge_info, load_merged_model

    path = run_dir / "edge-study" / "model.onnx"
    merged = load_merged_model(run_dir)
    if path.is_file() and load_edge_info(path).model_version == merged.model_version:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(merged, path)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())


def run_study(
    run_dir: Path,
    *,
    seeds: Sequence[int],
    per_segment: int,
    out: Path,
    overrides: Sequence[str] | None = None,
    tune: bool = False,
    teacher: Path | None = None,
    settings: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The seed-0 tuning, then every (seed, mode) run with the chosen setting; rows saved to `out`.

    `overrides`: run the seeds with these settings instead of the TUNING setting `chosen_setting` picks
    (then no tuning runs). `tune`: only the TUNING `settings` (default all) on seed 0.
    `teacher`: the run folder of the cloud's teacher (None: the served model teaches itself).
    A row already in `out` for the same model, teacher, stream and settings is reused, not run again.
    """
    from fairedge.common.edge_model import load_merged_model
    from fairedge.common.task import load_task
    from fairedge.server.cloud import load_served_model

    unknown = sorted(set(settings or []) - TUNING.keys())
    if unknown:
        raise ValueError(f"tuning settings {unknown}: allowed {sorted(TUNING)}")
    onnx_path = export_model(run_dir)
    served = load_served_model(run_dir, teacher=teacher)
    test = load_task(study_settings(run_dir, [])).test
    data = _load(out)
    teacher_info = (
        {"teacher": "self"}
        if teacher is None
        else {
            "teacher": os.path.relpath(teacher, ROOT),
            "teacher_model_version": load_merged_model(teacher).model_version,
        }
    )
    study = {
        "model_version": served.model_version,
        "per_segment": per_segment,
        "segments": [f"{n}-{s}" for n, s in SEGMENTS],
        "corruptions": CORRUPTIONS,
    } | teacher_info
    old = {"teacher": "self"} | data.get("study", {})  # files written before --teacher existed: self-taught
    if {k: old.get(k) for k in study} != study:
        data = {}  # another model, teacher or stream: start afresh
    cfg = load_config(run_dir / "config.toml")
    data.update(
        study=study
        | {
            "run_dir": os.path.relpath(run_dir, ROOT),
            "config_name": cfg.name,
            "config_hash": config_hash(cfg),
            "fixed": FIXED,
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="edge-study-"))

    def run_jobs(section: str, jobs: Sequence[tuple[str, Sequence[str], int, str]]) -> None:
        rows = data.setdefault(section, [])
        for label, ov, seed, mode in jobs:
            key = {"mode": mode, "seed": seed, "overrides": [] if mode == "none" else list(ov)}
            if any({k: r.get(k) for k in key} == key for r in rows):
                continue
            stream = build_stream(test, seed=seed, per_segment=per_segment)
            row = (
                run_stream(onnx_path, served, study_settings(run_dir, ov), stream, mode, seed, workdir)
                | key
                | {"setting": label}
            )
            rows.append(row)
            data["stream_boundaries"] = stream.boundaries()
            _save(out, data)
            print(
                f"{section}: {label:>12} seed {seed} {mode:>4}: accuracy {row['accuracy']:.4f}  uploaded "
                f"{row['uploaded_fraction']:.3f}  versions {row['params_version']}  {row['seconds']:.0f} s",
                flush=True,
            )

    try:
        if tune or overrides is None:
            run_jobs(
                "tuning",
                [
                    (label, ov, 0, mode)
                    for label, ov in TUNING.items()
                    if label in (settings or TUNING)
                    for mode in MODES
                ],
            )
        if tune:
            return data
        label = "given" if overrides is not None else chosen_setting(data["tuning"])
        overrides = list(overrides) if overrides is not None else TUNING[label]
        data["chosen"], data["overrides"] = label, overrides
        # rows of an earlier choice would mix into the per-seed gains
        data["rows"] = [r for r in data.get("rows", []) if r["mode"] == "none" or r["overrides"] == overrides]
        run_jobs("rows", [(label, overrides, seed, mode) for seed in seeds for mode in MODES])
        oracle = data.setdefault("label_oracle", {})
        teacher_acc = data.setdefault("teacher_stream_accuracy", {})
        for seed in seeds:
            if str(seed) not in oracle:
                oracle[str(seed)] = label_oracle(served, build_stream(test, seed=seed, per_segment=per_segment))
            if str(seed) not in teacher_acc:
                teacher_acc[str(seed)] = stream_accuracy(
                    served, build_stream(test, seed=seed, per_segment=per_segment), teacher=True
                )
        if teacher is None and "headroom" not in data:  # a property of the served model: once, in its own file
            data["headroom"] = norm_headroom(served, test)
        stream = build_stream(test, seed=seeds[0], per_segment=per_segment)
        data["cloud_updates_per_s"] = bench_cloud_updates(served, study_settings(run_dir, overrides), stream.x)
        _save(out, data)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return data


def tuning_table(rows: Sequence[dict[str, Any]], chosen: str | None = None) -> str:
    """Seed-0 tuning runs: one line per setting (none is the same for every setting), the chosen one in bold."""
    none = next((r["accuracy"] for r in rows if r["mode"] == "none"), math.nan)
    lines = [
        f"No adaptation: accuracy {none:.4f}.\n",
        "| setting | overrides | CEMA acc | all acc | gain CEMA (pts) | gain all (pts) | ratio | CEMA uploaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["setting"] for r in rows):
        by = {r["mode"]: r for r in rows if r["setting"] == label}
        if "cema" not in by or "all" not in by:
            continue
        c, a = by["cema"]["accuracy"], by["all"]["accuracy"]
        ratio = (c - none) / (a - none) if a > none else math.nan
        name = f"**{label}**" if label == chosen else label
        lines.append(
            f"| {name} | `{' '.join(by['cema']['overrides']) or '-'}` | {c:.4f} | {a:.4f} "
            f"| {100 * (c - none):+.2f} | {100 * (a - none):+.2f} | {ratio:.2f} "
            f"| {by['cema']['uploaded_fraction']:.1%} |"
        )
    return "\n".join(lines)


def _target_line(g: dict[int, dict[str, float]]) -> str:
    """Whether the issue's target is met: CEMA uploads at most half the stream and keeps 90 % of the gain."""
    if not g:
        return ""
    upload = statistics.mean(v["uploaded_cema"] for v in g.values())
    ratios = [v["gain_ratio"] for v in g.values()]
    ratio = statistics.mean(ratios)  # nan when uploading everything did not help on some seed
    met = upload <= 0.5 and ratio >= 0.9
    lost = [seed for seed, v in g.items() if math.isnan(v["gain_ratio"])]
    mean_all = statistics.mean(v["gain_all"] for v in g.values())
    mean_ratio = statistics.mean(v["gain_cema"] for v in g.values()) / mean_all if mean_all > 0 else math.nan
    lost_gains = ", ".join(f"{100 * g[s]['gain_all']:+.2f}" for s in lost)
    kept = (
        f"uploading everything gained nothing on seed(s) {', '.join(map(str, lost))} "
        f"({lost_gains} points), so there is no gain to keep "
        "there and the ratio is undefined (the mean row averages the other seeds only)"
        if lost
        else f"keeps {ratio:.2f} of the gain of uploading everything on average over seeds "
        f"({'at least' if ratio >= 0.9 else 'below'} the 0.9 asked for; per seed "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; the ratio of the mean gains is {mean_ratio:.2f})"
    )
    return (
        f"**Target {'met' if met else 'not met'}**: CEMA uploads {upload:.1%} of the stream on average "
        f"({'within' if upload <= 0.5 else 'above'} the 50 % budget); {kept}.\n"
    )


TEACHER_TEXT = {
    "self": "the served model itself (the issue's default): the cloud adapts a copy of the device's own model",
    "centralised": (
        "LoRA trained without Flower on the pooled training data of all clients (same model, rank, "
        "seeded initial adapter, steps and seeds as the federation; `trained_teacher(cfg, "
        "'centralised')`)"
    ),
    "foundation": (
        "a stand-in for a foundation model: the same centralised LoRA trained 2.5x longer "
        f"(`{' '.join(FOUNDATION_TRAINING)}`) on the pooled data plus {JITTER_COPIES} colour-jittered "
        f"copies of it (per image a contrast factor U{JITTER_CONTRAST} and a brightness factor "
        f"U{JITTER_BRIGHTNESS}; `photometric_jitter`), the kind of augmentation that makes large "
        "pre-trained models robust to lighting. The federation and the device's model never saw it; "
        "two of the stream's four corruptions (contrast, darken) are of the jittered kinds"
    ),
}


def teacher_section(teacher: str, data: dict[str, Any], *, command: str, plot_name: str) -> str:
    """The section of `edge.md` for one teacher: its chosen setting, per-seed and per-mode tables, plot, tuning."""
    study, rows = data["study"], data.get("rows", [])
    g = gains(rows)
    t_acc = data.get("teacher_stream_accuracy", {})
    origin = (
        ""
        if study["teacher"] == "self"
        else (
            f"`{study['teacher']}` (model version `{study.get('teacher_model_version', '?')}`, config "
            f"`{_teacher_hash(study['teacher'])}`; {_federated_accuracy(study['teacher'])})"
        )
    )
    parts = [
        f"## Teacher: {teacher}\n",
        f"Regenerate: `{command}`.\n",
        f"- Teacher: {TEACHER_TEXT.get(teacher, teacher)}{': ' + origin if origin else ''}. On the stream, without adaptation: "
        + ", ".join(f"seed {k}: {v:.4f}" for k, v in t_acc.items())
        + (f" (mean {statistics.mean(t_acc.values()):.4f})." if t_acc else "."),
        f"- Setting: **{data.get('chosen')}** (`{' '.join(data.get('overrides', [])) or 'none'}`), chosen on seed 0 by "
        "the rule in Setup (the tuning table below).\n",
        gain_table(rows) + "\n",
        _target_line(g),
        "Per mode (mean ± std over seeds; bytes are serialized gRPC messages, uplink = uploads + registration, "
        "downlink = parameter versions; cloud versions = parameter updates published):\n",
        mode_table(rows) + "\n",
        "Accuracy per segment (mean over seeds):\n",
        segment_table(rows, study["segments"]) + "\n",
        f"![accuracy along the stream, teacher {teacher}]({plot_name})\n",
        "Top: accuracy over the last 256 samples (mean over seeds); middle: the same minus no adaptation, in "
        "points; bottom: the fraction of those samples CEMA uploaded. Dotted lines: corruption boundaries.\n",
    ]
    if data.get("tuning"):
        parts += [
            f"### Settings tried on seed 0 (teacher {teacher})\n",
            tuning_table(data["tuning"], data.get("chosen")) + "\n",
        ]
    return "\n".join(parts)


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per teacher: chosen setting, mean accuracies, gains, ratio, uploads, target."""
    lines = [
        "| teacher | teacher acc on stream | setting | none | CEMA | all | gain CEMA (pts) | gain all (pts) "
        "| gain ratio | CEMA uploaded | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for teacher, data in results.items():
        g = gains(data.get("rows", []))
        if not g:
            continue
        col = lambda k: [v[k] for v in g.values()]  # noqa: E731, B023
        t_acc = data.get("teacher_stream_accuracy", {})
        upload, ratio = statistics.mean(col("uploaded_cema")), statistics.mean(col("gain_ratio"))
        met = upload <= 0.5 and ratio >= 0.9
        lines.append(
            f"| {teacher} | {statistics.mean(t_acc.values()):.4f} | {data.get('chosen')} "
            f"| {_ms(col('acc_none'))} | {_ms(col('acc_cema'))} | {_ms(col('acc_all'))} "
            f"| {_ms([100 * x for x in col('gain_cema')], '{:+.2f}')} "
            f"| {_ms([100 * x for x in col('gain_all')], '{:+.2f}')} | {_ratio_cell(col('gain_ratio'))} "
            f"| {100 * upload:.1f} % | {'met' if met else 'not met'} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, dict[str, Any]], *, command: str, latency: Path | None = None) -> str:
    """`edge.md`: setup, headroom, a summary over teachers, one section per teacher, reading, speed."""
    data = results["self"]
    study = data["study"]
    cfg = study_settings(ROOT / study["run_dir"], [])
    e, c = cfg.edge, cfg.cloud
    corruptions = "; ".join(f"{n} {v[0]} / {v[1]}" for n, v in study["corruptions"].items() if n in STREAM_CORRUPTIONS)
    seeds = sorted({r["seed"] for r in data.get("rows", [])})
    parts = [
        "# Edge adaptation with CEMA: results\n",
        f"Regenerate: `{command} --teacher T` for T in {', '.join(TEACHERS)} (each: the seed-0 tuning, the choice, "
        "then every seed; the federated model and the teachers are trained once and cached). Latency: "
        "`python -m fairedge.simulations.bench_edge_latency` (summarised below).\n",
        "## Setup\n",
        f"- Model: the federated global model of `{study['run_dir']}` (config `{study['config_name']}`, hash "
        f"`{study['config_hash']}`: {cfg.aggregation.method}, {cfg.federation.rounds} rounds, "
        f"{cfg.federation.num_clients} clients; {_federated_accuracy(study['run_dir'])}), LoRA merged, "
        f"exported to ONNX (model version `{study['model_version']}`). The device runs it; only its "
        "LayerNorm affine values (the exported norm inputs) change.",
        f"- Stream: {len(study['segments'])} segments of {study['per_segment']} digits test images each (a seeded draw "
        "over all six training domains: clean, rotated, inverted, noisy, blurred, thick), one corruption after "
        f"another, mild then severe: {', '.join(study['segments'])}. Strengths (mild / severe): {corruptions} "
        "(contrast: fraction of each image's deviation from its mean kept; brightness: added to every pixel, not "
        "clipped; darken: every pixel multiplied by it; pixelate: coarse grid cells per side; pixels on the [0, 1] "
        "scale). "
        "None of them is a training domain; they are the ones where norm parameters have headroom (next section). "
        "Batches of 32; no batch straddles two segments.",
        "- Modes: `none` (no adaptation), `cema` (CEMA selection), `all` (every sample uploaded), with the same "
        "cloud settings for both. Each run has its own `CloudService` on loopback gRPC (token auth, fresh state "
        "folder) and its own `EdgeRuntime` (fresh disk queue). After every batch the study waits until the uploads "
        "are acknowledged, the cloud has run every update they allow and the device runs the newest parameters, so "
        "each run is deterministic per seed.",
        f"- Seeds {seeds}: a seed draws the stream (images, corruption noise) and the cloud's replay sampling.",
        f"- Settings: the run's config (edge `e_min={e.e_min}`, `e_max={e.e_max}` of ln C, dynamic exclusion "
        f"{e.dynamic_exclusion}, warm-up {e.warmup_samples} samples; cloud SGD lr {c.lr}, teacher lr {c.teacher_lr}, "
        f"momentum {c.momentum}, {c.steps_per_update} step per update of {c.new_per_step} new + {c.replay_per_step} "
        f"replayed samples, loss weights entropy/KL/CE {c.entropy_weight}/{c.kl_weight}/{c.ce_weight}: the public "
        f"CEMA code's values) plus study plumbing `{' '.join(study['fixed'])}` plus one TUNING setting per teacher, "
        f"chosen on seed 0 by the rule: {CHOICE_RULE}. Seed 0's figures are therefore tuned on its own stream; "
        "seeds 1 and 2 are not.",
        "- Teachers: " + "; ".join(f"**{t}**: {TEACHER_TEXT[t]}" for t in TEACHERS if t in results) + ".\n",
        _runtime_line(results),
    ]
    if data.get("headroom"):
        parts += [
            "## Headroom: what the norm parameters can gain at all\n",
            "Not deployable (uses the labels), run first to pick a stream that can show CEMA's effect: the "
            "whole test set under each corruption, split in halves; the served model's norm parameters fitted "
            "to the true labels on one half (Adam lr 0.01, 150 steps of 128) and scored on the other "
            "(`norm_headroom`).\n",
            headroom_table(data["headroom"]) + "\n",
            _oracle_line(data.get("label_oracle", {}), gains(data.get("rows", []))),
        ]
    parts += [
        "## Summary\n",
        "Accuracy over the whole stream, mean ± std over seeds; gains in points over no adaptation (same "
        "seed). Target (issue 5): CEMA uploads ≤ 50 % of the stream and keeps ≥ 90 % of the gain of "
        "uploading everything.\n",
        summary_table(results) + "\n",
        _reading(results),
    ]
    for teacher, other in results.items():
        if other.get("rows"):
            parts.append(
                teacher_section(
                    teacher, other, command=f"{command} --teacher {teacher}", plot_name=f"{OUTPUTS[teacher]}.png"
                )
            )
    bench = data.get("cloud_updates_per_s")
    if bench:
        parts += [
            "## Cloud updates per second\n",
            f"`CloudService.update` in-process (no gRPC), one torch thread, {bench['steps_per_update']} step(s) "
            f"per update of {bench['new_per_step']} new + {bench['replay_per_step']} replayed samples (teacher "
            "step + student distillation), parameters published to the state folder; median of "
            f"{bench['updates']}: **{bench['updates_per_s']:.1f} updates/s** ({1e3 * bench['median_s']:.1f} ms "
            f"each, {bench['new_samples_per_s']:.0f} new samples/s) on a {bench['cpu_count']}-core machine "
            f"shared with other jobs (1-minute load average {bench['load_average_1min']:.1f} when measured).\n",
        ]
    if latency is not None and latency.is_file():
        parts += [
            "## Latency (summary of [edge_latency.md](edge_latency.md))\n",
            "Measured by `python -m fairedge.simulations.bench_edge_latency`, not by this study; its latency and "
            "swap-vs-rebuild tables as they were when this file was written (parity, int8 quality and the "
            "models are in the linked file).\n",
            latency_summary(latency.read_text()) + "\n",
        ]
    return "\n".join(parts)


def latency_summary(text: str, keep: Sequence[str] = ("Latency", "Swapping")) -> str:
    """The intro and the `## ` sections of the latency report whose titles start with `keep`, one level down."""
    sections: list[list[str]] = [[]]
    for line in text.strip().splitlines()[1:]:  # the first line is the report's own title
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    chosen = [sections[0]] + [s for s in sections[1:] if s[0][3:].startswith(tuple(keep))]
    return "\n".join(("#" + line) if line.startswith("#") else line for sec in chosen for line in sec).strip()


def _teacher_hash(run_dir: str) -> str:
    """The config hash of a teacher's run folder (its cache key)."""
    path = ROOT / run_dir / "config.toml"
    return config_hash(load_config(path)) if path.is_file() else "?"


def _federated_accuracy(run_dir: str) -> str:
    """The trained model's own mean test accuracy over the uncorrupted domains, from its metrics.json."""
    metrics = ROOT / run_dir / "metrics.json"
    acc = json.loads(metrics.read_text())["summary"].get("final_mean_accuracy") if metrics.is_file() else None
    return f"mean accuracy {acc:.3f} on the uncorrupted test domains" if acc is not None else "accuracy unknown"


def _runtime_line(results: dict[str, dict[str, Any]]) -> str:
    """Where the study's time went (wall seconds of the edge runs per teacher, and of training the model once)."""
    data = results["self"]
    metrics = ROOT / data["study"]["run_dir"] / "metrics.json"
    train = json.loads(metrics.read_text())["summary"].get("wall_seconds") if metrics.is_file() else None
    cells = [
        f"{t} {len(d.get('rows', [])) + len(d.get('tuning', []))} runs "
        f"{sum(r['seconds'] for r in d.get('rows', []) + d.get('tuning', [])) / 60:.1f} min"
        for t, d in results.items()
    ]
    return (
        f"- Time on this shared 2-core machine (edge + cloud, lockstep, tuning included): {', '.join(cells)}"
        + (f"; training the federated model once {train / 60:.1f} min (cached afterwards)" if train else "")
        + ".\n"
    )


def _reading(results: dict[str, dict[str, Any]]) -> str:
    """What the numbers say, computed from them."""
    lines = ["Reading:\n"]
    for teacher, data in results.items():
        g = gains(data.get("rows", []))
        if not g:
            continue
        t_acc = statistics.mean(data.get("teacher_stream_accuracy", {"-": math.nan}).values())
        served = statistics.mean(v["acc_none"] for v in g.values())
        g_cema = statistics.mean(v["gain_cema"] for v in g.values())
        g_all = statistics.mean(v["gain_all"] for v in g.values())
        wins = sum(v["gain_all"] > 0 for v in g.values())
        lines.append(
            f"- Teacher {teacher} ({t_acc:.3f} on the stream, the served model {served:.3f}): uploading "
            f"everything {100 * g_all:+.2f} points (positive on {wins} of {len(g)} seeds), CEMA "
            f"{100 * g_cema:+.2f}."
        )
    found = results.get("foundation", {}).get("tuning", [])
    none0 = next((r["accuracy"] for r in found if r["mode"] == "none"), None)
    by = {(r["setting"], r["mode"]): r for r in found}
    narrow, wide = ("KL, frozen teacher", "cema"), ("KL, frozen teacher, E_max 0.7", "cema")
    if none0 is not None and narrow in by and wide in by:
        lines.append(
            f"- The upper threshold matters once the teacher is better than the device: on seed 0 with the "
            f"foundation teacher, the paper's starting E_max = 0.4 ln C uploads {by[narrow]['uploaded_fraction']:.1%}"
            f" and gains {100 * (by[narrow]['accuracy'] - none0):+.2f} points, E_max = 0.7 ln C uploads "
            f"{by[wide]['uploaded_fraction']:.1%} and gains {100 * (by[wide]['accuracy'] - none0):+.2f}. The "
            "device's high-entropy samples are where it is most often wrong and where a robust teacher still "
            "labels well; the exclusion is there to keep unreliable samples out of entropy minimisation, "
            "while distillation from a stronger model learns most from them."
        )
    lines.append(
        "- A weak teacher cannot help: the self-taught and centralised rows gain little or lose, since their "
        "pseudo-labels on the corrupted stream are barely better than the device's own.\n"
    )
    return "\n".join(lines)


def _oracle_line(oracle: dict[str, float], g: dict[int, dict[str, float]]) -> str:
    """The online label yardstick per seed, as a gain over no adaptation."""
    cells = [
        f"seed {seed}: {acc:.4f} ({100 * (acc - g[int(seed)]['acc_none']):+.2f} pts)"
        for seed, acc in oracle.items()
        if int(seed) in g
    ]
    if not cells:
        return ""
    return (
        "Online on the stream itself, the same norm parameters learning from the true labels with the "
        "cloud's own budget (`label_oracle`: predict a batch, then one SGD step of cross-entropy, lr 0.01, "
        "momentum 0.9) reach " + "; ".join(cells) + ": one pass of 384 samples per corruption is far from the "
        "fitted values above.\n"
    )


OUTPUTS = {
    "self": "edge_stream",
    "centralised": "edge_stream_centralised-teacher",
    "foundation": "edge_stream_foundation-teacher",
}
"""Result files (.json, .png under RESULTS) per teacher."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished run folder (default: train or reuse one)")
    parser.add_argument("--config", default=str(CONFIG), help="config to train when --run is not given")
    parser.add_argument("--method", default="fedit", help="aggregation method to train (default: %(default)s)")
    parser.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="self",
        help="the cloud's teacher: the served model itself, LoRA trained centrally on the "
        "pooled client data, or that trained longer with colour jitter (trained once with --config, cached) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="overrides of the teacher's training config (e.g. federation.rounds=3)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-segment", type=int, default=384, help="test images per corruption segment")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="SECTION.FIELD=VALUE",
        help="edge/cloud settings for every seed (default: the TUNING setting chosen on seed 0)",
    )
    parser.add_argument("--tune", action="store_true", help="run the TUNING settings on seed 0 only")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="LABEL",
        help=f"with --tune: only these TUNING settings (default: all of {list(TUNING)})",
    )
    args = parser.parse_args()
    started = time.time()
    cfg = study_config(args.config, args.method)
    run_dir = Path(args.run) if args.run else trained_run(cfg)
    teacher = teacher_run(
        args.teacher, load_config(args.config, [f"aggregation.method={args.method}", *args.teacher_set])
    )
    out = RESULTS / f"{OUTPUTS[args.teacher]}.json"
    data = run_study(
        run_dir,
        seeds=args.seeds,
        per_segment=args.per_segment,
        overrides=args.set,
        out=out,
        tune=args.tune,
        teacher=teacher,
        settings=args.settings,
    )
    if args.tune:
        print(tuning_table(data["tuning"]))
    if data.get("rows"):
        plot(
            data["rows"],
            data["stream_boundaries"],
            data["study"]["segments"],
            RESULTS / f"{OUTPUTS[args.teacher]}.png",
            title=f"CEMA on a corrupted digits stream ({data['study']['config_name']}, config "
            f"{data['study']['config_hash']}, teacher {args.teacher}, "
            f"seeds {sorted({r['seed'] for r in data['rows']})})",
        )
        print(gain_table(data["rows"]))
    try:
        write_report(args.run)
    except Exception as err:
        print(f"edge.md not written: {err!r}")
    print(f"done in {time.time() - started:.0f} s")


def write_report(run: str | None = None) -> Path | None:
    """`edge.md` from every teacher's result file (nothing without the self-teacher study)."""
    results = {t: _load(RESULTS / f"{name}.json") for t, name in OUTPUTS.items()}
    results = {t: d for t, d in results.items() if d.get("rows")}
    if "self" not in results:
        return None
    results = {"self": results.pop("self"), **results}
    path = RESULTS / "edge.md"
    command = "python -m fairedge.simulations.edge_study" + (f" --run {run}" if run else "")
    path.write_text(markdown(results, command=command, latency=RESULTS / "edge_latency.md"))
    return path


if __name__ == "__main__":
    main()
