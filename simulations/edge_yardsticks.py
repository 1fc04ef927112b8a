"""What the edge study measures besides its lockstep runs.

Two yardsticks use the true labels (not deployable): `norm_headroom` (what norm parameters fitted to
the labels gain per corruption) and `label_oracle` (the same, learning online on the stream);
`stream_accuracy` scores the served model or its teacher without adaptation; `bench_cloud_updates`
times the cloud's updates. All run on the torch threads the caller set (the study's `main`: one).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairedge.common.config import RunConfig
from fairedge.common.data.task_data import PIXEL_MEAN, PIXEL_STD, LabeledData, normalize_pixels
from fairedge.simulations.edge_stream import CORRUPTIONS, STREAM_CORRUPTIONS, Stream, corrupt, corruption_generator


def stream_accuracy(served: Any, stream: Stream, *, teacher: bool = False, batch: int = 256) -> float:
    """Accuracy of the served student (or teacher) on the stream, no adaptation (its starting norm params)."""
    module, params = (served.teacher, served.teacher_norm) if teacher else (served.student, served.student_norm)
    name, correct = served.inputs[0].name, 0
    with torch.no_grad():
        for i in range(0, len(stream), batch):
            logits = served.forward(module, params, {name: torch.from_numpy(stream.x[i : i + batch])})
            correct += int((logits.argmax(1) == torch.from_numpy(stream.y[i : i + batch])).sum())
    return correct / len(stream)


def label_oracle(served: Any, stream: Stream, *, lr: float = 0.01, batch: int = 32) -> float:
    """Stream accuracy when the same norm parameters learn online from the TRUE labels (not deployable).

    Each batch is predicted, then one SGD step (momentum 0.9) of cross-entropy on it: what adapting
    only the norm parameters could gain on this stream with labels, a yardstick for the unsupervised gains.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in served.student_norm.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr, momentum=0.9)
    name, correct = served.inputs[0].name, 0
    for i in range(0, len(stream), batch):
        x, y = torch.from_numpy(stream.x[i : i + batch]), torch.from_numpy(stream.y[i : i + batch])
        logits = served.forward(served.student, params, {name: x})
        correct += int((logits.detach().argmax(1) == y).sum())
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y).backward()
        opt.step()
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
    if not isinstance(test.x, torch.Tensor):
        raise ValueError("norm_headroom needs an image task (test.x of shape (N, C, H, W)), got texts")
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


def bench_cloud_updates(served: Any, cfg: RunConfig, x: np.ndarray, *, updates: int = 40, warmup: int = 4) -> dict:
    """Time `updates` CloudService updates in-process (no gRPC; fewer when `x` is short): full replay buffer,
    disk state, on the torch threads the study's entry point set (one).

    One update = `cloud.steps_per_update` CEMA steps on `new_per_step` new + `replay_per_step` replayed
    samples, then publishing the version (written to the state folder), as the learner thread does it.
    """
    from fairedge.server.cloud import CloudService

    per = cfg.cloud.new_per_step
    updates = min(updates, len(x) // per - warmup)  # a short stream times fewer updates
    if updates < 1:
        raise ValueError(f"need {per * (1 + warmup)} samples for 1+{warmup} updates of {per}, got {len(x)}")
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
    median = statistics.median(times)
    return {
        "updates": updates,
        "median_s": median,
        "updates_per_s": 1 / median,
        "new_samples_per_s": per / median,
        "steps_per_update": cfg.cloud.steps_per_update,
        "new_per_step": per,
        "replay_per_step": cfg.cloud.replay_per_step,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
