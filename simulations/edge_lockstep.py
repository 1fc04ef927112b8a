"""One run of the edge study: the real edge runtime against a real CEMA cloud service, in lockstep.

Each run has its own `CloudService` on loopback gRPC (a device credential, fresh state folder) and its own
`EdgeRuntime` (fresh disk queue). After every batch the run waits until the uploads are acknowledged,
the cloud has run every update they allow and the device runs the newest parameters, so a run is
deterministic per seed and independent of thread timing.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.common.config import RunConfig
from fairedge.simulations.edge_stream import Stream

MODES = ("none", "cema", "all")
"""What the device uploads: nothing (no adaptation), CEMA's selection, every sample."""


def export_model(run_dir: Path) -> Path:
    """The run's merged model as ONNX (`<run_dir>/edge-study/model.onnx`, exported once per model version)."""
    from fairedge.common.edge_format import load_edge_info
    from fairedge.common.edge_model import export_onnx, load_merged_model

    path = run_dir / "edge-study" / "model.onnx"
    merged = load_merged_model(run_dir)
    if path.is_file() and load_edge_info(path).model_version == merged.model_version:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(merged, path)


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
        service = CloudService(served, Path(tmp) / "state", cfg.cloud, seed=seed)
        token = service.credentials.issue(device_id)
        address = service.start(port=0)
        try:
            assert address is not None, "CloudService.start serves gRPC by default: it returns the address"
            with EdgeRuntime(
                onnx_path,
                edge_cfg,
                cloud=CloudEndpoint(address, token),
                device_id=device_id,
                queue_dir=Path(tmp) / "queue",
            ) as rt:

                def lockstep(rt: EdgeRuntime) -> None:
                    """Uploads acknowledged, every possible cloud update done, its parameters in use."""
                    sync = rt.sync
                    if sync is None:  # select = "none": nothing to wait for
                        return
                    if not (rt.drain(60) and _wait(lambda: sync.status.registered, 60)):
                        raise TimeoutError(f"{device_id}: uploads not acknowledged in 60 s: {sync.status}")
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


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
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
