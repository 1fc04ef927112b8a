"""CEMA on a drifting edge stream: no adaptation vs CEMA vs uploading every sample (issue 5, study 1).

    python -m simulations.edge_study [--run RUN_DIR] [--seeds 0 1 2] [--per-segment 384]
    python -m simulations.edge_study --tune          # the seed-0 settings search (TUNING -> CHOSEN)
    python -m simulations.edge_study --teacher centralised [--teacher-set federation.rounds=3]

The federated model (`--run`, or by default `simulations/configs/default.toml` trained here once
and cached as `runs/edge-study-<config hash>/`) is merged, exported to ONNX, and run by the real
edge runtime (`client.edge.EdgeRuntime`) against a real CEMA cloud service
(`server.cloud.CloudService`) on loopback gRPC with token auth, a fresh state and queue folder
per run. The stream is the task's test images (all six domains the federation trained on)
under corruptions it never trained on, one corruption after another, mild then severe (the
paper streams one ImageNet-C corruption after another): `SEGMENTS`. Each run steps in lockstep
with the cloud (after each batch: uploads acknowledged, every possible update done, the new
parameters swapped in), so a run is deterministic per seed and independent of thread timing.

A seed draws the stream (which test images, their order, the corruption noise) and the
cloud's replay sampling; the trained model is the same for every seed. Edge and cloud
settings are the run's config plus DEFAULT_SETTING, chosen from TUNING on seed 0 only.
A label oracle (norm parameters learning from the true labels) measures the headroom.
The cloud's teacher is the served model itself (`--teacher self`, the issue's default) or a
stronger one (`--teacher centralised`: LoRA trained on the pooled client data, cached as
`runs/edge-teacher-centralised-<config hash>/`); each teacher has its own result files.

Writes `simulations/results/edge_stream.json` (every run, per-batch records), `edge_stream.png`
(accuracy along the stream), `edge_stream_centralised-teacher.{json,png}` for the stronger teacher,
and `edge.md` (tables of both; plus a summary of `edge_latency.md` when the latency benchmark has
written it).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.atomic_files import atomic_write_bytes
from common.config import RunConfig, config_hash, load_config
from common.data.task_data import PIXEL_MEAN, PIXEL_STD, LabeledData, normalize_pixels

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
    "pixelate": (6, 4),  # average over a coarse grid of this many cells per side, then blow up (16 px images)
    "salt_pepper": (0.10, 0.22),  # fraction of pixels set to black or white
    "occlusion": (6, 9),  # side (px) of a mid-grey square at a random place
}
SEGMENTS: list[tuple[str, int]] = [(name, sev) for name in CORRUPTIONS for sev in (1, 2)]
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
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1)))
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
    return Stream(torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(segs).numpy(), torch.cat(doms).numpy(),
                  [f"{name}-{sev}" for name, sev in SEGMENTS])


# ---------------------------------------------------------------- the federated model


def study_config(config: str | Path = CONFIG, method: str = "fedit") -> RunConfig:
    """The federated run the study adapts: `config` with `aggregation.method = method`."""
    return load_config(config, [f"aggregation.method={method}"])


def trained_run(cfg: RunConfig) -> Path:
    """`runs/edge-study-<config hash>/`: trained with `simulate` once (in-process engine), then reused."""
    from simulations.simulate import simulate

    run_dir = ROOT / cfg.output_dir / f"edge-study-{config_hash(cfg)}"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"training the federated model ({cfg.name}, {cfg.aggregation.method}, {cfg.federation.rounds} rounds) "
          f"-> {run_dir}", flush=True)
    simulate(cfg, partial, engine="inprocess")
    partial.rename(run_dir)
    return run_dir


def centralised_teacher(cfg: RunConfig) -> Path:
    """`runs/edge-teacher-centralised-<config hash>/`: a stronger teacher, LoRA trained on all clients' data pooled.

    Trained by `simulations.aggregation_study.centralised` (same model, seeded adapter, steps and seeds as
    the federation, no Flower) and saved as a run folder (`write_outputs`: config.toml, adapter/,
    metrics.json) that `load_served_model(..., teacher=)` reads.
    """
    from server.run_outputs import write_outputs
    from simulations.aggregation_study import centralised

    run_dir = ROOT / cfg.output_dir / f"edge-teacher-centralised-{config_hash(cfg)}"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"training the centralised teacher ({cfg.name}, {cfg.federation.rounds} rounds on the pooled data) "
          f"-> {run_dir}", flush=True)
    record, model = centralised(cfg, curve=False)  # evaluated once, at the end: a teacher, not a learning curve
    record.run_dir = partial
    write_outputs(record, model)
    partial.rename(run_dir)
    return run_dir


TEACHERS = ("self", "centralised")
"""`--teacher`: the served model teaches itself (the issue's default), or the centralised model does."""


def teacher_run(teacher: str, cfg: RunConfig) -> Path | None:
    """The run folder of the teacher (None: the served model itself)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r}: allowed {TEACHERS}")
    return None if teacher == "self" else centralised_teacher(cfg)


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

FIXED = ["edge.batch_size=32", "edge.upload_batch_size=32", "edge.threads=1", "edge.backoff_initial_s=0.05",
         "edge.backoff_max_s=1.0", "cloud.threads=1"]
"""Study plumbing, not tuned: one thread each side (2 shared cores), quick retries on loopback."""

TUNING: dict[str, list[str]] = {
    "defaults": [],  # the public CEMA code's values (common.config)
    "teacher lr x10": ["cloud.teacher_lr=0.0025"],
    "student lr x4": ["cloud.lr=0.01", "cloud.teacher_lr=0.0025"],
    "KL only": ["cloud.entropy_weight=0", "cloud.ce_weight=0", "cloud.lr=0.01", "cloud.teacher_lr=0.0025"],
    "cautious": ["cloud.e_max=0.2", "cloud.lr=0.001"],
    "narrow window": ["edge.e_max=0.3"],
}
"""Settings tried on the tuning seed (0) only, with `--tune`; the choice becomes DEFAULT_SETTING."""

CHOSEN = "KL only"
CHOICE_RULE = ("the setting in which uploading every sample gains the most over no adaptation (the target's gain "
               "ratio means something only when that gain is positive)")
DEFAULT_SETTING: list[str] = TUNING[CHOSEN]
"""The settings the study runs on every seed, on top of the run's config and FIXED."""
CHOSEN_BY_TEACHER = {"self": CHOSEN, "centralised": "cautious"}
"""Per teacher, the TUNING setting chosen by CHOICE_RULE on seed 0 with that teacher (`--teacher T --tune`)."""


def study_settings(run_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The run's own config with FIXED and `overrides` applied (edge and cloud sections)."""
    return load_config(run_dir / "config.toml", [*FIXED, *overrides])


def run_stream(onnx_path: Path, served: Any, cfg: RunConfig, stream: Stream, mode: str, seed: int,
               workdir: Path) -> dict[str, Any]:
    """Stream through an EdgeRuntime (select = `mode`) talking gRPC to a fresh CloudService; one result row."""
    from client.edge import CloudEndpoint, EdgeRuntime
    from server.cloud import CloudService

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: allowed {MODES}")
    batch = cfg.edge.batch_size
    if len(stream) % batch or stream.boundaries()[1] % batch:
        raise ValueError(f"segments of {stream.boundaries()[1]} samples must be a multiple of edge.batch_size={batch}, "
                         "so that no batch straddles two corruptions")
    device_id = f"study-{mode}-{seed}"
    edge_cfg = cfg.edge.model_copy(update={"select": mode})
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{mode}-{seed}-") as tmp:
        service = CloudService(served, Path(tmp) / "state", cfg.cloud, tokens=[TOKEN], seed=seed)
        address = service.start(port=0)
        try:
            with EdgeRuntime(onnx_path, edge_cfg, cloud=CloudEndpoint(address, TOKEN), device_id=device_id,
                             queue_dir=Path(tmp) / "queue") as rt:

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
                report = rt.run(((stream.x[i : i + batch], stream.y[i : i + batch])
                                 for i in range(0, len(stream), batch)), after_batch=lockstep)
                seconds = time.perf_counter() - started
        finally:
            service.stop()
    return result_row(report, stream, mode=mode, seed=seed, seconds=seconds,
                      cloud_update_seconds=service.log.seconds, cloud_updates=service.log.updates)


def _wait(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def result_row(report: dict[str, Any], stream: Stream, *, mode: str, seed: int, seconds: float,
               cloud_update_seconds: float = 0.0, cloud_updates: int = 0) -> dict[str, Any]:
    """The JSON row of one run: overall and per-segment accuracy, uploads, bytes, per-batch records."""
    batches = [[b["start"], b["samples"], b["correct"], b["selected"], b["params_version"]] for b in report["batches"]]
    correct = np.zeros(len(stream.segments))
    seen = np.zeros(len(stream.segments))
    for start, n, ok, _, _ in batches:
        seg = stream.segment[start]
        correct[seg] += ok
        seen[seg] += n
    return {
        "mode": mode, "seed": seed,
        "accuracy": report["accuracy"],
        "segment_accuracy": {name: float(c / s) for name, c, s in zip(stream.segments, correct, seen) if s},
        "samples": report["predictions"],
        "selected_fraction": report["selected_fraction"],
        "uploaded_fraction": report["uploaded_fraction"],
        "bytes_up": report["bytes_up"], "bytes_down": report["bytes_down"],
        "params_version": report["params_version"],
        "cloud_updates": cloud_updates, "cloud_update_seconds": cloud_update_seconds,
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


# ---------------------------------------------------------------- cloud updates per second


def bench_cloud_updates(served: Any, cfg: RunConfig, x: np.ndarray, *, updates: int = 40, warmup: int = 4) -> dict:
    """Time `updates` CloudService updates in-process (no gRPC): one thread, full replay buffer, disk state.

    One update = `cloud.steps_per_update` CEMA steps on `new_per_step` new + `replay_per_step` replayed
    samples, then publishing the version (written to the state folder), as the learner thread does it.
    """
    from server.cloud import CloudService

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
    return {"updates": updates, "median_s": median, "updates_per_s": 1 / median,
            "new_samples_per_s": per / median, "steps_per_update": cfg.cloud.steps_per_update,
            "new_per_step": per, "replay_per_step": cfg.cloud.replay_per_step, "threads": 1,
            "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}


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
        out[seed] = {**{f"acc_{m}": a for m, a in acc.items()}, "gain_cema": g_cema, "gain_all": g_all,
                     "gain_ratio": g_cema / g_all if g_all > 0 else math.nan,
                     "uploaded_cema": by[("cema", seed)]["uploaded_fraction"]}
    return out


def _ms(values: Sequence[float], fmt: str = "{:.4f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(sd)}"


def mode_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per mode, mean ± std over seeds."""
    lines = ["| mode | accuracy | uploaded fraction | bytes up / run | bytes down / run | cloud versions "
             "| wall s / run | seeds |", "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        mean = {k: statistics.mean(r[k] for r in sel) for k in ("bytes_up", "bytes_down", "params_version", "seconds")}
        lines.append(
            f"| {mode} | {_ms([r['accuracy'] for r in sel])} | {_ms([r['uploaded_fraction'] for r in sel], '{:.3f}')} "
            f"| {mean['bytes_up']:,.0f} | {mean['bytes_down']:,.0f} | {mean['params_version']:.1f} "
            f"| {mean['seconds']:.1f} | {len(sel)} |")
    return "\n".join(lines)


def gain_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per seed and mean: accuracies, gains over no adaptation (points), the gain ratio and CEMA's uploads."""
    g = gains(rows)
    lines = ["| seed | none | CEMA | all | gain CEMA (pts) | gain all (pts) | gain ratio CEMA/all | CEMA uploaded |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, v in g.items():
        lines.append(f"| {seed} | {v['acc_none']:.4f} | {v['acc_cema']:.4f} | {v['acc_all']:.4f} "
                     f"| {100 * v['gain_cema']:+.2f} | {100 * v['gain_all']:+.2f} | {v['gain_ratio']:.2f} "
                     f"| {v['uploaded_cema']:.1%} |")
    if len(g) > 1:
        col = lambda k: [v[k] for v in g.values()]  # noqa: E731
        lines.append(f"| mean | {_ms(col('acc_none'))} | {_ms(col('acc_cema'))} | {_ms(col('acc_all'))} "
                     f"| {_ms([100 * x for x in col('gain_cema')], '{:+.2f}')} "
                     f"| {_ms([100 * x for x in col('gain_all')], '{:+.2f}')} | {_ratio_cell(col('gain_ratio'))} "
                     f"| {_ms([100 * x for x in col('uploaded_cema')], '{:.1f}')} % |")
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


def plot(rows: Sequence[dict[str, Any]], boundaries: Sequence[int], segments: Sequence[str], path: Path,
         *, window: int = 256, title: str = "") -> Path:
    """Windowed accuracy along the stream (mean over seeds) per mode, corruption boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gain, ax2) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 1.5, 1]})
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
        ax.plot(x, mean_curve[mode], color=colors[mode],
                label=f"{labels[mode]} ({statistics.mean(r['accuracy'] for r in sel):.3f})")
        if mode == "cema":
            picked = np.cumsum(np.mean([[b[3] for b in r["batches"]] for r in sel], axis=0))
            j = np.searchsorted(x, x - window, side="right") - 1  # last batch before each window
            before_n, before_k = np.where(j >= 0, x[j], 0.0), np.where(j >= 0, picked[j], 0.0)
            ax2.plot(x, (picked - before_k) / (x - before_n), color=colors[mode],
                     label=f"CEMA: fraction uploaded (last {window} samples)")
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
    from common.edge_model import export_onnx, load_edge_info, load_merged_model

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


def run_study(run_dir: Path, *, seeds: Sequence[int], per_segment: int, overrides: Sequence[str], out: Path,
              tune: bool = False, teacher: Path | None = None, settings: Sequence[str] | None = None) -> dict[str, Any]:
    """Every (seed, mode) run, or with `tune` the TUNING `settings` (default all) on seed 0; rows saved to `out`.

    `teacher`: the run folder of the cloud's teacher (None: the served model teaches itself).
    A row already in `out` for the same model, teacher, stream size and settings is reused, not run again.
    """
    from common.edge_model import load_merged_model
    from common.task import load_task
    from server.cloud import load_served_model

    onnx_path = export_model(run_dir)
    served = load_served_model(run_dir, teacher=teacher)
    cfg = study_settings(run_dir, overrides)
    test = load_task(cfg).test
    data = _load(out)
    teacher_info = {"teacher": "self"} if teacher is None else {
        "teacher": os.path.relpath(teacher, ROOT), "teacher_model_version": load_merged_model(teacher).model_version}
    study = {"model_version": served.model_version, "per_segment": per_segment} | teacher_info
    old = {"teacher": "self"} | data.get("study", {})  # files written before --teacher existed: self-taught
    if {k: old.get(k) for k in study} != study:
        data = {"tuning": data.get("tuning", []) if data.get("study", {}).get("model_version") == served.model_version
                else []}
    data.update(study=study | {"run_dir": os.path.relpath(run_dir, ROOT), "config_name": cfg.name,
                               "config_hash": config_hash(load_config(run_dir / "config.toml")),
                               "fixed": FIXED, "segments": [f"{n}-{s}" for n, s in SEGMENTS],
                               "corruptions": CORRUPTIONS})
    workdir = Path(tempfile.mkdtemp(prefix="edge-study-"))
    try:
        unknown = sorted(set(settings or []) - TUNING.keys())
        if unknown:
            raise ValueError(f"tuning settings {unknown}: allowed {sorted(TUNING)}")
        jobs = ([(label, ov, 0, mode) for label, ov in TUNING.items() if label in (settings or TUNING)
                 for mode in MODES]
                if tune else [("study", list(overrides), seed, mode) for seed in seeds for mode in MODES])
        section = "tuning" if tune else "rows"
        rows = data.setdefault(section, [])
        for label, ov, seed, mode in jobs:
            key = {"mode": mode, "seed": seed, "overrides": [] if mode == "none" else list(ov)}
            if any({k: r.get(k) for k in key} == key for r in rows):
                continue
            run_cfg = study_settings(run_dir, ov)
            stream = build_stream(test, seed=seed, per_segment=per_segment)
            row = run_stream(onnx_path, served, run_cfg, stream, mode, seed, workdir) | key | {"setting": label}
            rows.append(row)
            data["stream_boundaries"] = stream.boundaries()
            _save(out, data)
            print(f"{section}: {label:>12} seed {seed} {mode:>4}: accuracy {row['accuracy']:.4f}  uploaded "
                  f"{row['uploaded_fraction']:.3f}  versions {row['params_version']}  {row['seconds']:.0f} s",
                  flush=True)
        if not tune:
            oracle = data.setdefault("label_oracle", {})
            teacher_acc = data.setdefault("teacher_stream_accuracy", {})
            for seed in seeds:
                if str(seed) not in oracle:
                    oracle[str(seed)] = label_oracle(served, build_stream(test, seed=seed, per_segment=per_segment))
                if str(seed) not in teacher_acc:
                    teacher_acc[str(seed)] = stream_accuracy(
                        served, build_stream(test, seed=seed, per_segment=per_segment), teacher=True)
            stream = build_stream(test, seed=seeds[0], per_segment=per_segment)
            data["cloud_updates_per_s"] = bench_cloud_updates(served, cfg, stream.x)
            data["overrides"] = list(overrides)
            _save(out, data)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return data


def tuning_table(rows: Sequence[dict[str, Any]]) -> str:
    """Seed-0 tuning runs: one line per setting (none is the same for every setting)."""
    none = next((r["accuracy"] for r in rows if r["mode"] == "none"), math.nan)
    lines = [f"No adaptation: accuracy {none:.4f}.\n",
             "| setting | overrides | CEMA acc | all acc | gain CEMA (pts) | gain all (pts) | ratio | CEMA uploaded |",
             "|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["setting"] for r in rows):
        by = {r["mode"]: r for r in rows if r["setting"] == label}
        if "cema" not in by or "all" not in by:
            continue
        c, a = by["cema"]["accuracy"], by["all"]["accuracy"]
        ratio = (c - none) / (a - none) if a > none else math.nan
        lines.append(f"| {label} | `{' '.join(by['cema']['overrides']) or '-'}` | {c:.4f} | {a:.4f} "
                     f"| {100 * (c - none):+.2f} | {100 * (a - none):+.2f} | {ratio:.2f} "
                     f"| {by['cema']['uploaded_fraction']:.1%} |")
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
    lost_gains = ", ".join(f"{100 * g[s]['gain_all']:+.2f}" for s in lost)
    kept = (f"uploading everything gained nothing on seed(s) {', '.join(map(str, lost))} "
            f"({lost_gains} points), so there is no gain to keep "
            "there and the ratio is undefined (the mean row averages the other seeds only)" if lost else
            f"keeps {ratio:.2f} of the gain of uploading everything ({'at least' if ratio >= 0.9 else 'below'} "
            "the 0.9 asked for)")
    return (f"**Target {'met' if met else 'not met'}**: CEMA uploads {upload:.1%} of the stream on average "
            f"({'within' if upload <= 0.5 else 'above'} the 50 % budget); {kept}.\n")


def teacher_section(data: dict[str, Any], *, command: str, tune_command: str, plot_name: str) -> str:
    """The section of `edge.md` for a run of the study with another teacher than the served model itself."""
    study, rows = data["study"], data.get("rows", [])
    g = gains(rows)
    served_acc = statistics.mean(v["acc_none"] for v in g.values()) if g else math.nan
    t_acc = data.get("teacher_stream_accuracy", {})
    t_cfg = ROOT / study["teacher"] / "config.toml"
    rounds = ""
    if t_cfg.is_file() and (ROOT / study["run_dir"] / "config.toml").is_file():
        t, fed = load_config(t_cfg).federation, load_config(ROOT / study["run_dir"] / "config.toml").federation
        rounds = (f" {t.rounds} rounds of {t.local_steps * t.num_clients} steps (the federation: {fed.rounds} rounds "
                  f"of {fed.local_steps} steps on each of {fed.num_clients} clients),")
    parts = [
        "## A stronger teacher: centralised LoRA\n",
        f"Regenerate: `{command}` (trains the teacher once, cached) and `{tune_command}` (seed 0 only).\n",
        f"- Teacher: `{study['teacher']}` (model version `{study.get('teacher_model_version', '?')}`), LoRA trained "
        f"without Flower on the pooled training data of all clients,{rounds} with the model, rank, seeded initial "
        "adapter, steps per round and seeds of `simulations.aggregation_study.centralised` (`centralised_teacher`, "
        f"config `{_teacher_hash(study['teacher'])}`); {_federated_accuracy(study['teacher'])} (the federated model: "
        f"{_federated_accuracy(study['run_dir']).replace('mean accuracy ', '')}). On the stream, without "
        "adaptation: " + ", ".join(f"seed {s}: {a:.4f}" for s, a in t_acc.items())
        + (f" (mean {statistics.mean(t_acc.values()):.4f}; the served model {served_acc:.4f})." if t_acc else "."),
        "- Everything else as above: the same served model (the federated one, which the device runs), stream, "
        f"seeds and lockstep. Settings: `{' '.join(data.get('overrides', [])) or 'none'}` "
        f"(**{CHOSEN_BY_TEACHER['centralised']}**, chosen on seed 0 with this teacher by the same rule: "
        f"{CHOICE_RULE}; see the settings table below). The cloud's teacher adapts its own norm parameters "
        "(teacher lr) on the uploads and the student distils from it.\n",
        gain_table(rows) + "\n",
        _target_line(g),
        "Per mode (mean ± std over seeds):\n",
        mode_table(rows) + "\n",
        "Accuracy per segment (mean over seeds):\n",
        segment_table(rows, study["segments"]) + "\n",
        f"![accuracy along the stream, centralised teacher]({plot_name})\n",
        _teacher_reading(data, g),
    ]
    if data.get("tuning"):
        parts += ["### Settings on seed 0 with this teacher\n",
                  "The same TUNING settings as for the self-taught study, seed 0 only (so seed 0's figures above "
                  "are tuned on its own stream; seeds 1 and 2 are not).\n", tuning_table(data["tuning"]) + "\n"]
    return "\n".join(parts)


def _teacher_reading(data: dict[str, Any], g: dict[int, dict[str, float]]) -> str:
    """What the stronger teacher changed, in the study's own numbers."""
    t_acc = data.get("teacher_stream_accuracy", {})
    if not g or not t_acc:
        return ""
    served = statistics.mean(v["acc_none"] for v in g.values())
    teacher = statistics.mean(t_acc.values())
    tuned = {(r["setting"], r["mode"]): r["accuracy"] for r in data.get("tuning", [])}
    none0 = next((r["accuracy"] for r in data.get("tuning", []) if r["mode"] == "none"), math.nan)
    kl = [f"{100 * (tuned[(CHOSEN, m)] - none0):+.2f}" for m in ("cema", "all") if (CHOSEN, m) in tuned]
    lines = [f"Reading: the teacher is {100 * (teacher - served):+.1f} points more accurate than the served model on "
             f"this stream ({teacher:.3f} vs {served:.3f}), far less than on the clean test domains: the "
             "corruptions are new to both, and the student can only move its LayerNorm affine values towards it."]
    if len(kl) == 2:
        lines.append(f"The self-taught study's setting ({CHOSEN}) loses with this teacher on seed 0 (CEMA {kl[0]}, "
                     f"all {kl[1]} points).")
    lines.append("Uploading every sample beat no adaptation on "
                 f"{sum(v['gain_all'] > 0 for v in g.values())} of {len(g)} seeds, CEMA on "
                 f"{sum(v['gain_cema'] > 0 for v in g.values())} of {len(g)}: seed 0's gains come from tuning on "
                 "seed 0 and do not carry over.\n")
    return " ".join(lines)


def markdown(data: dict[str, Any], *, command: str, tune_command: str, latency: Path | None = None,
             extra: Sequence[str] = ()) -> str:
    """`edge.md`: setup, the stream tables, the plot, the tuning, `extra` sections, cloud update speed, latency."""
    study, rows = data["study"], data.get("rows", [])
    cfg = study_settings(ROOT / study["run_dir"], data.get("overrides", []))
    e, c = cfg.edge, cfg.cloud
    g = gains(rows)
    corruptions = "; ".join(f"{n} {v[0]} / {v[1]}" for n, v in study["corruptions"].items())
    parts = [
        "# Edge adaptation with CEMA: results\n",
        f"Regenerate: `{command}` (the study; reuses a cached trained model) and `{tune_command}` (the seed-0 "
        "settings search). Latency: `python -m simulations.bench_edge_latency` (another study, summarised below).\n",
        "## Setup\n",
        f"- Model: the federated global model of `{study['run_dir']}` (config `{study['config_name']}`, hash "
        f"`{study['config_hash']}`: {cfg.aggregation.method}, {cfg.federation.rounds} rounds, "
        f"{cfg.federation.num_clients} clients; {_federated_accuracy(study['run_dir'])}), LoRA merged, "
        f"exported to ONNX (model version `{study['model_version']}`); the cloud serves the same merged model as "
        "student and as teacher.",
        f"- Stream: {len(study['segments'])} segments of {study['per_segment']} digits test images each (a seeded draw "
        "over all six training domains: clean, rotated, inverted, noisy, blurred, thick), one corruption after "
        f"another, mild then severe: {', '.join(study['segments'])}. Strengths (mild / severe): {corruptions} "
        "(contrast: fraction of each image's deviation from its mean kept; pixelate: coarse grid cells per side; "
        "salt_pepper: fraction of pixels set black or white; occlusion: side in pixels of a grey square). None of "
        "them is a training domain. Batches of 32; no batch straddles two segments.",
        "- Modes: `none` (no adaptation), `cema` (CEMA selection), `all` (every sample uploaded); the same cloud "
        "update for both. Each run has its own `CloudService` on loopback gRPC (token auth, fresh state folder) "
        "and its own `EdgeRuntime` (fresh disk queue). After every batch the study waits until the uploads are "
        "acknowledged, the cloud has run every update they allow and the device runs the newest parameters, so "
        "each run is deterministic per seed.",
        f"- Seeds {sorted(g)}: a seed draws the stream (images, corruption noise) and the cloud's replay sampling.",
        f"- Settings: edge `e_min={e.e_min}`, `e_max={e.e_max}` (fractions of ln C), dynamic exclusion "
        f"{e.dynamic_exclusion} (warm-up {e.warmup_samples} samples, coeff {e.e_max_coeff}), redundancy filter "
        f"{e.redundancy_filter}; cloud SGD lr {c.lr} (teacher {c.teacher_lr}), momentum {c.momentum}, "
        f"{c.steps_per_update} step(s) per update of {c.new_per_step} new + {c.replay_per_step} replayed samples, "
        f"an update once {c.min_new_per_update} new samples wait, loss weights entropy/KL/CE "
        f"{c.entropy_weight}/{c.kl_weight}/{c.ce_weight}, T = {c.temperature}. Overrides of the run's config: "
        f"`{' '.join(data.get('overrides', [])) or 'none'}` (chosen on seed 0, see Tuning) plus study plumbing "
        f"`{' '.join(study['fixed'])}`.\n",
        _runtime_line(data),
        "## Results\n",
        "Accuracy over the whole stream; gains in accuracy points over no adaptation (same seed). Target (issue 5): "
        "CEMA uploads ≤ 50 % of the stream and keeps ≥ 90 % of the gain of uploading everything.\n",
        gain_table(rows) + "\n",
        _target_line(g),
        _oracle_line(data.get("label_oracle", {}), g),
        "Per mode (mean ± std over seeds; bytes are serialized gRPC messages, uplink = uploads + registration, "
        "downlink = parameter versions; cloud versions = parameter updates published):\n",
        mode_table(rows) + "\n",
        "Accuracy per segment (mean over seeds):\n",
        segment_table(rows, study["segments"]) + "\n",
        "![accuracy along the stream](edge_stream.png)\n",
        "Top: accuracy over the last 256 samples along the stream (mean over seeds); middle: the same minus no "
        "adaptation, in points; bottom: the fraction of those samples CEMA uploaded. Dotted lines: corruption "
        "boundaries.\n",
        _reading(data, g),
    ]
    if data.get("tuning"):
        parts += ["## Tuning (seed 0 only)\n",
                  "Settings tried on seed 0, the tuning seed, before running all seeds with the chosen one "
                  "(so seed 0's figures above are tuned on its own stream; seeds 1 and 2 are not). "
                  f"Chosen: **{CHOSEN}**, by the rule: {CHOICE_RULE}.\n",
                  tuning_table(data["tuning"]) + "\n"]
    parts += list(extra)
    bench = data.get("cloud_updates_per_s")
    if bench:
        parts += ["## Cloud updates per second\n",
                  f"`CloudService.update` in-process (no gRPC), one torch thread, {bench['steps_per_update']} step(s) "
                  f"per update of {bench['new_per_step']} new + {bench['replay_per_step']} replayed samples (teacher "
                  "step + student distillation), parameters published to the state folder; median of "
                  f"{bench['updates']}: **{bench['updates_per_s']:.1f} updates/s** ({1e3 * bench['median_s']:.1f} ms "
                  f"each, {bench['new_samples_per_s']:.0f} new samples/s) on a {bench['cpu_count']}-core machine "
                  f"shared with other jobs (1-minute load average {bench['load_average_1min']:.1f} when measured, "
                  "so an idle machine is faster).\n"]
    if latency is not None and latency.is_file():
        parts += ["## Latency (summary of [edge_latency.md](edge_latency.md))\n",
                  "Measured by `python -m simulations.bench_edge_latency`, not by this study; its latency and "
                  "swap-vs-rebuild tables as they were when this file was written (parity, int8 quality and the "
                  "models are in the linked file).\n", latency_summary(latency.read_text()) + "\n"]
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


def _runtime_line(data: dict[str, Any]) -> str:
    """Where the study's time went (wall seconds of the edge runs, and of training the model once)."""
    metrics = ROOT / data["study"]["run_dir"] / "metrics.json"
    train = json.loads(metrics.read_text())["summary"].get("wall_seconds") if metrics.is_file() else None
    runs = sum(r["seconds"] for r in data.get("rows", []))
    tuning = sum(r["seconds"] for r in data.get("tuning", []))
    return (f"- Time on this shared 2-core machine: the {len(data.get('rows', []))} study runs {runs / 60:.1f} min "
            f"(edge + cloud, lockstep), the {len(data.get('tuning', []))} tuning runs {tuning / 60:.1f} min"
            + (f", training the federated model once {train / 60:.1f} min (cached afterwards)" if train else "")
            + "; the export, label oracle and update benchmark add under a minute.\n")


def _reading(data: dict[str, Any], g: dict[int, dict[str, float]]) -> str:
    """Why the gains are what they are, in the study's own numbers."""
    if not g:
        return ""
    n = statistics.mean(r["samples"] for r in data["rows"])
    g_cema = statistics.mean(v["gain_cema"] for v in g.values())
    g_all = statistics.mean(v["gain_all"] for v in g.values())
    oracle = [acc - g[int(seed)]["acc_none"] for seed, acc in data.get("label_oracle", {}).items() if int(seed) in g]
    tuned = {r["mode"]: r["accuracy"] for r in data.get("tuning", []) if r["setting"] == "defaults"}
    lines = ["## Reading the results\n",
             f"- The gains are tiny: {100 * g_cema:+.2f} (CEMA) and {100 * g_all:+.2f} (all) points are about "
             f"{g_cema * n:+.0f} and {g_all * n:+.0f} of {n:.0f} samples, so the ratio of the two says little"
             + (" (the order none < CEMA < all did hold on every seed)."
                if all(v["acc_none"] < v["acc_cema"] < v["acc_all"] for v in g.values()) else ".")]
    if oracle:
        lines.append(f"- Headroom: even learning the norm parameters from the true labels gains "
                     f"{100 * statistics.mean(oracle):+.2f} points on average "
                     f"({', '.join(f'{100 * o:+.2f}' for o in oracle)}). "
                     "Only the LayerNorm affine values of a small ViT may change (the deployed weights are fixed), "
                     f"and each corruption lasts {data['study']['per_segment']} samples.")
    if {"none", "cema", "all"} <= tuned.keys():
        lines.append(f"- The teacher is the served model itself (the issue's default), about "
                     f"{statistics.mean(v['acc_none'] for v in g.values()):.0%} accurate on this stream. Its "
                     "entropy minimisation and its pseudo-labels reinforce its own mistakes: with the public CEMA "
                     f"code's loss weights (entropy/KL/CE 3/3/1) uploading every sample lost "
                     f"{100 * (tuned['none'] - tuned['all']):.2f} points on seed 0, while CEMA, which leaves out "
                     f"the unreliable high-entropy samples, gained {100 * (tuned['cema'] - tuned['none']):+.2f}: "
                     "the harm the selection is designed to avoid.")
    settings = {r["setting"] for r in data.get("tuning", []) if r["mode"] == "all"}
    none0 = next((r["accuracy"] for r in data.get("tuning", []) if r["mode"] == "none"), None)
    hurt = sorted({r["setting"] for r in data.get("tuning", []) if r["mode"] == "all" and r["accuracy"] < none0})
    if none0 is not None and settings:
        lines.append(f"- In the tuning, uploading everything lost accuracy with {len(hurt)} of {len(settings)} "
                     f"settings ({', '.join(hurt) or 'none'}). The chosen one, {CHOSEN} "
                     f"(`{' '.join(TUNING[CHOSEN])}`), keeps only the KL term: the student follows the teacher, "
                     "whose own norm parameters adapt by weighted entropy on the reliable (low-entropy) uploads.")
    lines.append("- The paper distils from a much stronger foundation model than the edge model; here the "
                 "teacher is the same small model. `load_served_model(run, teacher=other_run)` takes a stronger "
                 "one: see the next section for a centralised-trained teacher.\n")
    return "\n".join(lines)


def _oracle_line(oracle: dict[str, float], g: dict[int, dict[str, float]]) -> str:
    """The label oracle per seed, as a gain over no adaptation."""
    cells = [f"seed {seed}: {acc:.4f} ({100 * (acc - g[int(seed)]['acc_none']):+.2f} pts)"
             for seed, acc in oracle.items() if int(seed) in g]
    if not cells:
        return ""
    return ("Yardstick, not deployable: the same norm parameters learning online from the true labels "
            "(`label_oracle`: predict a batch, then one SGD step of cross-entropy, lr 0.01, momentum 0.9) reach "
            + "; ".join(cells) + ". That is about all that adapting only the normalisation parameters can gain "
            "on this stream within one pass.\n")


OUTPUTS = {"self": "edge_stream", "centralised": "edge_stream_centralised-teacher"}
"""Result files (.json, .png under RESULTS) per teacher."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished run folder (default: train or reuse one)")
    parser.add_argument("--config", default=str(CONFIG), help="config to train when --run is not given")
    parser.add_argument("--method", default="fedit", help="aggregation method to train (default: %(default)s)")
    parser.add_argument("--teacher", choices=TEACHERS, default="self",
                        help="the cloud's teacher: the served model itself, or LoRA trained centrally on the pooled "
                             "client data (trained once with --config, cached) (default: %(default)s)")
    parser.add_argument("--teacher-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="overrides of the centralised teacher's training config (e.g. federation.rounds=3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-segment", type=int, default=384, help="test images per corruption segment")
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                        help="edge/cloud settings (default: the chosen DEFAULT_SETTING)")
    parser.add_argument("--tune", action="store_true", help="run the TUNING settings on seed 0 only")
    parser.add_argument("--settings", nargs="+", default=None, metavar="LABEL",
                        help=f"with --tune: only these TUNING settings (default: all of {list(TUNING)})")
    args = parser.parse_args()
    started = time.time()
    cfg = study_config(args.config, args.method)
    run_dir = Path(args.run) if args.run else trained_run(cfg)
    teacher = teacher_run(args.teacher, load_config(args.config, [f"aggregation.method={args.method}",
                                                                  *args.teacher_set]))
    overrides = TUNING[CHOSEN_BY_TEACHER[args.teacher]] if args.set is None else args.set
    out = RESULTS / f"{OUTPUTS[args.teacher]}.json"
    data = run_study(run_dir, seeds=args.seeds, per_segment=args.per_segment, overrides=overrides, out=out,
                     tune=args.tune, teacher=teacher, settings=args.settings)
    if args.tune:
        print(tuning_table(data["tuning"]))
    if data.get("rows"):
        plot(data["rows"], data["stream_boundaries"], data["study"]["segments"],
             RESULTS / f"{OUTPUTS[args.teacher]}.png",
             title=f"CEMA on a corrupted digits stream ({data['study']['config_name']}, config "
                   f"{data['study']['config_hash']}, teacher {args.teacher}, "
                   f"seeds {sorted({r['seed'] for r in data['rows']})})")
        print(gain_table(data["rows"]))
    write_report(args.run)
    print(f"done in {time.time() - started:.0f} s")


def write_report(run: str | None = None) -> Path | None:
    """`edge.md` from every teacher's result file (the self-teacher study first; nothing without it)."""
    base = "python -m simulations.edge_study" + (f" --run {run}" if run else "")
    own = _load(RESULTS / f"{OUTPUTS['self']}.json")
    if not own.get("rows"):
        return None
    extra = []
    for teacher, name in OUTPUTS.items():
        other = _load(RESULTS / f"{name}.json")
        if teacher != "self" and other.get("rows"):
            cmd = f"{base} --teacher {teacher}"
            extra.append(teacher_section(other, command=cmd, tune_command=f"{cmd} --tune", plot_name=f"{name}.png"))
    path = RESULTS / "edge.md"
    path.write_text(markdown(own, command=base, tune_command=base + " --tune", latency=RESULTS / "edge_latency.md",
                             extra=extra))
    return path


if __name__ == "__main__":
    main()
