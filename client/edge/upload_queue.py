"""The device's upload queue: selected samples wait on disk until the cloud has acknowledged them.

Why on disk: the cloud may be unreachable for minutes or the device may restart; a sample CEMA
selected must not be lost in between. Each queued file is one upload batch, fixed when it is
written and numbered with the device's next `batch_id`, so a batch re-sent after a lost reply is
byte-for-byte the batch the cloud may already hold (the cloud skips ids it has stored).

Batch ids count within an epoch, a random name the queue gets when its folder is created: a device
whose queue folder was lost starts a new epoch and numbers from 1 again, and the cloud, told the
epoch at Register, counts afresh instead of taking the new batches for re-sends. Within an epoch ids
only grow, across restarts too: `state.json` reserves each id before a batch file with it is written.

Layout: `<dir>/state.json` (device id, epoch, next batch id, counters) and
`<dir>/batches/<batch_id:012d>-<samples>.npz` (one array per model input plus `__entropy__`).
Files are written to a temporary name and renamed, so a crash or a full disk never leaves half a batch.

Bound: at most `max_bytes` of batch files wait. When a new batch would exceed it, the OLDEST batches
are dropped (and counted): the stream drifts, so the newest samples say most about the device's
present conditions, and the device never blocks its predictions on a full queue.

Disk trouble (a full disk, an unwritable folder): `put` never raises for it. A batch that cannot be
written is counted as unsaved (`unsaved_samples`) and the error kept in `last_error`; predictions go
on, and writing resumes by itself once the disk has room again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.common.atomic_files import atomic_write_bytes, remove_stale_temps

log = logging.getLogger(__name__)

_ENTROPY = "__entropy__"
_NAME = re.compile(r"^(\d{12})-(\d+)\.npz$")
_COUNTERS = (
    "enqueued_samples",
    "acked_samples",
    "dropped_samples",
    "dropped_batches",
    "rejected_samples",
    "unsaved_samples",
    "unsaved_batches",
    "unreadable_batches",
)


@dataclass(frozen=True)
class QueuedBatch:
    """One upload batch as read back from disk."""

    batch_id: int
    inputs: dict[str, np.ndarray]  # model input name -> (n, ...) array
    entropy: np.ndarray  # float32 (n,)

    @property
    def num_samples(self) -> int:
        return len(self.entropy)


@dataclass(frozen=True)
class _Stored:
    samples: int
    nbytes: int


class UploadQueue:
    """A byte-bounded, persistent FIFO of upload batches; safe to use from a producer and a sender thread."""

    def __init__(self, directory: str | Path, *, device_id: str, max_bytes: int, batch_samples: int) -> None:
        if max_bytes < 1 or batch_samples < 1:
            raise ValueError(f"need max_bytes >= 1 and batch_samples >= 1, got {max_bytes} and {batch_samples}")
        self.dir = Path(directory)
        self.batch_dir = self.dir / "batches"
        self.rejected_dir = self.dir / "rejected"
        self.max_bytes = max_bytes
        self.batch_samples = batch_samples
        self.last_error = ""
        self._lock = threading.Lock()
        self._pending: dict[int, _Stored] = {}  # batch_id -> what its file holds
        try:
            self.batch_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.batch_dir)  # an interrupted write: never renamed, never counted
            for f in sorted(self.batch_dir.iterdir()):
                if m := _NAME.match(f.name):
                    self._pending[int(m.group(1))] = _Stored(int(m.group(2)), f.stat().st_size)
        except OSError as err:  # unwritable or unreadable: predict anyway, count what cannot be kept
            self._disk_error("queue folder", err)
        self._pending = dict(sorted(self._pending.items()))
        self._state = self._load_state(device_id)
        self._state["next_batch_id"] = max(self._state["next_batch_id"], max(self._pending, default=0) + 1)
        self._save_state_or_note()

    # ---- state -------------------------------------------------------------------------------
    def _load_state(self, device_id: str) -> dict:
        path = self.dir / "state.json"
        fresh = {"device_id": device_id, "epoch": secrets.token_hex(8), "next_batch_id": 1} | dict.fromkeys(
            _COUNTERS, 0
        )
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return fresh
        except (OSError, ValueError) as err:  # unreadable: a new epoch, so no batch id can be taken for a re-send
            self._disk_error("state.json unreadable, starting a new epoch", err)
            return fresh
        if saved.get("device_id") != device_id:
            raise ValueError(
                f"queue folder {self.dir} belongs to device {saved.get('device_id')!r}, not {device_id!r}; "
                "batch ids are per device, so use another --queue-dir or the same --device-id"
            )
        return fresh | {"epoch": ""} | saved  # a state.json from before epochs is epoch ""

    def _save_state(self) -> None:
        atomic_write_bytes(self.dir / "state.json", json.dumps(self._state, indent=1).encode())

    def _save_state_or_note(self) -> None:
        """Save the counters; on a disk error only note it (the ids that matter were reserved earlier)."""
        try:
            self._save_state()
        except OSError as err:
            self._disk_error("state.json", err)

    def _disk_error(self, what: str, err: Exception) -> None:
        message = f"{what}: {type(err).__name__}: {err}"
        if message != self.last_error:
            log.error("upload queue %s: %s", self.dir, message)
        self.last_error = message

    @property
    def epoch(self) -> str:
        return str(self._state["epoch"])

    # ---- producer ----------------------------------------------------------------------------
    def put(self, inputs: dict[str, np.ndarray], entropy: np.ndarray) -> list[int]:
        """Write samples (first axis) as batches of at most `batch_samples`; the ids of those written.

        A batch the disk refuses is counted in `unsaved_samples`, never raised: the device keeps predicting.
        """
        entropy = np.asarray(entropy, dtype=np.float32).reshape(-1)
        n = len(entropy)
        for name, array in inputs.items():
            if len(array) != n:
                raise ValueError(f"input {name!r} has {len(array)} samples, entropy has {n}")
        if _ENTROPY in inputs:
            raise ValueError(f"an input may not be named {_ENTROPY!r}")
        step = self.batch_samples
        blobs = [
            _encode({k: v[start : start + step] for k, v in inputs.items()}, entropy[start : start + step])
            for start in range(0, n, step)
        ]
        sizes = [len(entropy[start : start + step]) for start in range(0, n, step)]
        with self._lock:
            first = self._reserve(len(blobs))
            if first is None:
                self._count_unsaved(sum(sizes), len(blobs))
                return []
            ids = []
            for batch_id, blob, size in zip(range(first, first + len(blobs)), blobs, sizes):
                if len(blob) > self.max_bytes:  # alone over the bound: the newest would go with all the rest
                    self._state["dropped_samples"] += size
                    self._state["dropped_batches"] += 1
                elif self._write(batch_id, blob, size):
                    self._state["enqueued_samples"] += size
                    ids.append(batch_id)
                else:
                    self._count_unsaved(size, 1)
            self._enforce_bound()
            self._save_state_or_note()
        return ids

    def _reserve(self, count: int) -> int | None:
        """The first of `count` new batch ids, recorded in state.json before any file has them (None: disk error)."""
        first = int(self._state["next_batch_id"])
        self._state["next_batch_id"] = first + count  # burnt even if the save fails: gaps are harmless
        try:
            self._save_state()
        except OSError as err:
            self._disk_error("state.json", err)
            return None
        return first

    def _write(self, batch_id: int, blob: bytes, samples: int) -> bool:
        try:
            atomic_write_bytes(self.batch_dir / f"{batch_id:012d}-{samples}.npz", blob)
        except OSError as err:  # the temporary file is removed: nothing half-written stays
            self._disk_error(f"batch {batch_id}", err)
            return False
        self._pending[batch_id] = _Stored(samples, len(blob))
        return True

    def _count_unsaved(self, samples: int, batches: int) -> None:
        self._state["unsaved_samples"] += samples
        self._state["unsaved_batches"] += batches

    def _enforce_bound(self) -> None:
        while self.pending_bytes > self.max_bytes:
            oldest = next(iter(self._pending))
            self._state["dropped_samples"] += self._pending[oldest].samples
            self._state["dropped_batches"] += 1
            self._remove(oldest)

    def _remove(self, batch_id: int) -> None:
        stored = self._pending.pop(batch_id)
        try:
            (self.batch_dir / f"{batch_id:012d}-{stored.samples}.npz").unlink(missing_ok=True)
        except OSError as err:  # left on disk: after a restart it is sent again, and the cloud knows its id
            self._disk_error(f"removing batch {batch_id}", err)

    # ---- sender ------------------------------------------------------------------------------
    def peek(self, max_batches: int) -> list[QueuedBatch]:
        """The oldest waiting batches, oldest first (they stay queued until `ack`).

        A file that cannot be read back is set aside in `rejected/` and counted (`unreadable_batches`).
        """
        with self._lock:
            batches: list[QueuedBatch] = []
            for batch_id in list(self._pending):
                if len(batches) == max_batches:
                    break
                batch = self._read_or_set_aside(batch_id)
                if batch is not None:
                    batches.append(batch)
            return batches

    def _read_or_set_aside(self, batch_id: int) -> QueuedBatch | None:
        try:
            return self._read(batch_id, self._pending[batch_id].samples)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            self._disk_error(f"batch {batch_id} unreadable, set aside", err)
            self._state["unreadable_batches"] += 1
            self._set_aside(batch_id)
            return None

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
                    removed += self._pending[batch_id].samples
                    self._remove(batch_id)
            self._state["acked_samples"] += removed
            self._save_state_or_note()
        return removed

    def ack_through(self, last_batch_id: int) -> int:
        """Remove every batch the cloud already holds (id <= `last_batch_id`, from its Register reply)."""
        return self.ack([b for b in list(self._pending) if b <= last_batch_id], last_batch_id)

    def reject(self, batch_id: int) -> None:
        """Move a batch the cloud refused as malformed to `rejected/`, so it neither blocks nor vanishes."""
        with self._lock:
            samples = self._set_aside(batch_id)
            self._state["rejected_samples"] += samples
            self._save_state_or_note()

    def _set_aside(self, batch_id: int) -> int:
        stored = self._pending.pop(batch_id, None)
        if stored is None:
            return 0
        name = f"{batch_id:012d}-{stored.samples}.npz"
        try:
            self.rejected_dir.mkdir(exist_ok=True)
            os.replace(self.batch_dir / name, self.rejected_dir / name)
        except OSError as err:
            self._disk_error(f"setting batch {batch_id} aside", err)
        return stored.samples

    def split_larger_than(self, max_samples: int) -> int:
        """Re-queue (under new ids, at the end) every batch over the cloud's per-batch limit; batches split.

        Only unsent batches can be that large (the cloud refuses them), so none can be double counted.
        A batch whose parts cannot all be written stays as it is.
        """
        with self._lock:
            large = [(b, s.samples) for b, s in self._pending.items() if s.samples > max_samples]
            split = 0
            for batch_id, n in large:
                batch = self._read_or_set_aside(batch_id)
                if batch is None:
                    continue
                starts = range(0, n, max_samples)
                first = self._reserve(len(starts))
                if first is None:
                    continue
                written = []
                for new_id, start in zip(range(first, first + len(starts)), starts):
                    part = {k: v[start : start + max_samples] for k, v in batch.inputs.items()}
                    ent = batch.entropy[start : start + max_samples]
                    if not self._write(new_id, _encode(part, ent), len(ent)):
                        break
                    written.append(new_id)
                if len(written) < len(starts):
                    for new_id in written:
                        self._remove(new_id)
                    continue
                self._remove(batch_id)
                split += 1
            self.batch_samples = min(self.batch_samples, max_samples)
            self._save_state_or_note()
        return split

    # ---- counters ----------------------------------------------------------------------------
    @property
    def pending_samples(self) -> int:
        return sum(s.samples for s in self._pending.values())

    @property
    def pending_bytes(self) -> int:
        return sum(s.nbytes for s in self._pending.values())

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    def counters(self) -> dict[str, int]:
        """Samples enqueued / acknowledged / dropped (bound) / rejected (by the cloud) / unsaved (disk errors)
        over its life, and what waits now."""
        with self._lock:
            return {k: int(self._state[k]) for k in _COUNTERS} | {
                "pending_samples": self.pending_samples,
                "pending_batches": self.pending_batches,
                "pending_bytes": self.pending_bytes,
                "next_batch_id": int(self._state["next_batch_id"]),
            }


def _encode(inputs: dict[str, np.ndarray], entropy: np.ndarray) -> bytes:
    """One batch as .npz bytes (written with one atomic write)."""
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    arrays[_ENTROPY] = entropy  # Any: numpy's stub types **kwds like its flags
    np.savez(buf, **arrays)
    return buf.getvalue()
