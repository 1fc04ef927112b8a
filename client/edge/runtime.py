"""The edge runtime: predict on a stream, pick samples with CEMA, queue them, stay in step with the cloud.

`EdgeRuntime` is the whole device in one object, for the command line and for studies alike:

    with EdgeRuntime("model.onnx", cfg.edge, cloud=CloudEndpoint("127.0.0.1:50061", "cam-1:<secret>"),
                     device_id="cam-1", queue_dir="queue/cam-1") as rt:
        for batch in stream:                 # StreamBatch, (x, y) or x
            preds = rt.process(batch)         # never waits for the network
        rt.drain(timeout=30)                  # optional: let queued uploads and new params arrive
        report = rt.report()                  # accuracy, uploads, bytes, versions (JSON-able)

Predictions run on the caller's thread; uploads and parameter fetches run on `CloudSync`'s threads,
so a slow or absent cloud never delays a prediction. New parameters take effect at the next batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.client.edge.cloud_link import CloudEndpoint, CloudLink
from fairedge.client.edge.cloud_sync import CloudSync
from fairedge.client.edge.inputs import StreamBatch, as_stream_batch
from fairedge.client.edge.selection import make_selector
from fairedge.client.edge.session import EdgeSession
from fairedge.client.edge.upload_queue import UploadQueue
from fairedge.common.config import EdgeConfig
from fairedge.common.edge_format import load_tokenizer, model_inputs


@dataclass(frozen=True)
class BatchRecord:
    """One prediction batch, for accuracy-along-the-stream plots."""

    start: int  # index of its first sample in the stream
    samples: int
    correct: int | None  # None without labels
    selected: int
    params_version: int
    e_max: float
    mean_entropy: float
    latency_ms: float  # preparing inputs + ONNX Runtime forward


class EdgeRuntime:
    """One edge device: ONNX Runtime session, CEMA selector, disk upload queue, cloud sync threads."""

    def __init__(
        self,
        model_path: str | Path,
        cfg: EdgeConfig | None = None,
        *,
        cloud: CloudEndpoint | None = None,
        device_id: str = "edge-0",
        queue_dir: str | Path | None = None,
        config_name: str | None = None,
    ) -> None:
        self.cfg = cfg or EdgeConfig()
        if cloud is not None and cloud.device_id != device_id:
            raise ValueError(
                f"device_id = {device_id!r}, but the cloud credential is for device {cloud.device_id!r}: "
                "a credential is bound to one device id; use that id or the device's own credential"
            )
        self.device_id = device_id
        self.session = EdgeSession(model_path, threads=self.cfg.threads)
        self.info = self.session.info
        self.config_name = config_name or self.info.config_name
        self.tokenizer = load_tokenizer(model_path) if self.info.task == "text" else None
        self.selector = make_selector(self.cfg, self.session.num_classes)
        self.queue: UploadQueue | None = None
        if self.cfg.select != "none":
            if queue_dir is None:
                raise ValueError("queue_dir is required when edge.select uploads samples ('cema' or 'all')")
            self.queue = UploadQueue(
                queue_dir,
                device_id=device_id,
                max_bytes=self.cfg.queue_max_bytes,
                batch_samples=self.cfg.upload_batch_size,
            )
        self.link: CloudLink | None = None
        self.sync: CloudSync | None = None
        if cloud is not None and self.queue is not None:
            self.link = CloudLink(
                cloud,
                max_message_bytes=self.cfg.max_message_mb << 20,
                rpc_timeout_s=self.cfg.rpc_timeout_s,
                reconnect_backoff_max_s=self.cfg.backoff_max_s,
                retry_backoff_s=self.cfg.backoff_initial_s,
            )
            self.sync = CloudSync(
                self.link,
                self.queue,
                device_id=device_id,
                model_id=self.info.model_id,
                model_version=self.info.model_version,
                norm_param_names=self.info.norm_param_names,
                params_version=lambda: self.session.params_version,
                apply_params=self.session.swap,
                batches_per_call=self.cfg.upload_batches_per_call,
                backoff_initial_s=self.cfg.backoff_initial_s,
                backoff_max_s=self.cfg.backoff_max_s,
                watch=self.cfg.watch_params,
            )
        self.records: list[BatchRecord] = []
        self.version_changes: list[dict[str, int]] = []  # {"version", "at_sample"}: when a new set took effect
        self._queue_at_start = self.queue.counters() if self.queue else {}
        self._seen = 0
        self._started = time.time()
        self._running = False
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EdgeRuntime:
        """Start the upload and parameter threads (no-op without a cloud)."""
        if self._closed:
            raise RuntimeError("this EdgeRuntime is closed; make a new one (the queue folder carries over)")
        if self.sync is not None and not self._running:
            self.sync.start()
        self._running = True
        return self

    def close(self) -> None:
        """Stop the sync threads and the channel; queued samples stay on disk. `report()` still works."""
        self._closed = True
        if self.sync is not None:
            self.sync.stop()
        if self.link is not None:
            self.link.close()
        self._running = False

    def __enter__(self) -> EdgeRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the prediction path -----------------------------------------------------------------
    def process(self, batch: StreamBatch | tuple | Any) -> np.ndarray:
        """Predict one batch (class ids), select samples to upload and queue them on disk."""
        if not self._running:
            self.start()
        batch = as_stream_batch(batch)
        t0 = time.perf_counter()
        feeds = model_inputs(self.info, batch.x, tokenizer=self.tokenizer)
        logits, version = self.session.predict(feeds)
        latency_ms = (time.perf_counter() - t0) * 1e3
        selection = self.selector.select(logits)
        if self.sync is not None:
            self.sync.note_seen(self._seen + len(logits))
        if self.queue is not None and selection.mask.any():
            chosen = {name: a[selection.mask] for name, a in feeds.items()}
            self.queue.put(chosen, selection.entropy[selection.mask])
            if self.sync is not None:
                self.sync.wake()
        preds = logits.argmax(axis=1)
        correct = None
        if batch.y is not None:
            if len(batch.y) != len(preds):
                raise ValueError(f"batch has {len(preds)} samples but {len(batch.y)} labels")
            correct = int((preds == batch.y).sum())
        if not self.version_changes or self.version_changes[-1]["version"] != version:
            self.version_changes.append({"version": version, "at_sample": self._seen})
        self.records.append(
            BatchRecord(
                start=self._seen,
                samples=len(preds),
                correct=correct,
                selected=int(selection.mask.sum()),
                params_version=version,
                e_max=float(selection.e_max),
                mean_entropy=float(selection.entropy.mean()),
                latency_ms=latency_ms,
            )
        )
        self._seen += len(preds)
        return preds

    def run(
        self,
        stream: Iterable[Any],
        *,
        drain_timeout: float = 0.0,
        after_batch: Callable[[EdgeRuntime], None] | None = None,
    ) -> dict[str, Any]:
        """Process a whole stream, optionally wait for the cloud to catch up, and return `report()`.

        `after_batch(runtime)` runs after every batch: progress output, or, in a study, waiting for
        the cloud (`drain`, then the cloud's update, then `wait_for_params`) so that a run does not
        depend on thread timing.
        """
        self.start()
        for batch in stream:
            self.process(batch)
            if after_batch is not None:
                after_batch(self)
        if drain_timeout > 0:
            self.drain(drain_timeout)
        return self.report()

    # ---- cloud synchronisation ---------------------------------------------------------------
    def drain(self, timeout: float) -> bool:
        """Wait until every queued sample is acknowledged and the newest known params are in use."""
        if self.sync is not None:
            return self.sync.drain(timeout)
        return self.queue is None or self.queue.pending_batches == 0

    def wait_for_params(self, version: int, timeout: float) -> bool:
        """Wait until the session runs parameter version >= `version` (e.g. one the cloud just published)."""
        deadline = time.monotonic() + timeout
        while self.session.params_version < version:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # ---- reporting ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Everything a run log needs, JSON-able; counters cover this runtime's lifetime only."""
        labelled = [r for r in self.records if r.correct is not None]
        n_labelled = sum(r.samples for r in labelled)
        stats = self.selector.stats
        queue = {}
        if self.queue is not None:
            now = self.queue.counters()
            queue = {
                k: now[k] - self._queue_at_start.get(k, 0)
                if k not in ("pending_samples", "pending_batches", "pending_bytes", "next_batch_id")
                else now[k]
                for k in now
            }
        sync = asdict(self.sync.status) if self.sync is not None else None
        return {
            "config_name": self.config_name,
            "device_id": self.device_id,
            "model": {
                "path": str(self.session.path),
                "model_id": self.info.model_id,
                "model_version": self.info.model_version,
                "task": self.info.task,
                "quantized": self.info.quantized,
            },
            "edge_config": self.cfg.model_dump(mode="json"),
            "predictions": self._seen,
            "labelled": n_labelled,
            "accuracy": (sum(r.correct or 0 for r in labelled) / n_labelled) if n_labelled else None,
            "selected": stats.selected,
            "selected_fraction": stats.selected / stats.seen if stats.seen else 0.0,
            "uploaded": sync["samples_acked"] if sync else 0,
            "uploaded_fraction": (sync["samples_acked"] / self._seen) if sync and self._seen else 0.0,
            "selection": {k: v for k, v in asdict(stats).items() if k != "e_max_history"},
            "e_max_final": stats.e_max_history[-1] if stats.e_max_history else None,
            "bytes_up": self.link.bytes_up if self.link else 0,
            "bytes_down": self.link.bytes_down if self.link else 0,
            "params_version": self.session.params_version,
            "version_changes": self.version_changes,
            "queue": queue,
            "queue_error": self.queue.last_error if self.queue is not None else "",
            "cloud": sync,
            "mean_latency_ms": float(np.mean([r.latency_ms for r in self.records])) if self.records else None,
            "seconds": time.time() - self._started,
            "batches": [asdict(r) for r in self.records],
        }

    def write_log(self, path: str | Path) -> Path:
        """Write `report()` as JSON (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(json.dumps(self.report(), indent=1))
        tmp.replace(path)
        return path
