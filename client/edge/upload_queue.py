"""The device's upload queue: selected samples wait on disk until the cloud has acknowledged them.

Why on disk: the cloud may be unreachable for minutes or the device may restart; a sample CEMA
selected must not be lost in between. Each queued file is one upload batch, fixed when it is
written and numbered with the device's next `batch_id`, so a batch re-sent after a lost reply is
byte-for-byte the batch the cloud may already hold (the cloud skips ids it has stored). Ids keep
increasing across restarts (`state.json`), and a queue folder belongs to one device id.

Layout: `<dir>/state.json` (device id, next batch id, drop counters) and
`<dir>/batches/<batch_id:012d>-<samples>.npz` (one array per model input plus `__entropy__`).
Files are written to a temporary name and renamed, so a crash never leaves half a batch.

Bound: at most `max_samples` samples wait. When a new batch would exceed it, the OLDEST batches are
dropped (and counted): the stream drifts, so the newest samples say most about the device's present
conditions, and the device never blocks its predictions on a full queue.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.common.atomic_files import atomic_write_bytes, remove_stale_temps

_ENTROPY = "__entropy__"
_NAME = re.compile(r"^(\d{12})-(\d+)\.npz$")


@dataclass(frozen=True)
class QueuedBatch:
    """One upload batch as read back from disk."""

    batch_id: int
    inputs: dict[str, np.ndarray]  # model input name -> (n, ...) array
    entropy: np.ndarray  # float32 (n,)

    @property
    def num_samples(self) -> int:
        return len(self.entropy)


class UploadQueue:
    """A bounded, persistent FIFO of upload batches; safe to use from a producer and a sender thread."""

    def __init__(self, directory: str | Path, *, device_id: str, max_samples: int, batch_samples: int) -> None:
        if max_samples < batch_samples or batch_samples < 1:
            raise ValueError(f"need 1 <= batch_samples <= max_samples, got {batch_samples} and {max_samples}")
        self.dir = Path(directory)
        self.batch_dir = self.dir / "batches"
        self.rejected_dir = self.dir / "rejected"
        self.max_samples = max_samples
        self.batch_samples = batch_samples
        self._lock = threading.Lock()
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.batch_dir)  # an interrupted write: never renamed, never counted
        self._pending: dict[int, int] = {}  # batch_id -> samples, in id order
        for f in sorted(self.batch_dir.iterdir()):
            if m := _NAME.match(f.name):
                self._pending[int(m.group(1))] = int(m.group(2))
        self._state = self._load_state(device_id)
        self._state["next_batch_id"] = max(self._state["next_batch_id"], max(self._pending, default=0) + 1)
        self._save_state()

    # ---- state -------------------------------------------------------------------------------
    def _load_state(self, device_id: str) -> dict:
        path = self.dir / "state.json"
        state = {
            "device_id": device_id,
            "next_batch_id": 1,
            "dropped_samples": 0,
            "dropped_batches": 0,
            "rejected_samples": 0,
            "enqueued_samples": 0,
            "acked_samples": 0,
        }
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("device_id") != device_id:
                raise ValueError(
                    f"queue folder {self.dir} belongs to device {saved.get('device_id')!r}, not {device_id!r}; "
                    "batch ids are per device, so use another --queue-dir or the same --device-id"
                )
            state.update(saved)
        return state

    def _save_state(self) -> None:
        atomic_write_bytes(self.dir / "state.json", json.dumps(self._state, indent=1).encode())

    # ---- producer ----------------------------------------------------------------------------
    def put(self, inputs: dict[str, np.ndarray], entropy: np.ndarray) -> list[int]:
        """Write samples (first axis) as one or more new batches of at most `batch_samples`; their ids."""
        entropy = np.asarray(entropy, dtype=np.float32).reshape(-1)
        n = len(entropy)
        for name, array in inputs.items():
            if len(array) != n:
                raise ValueError(f"input {name!r} has {len(array)} samples, entropy has {n}")
        ids = []
        with self._lock:
            for start in range(0, n, self.batch_samples):
                part = {k: np.ascontiguousarray(v[start : start + self.batch_samples]) for k, v in inputs.items()}
                ent = entropy[start : start + self.batch_samples]
                batch_id = self._state["next_batch_id"]
                self._write_batch(batch_id, part, ent)
                self._state["next_batch_id"] = batch_id + 1
                self._state["enqueued_samples"] += len(ent)
                ids.append(batch_id)
            self._enforce_bound()
            self._save_state()
        return ids

    def _write_batch(self, batch_id: int, inputs: dict[str, np.ndarray], entropy: np.ndarray) -> None:
        if _ENTROPY in inputs:
            raise ValueError(f"an input may not be named {_ENTROPY!r}")
        buf = io.BytesIO()
        arrays: dict[str, Any] = {**inputs, _ENTROPY: entropy}  # Any: numpy's stub types **kwds like its flags
        np.savez(buf, **arrays)
        atomic_write_bytes(self.batch_dir / f"{batch_id:012d}-{len(entropy)}.npz", buf.getvalue())
        self._pending[batch_id] = len(entropy)

    def _enforce_bound(self) -> None:
        while self.pending_samples > self.max_samples:
            oldest = min(self._pending)
            self._state["dropped_samples"] += self._pending[oldest]
            self._state["dropped_batches"] += 1
            self._remove(oldest)

    def _remove(self, batch_id: int) -> None:
        n = self._pending.pop(batch_id)
        (self.batch_dir / f"{batch_id:012d}-{n}.npz").unlink(missing_ok=True)

    # ---- sender ------------------------------------------------------------------------------
    def peek(self, max_batches: int) -> list[QueuedBatch]:
        """The oldest waiting batches, oldest first (they stay queued until `ack`)."""
        with self._lock:
            chosen = sorted(self._pending.items())[:max_batches]
            return [self._read(batch_id, n) for batch_id, n in chosen]

    def _read(self, batch_id: int, n: int) -> QueuedBatch:
        with np.load(self.batch_dir / f"{batch_id:012d}-{n}.npz") as data:
            arrays = {k: data[k] for k in data.files}
        entropy = arrays.pop(_ENTROPY)
        return QueuedBatch(batch_id, arrays, entropy)

    def ack(self, batch_ids: list[int], last_batch_id: int) -> int:
        """Remove the given batches the cloud holds (id <= its `last_batch_id`); samples removed."""
        removed = 0
        with self._lock:
            for batch_id in batch_ids:
                if batch_id <= last_batch_id and batch_id in self._pending:
                    removed += self._pending[batch_id]
                    self._remove(batch_id)
            self._state["acked_samples"] += removed
            self._save_state()
        return removed

    def reject(self, batch_id: int) -> None:
        """Move a batch the cloud refused as malformed to `rejected/`, so it neither blocks nor vanishes."""
        with self._lock:
            n = self._pending.pop(batch_id, None)
            if n is None:
                return
            self.rejected_dir.mkdir(exist_ok=True)
            name = f"{batch_id:012d}-{n}.npz"
            os.replace(self.batch_dir / name, self.rejected_dir / name)
            self._state["rejected_samples"] += n
            self._save_state()

    def split_larger_than(self, max_samples: int) -> int:
        """Re-queue (under new ids, at the end) every batch over the cloud's per-batch limit; batches split.

        Only unsent batches can be that large (the cloud refuses them), so none can be double counted.
        """
        with self._lock:
            large = [(b, n) for b, n in sorted(self._pending.items()) if n > max_samples]
            for batch_id, n in large:
                batch = self._read(batch_id, n)
                self._remove(batch_id)
                for start in range(0, n, max_samples):
                    new_id = self._state["next_batch_id"]
                    part = {k: v[start : start + max_samples] for k, v in batch.inputs.items()}
                    self._write_batch(new_id, part, batch.entropy[start : start + max_samples])
                    self._state["next_batch_id"] = new_id + 1
            self.batch_samples = min(self.batch_samples, max_samples)
            self._save_state()
        return len(large)

    # ---- counters ----------------------------------------------------------------------------
    @property
    def pending_samples(self) -> int:
        return sum(self._pending.values())

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    def counters(self) -> dict[str, int]:
        """Samples enqueued / acknowledged / dropped (bound) / rejected (by the cloud) / waiting, over its life."""
        with self._lock:
            keys = ("enqueued_samples", "acked_samples", "dropped_samples", "dropped_batches", "rejected_samples")
            return {k: int(self._state[k]) for k in keys} | {
                "pending_samples": self.pending_samples,
                "pending_batches": self.pending_batches,
                "next_batch_id": int(self._state["next_batch_id"]),
            }
