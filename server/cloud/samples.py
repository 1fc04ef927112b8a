"""One device's uploaded samples: numbered in arrival order, one file per accepted batch.

Sample `i` is the i-th sample the device ever had accepted. Samples before the device's
`consumed` count have been learned from; the latest `buffer_size` of those are its replay
buffer. Samples from `consumed` on wait for the next update (`cloud.replay_pool = "uploaded"`
replays them meanwhile too). A batch file is written once (atomically, before the upload is
acknowledged) and deleted when all its samples have left the replay buffer, so the buffer
survives a restart without ever being rewritten.
"""

from __future__ import annotations

import bisect
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fairedge.common.atomic_files import atomic_write_bytes, fsync_dir, remove_stale_temps


@dataclass(frozen=True)
class _Batch:
    start: int
    arrays: tuple[np.ndarray, ...]  # one per model input, in input order
    path: Path

    @property
    def end(self) -> int:
        return self.start + len(self.arrays[0])


class SampleLog:
    """The samples of one device, in `folder`, for a model with inputs `names` (in that order)."""

    def __init__(self, folder: Path, names: Sequence[str]) -> None:
        self.folder = folder
        self.names = tuple(names)
        self._batches: list[_Batch] = []
        self._lock = threading.Lock()

    def load(self, end: int) -> None:
        """Read the batch files; drop those at or after `end` (written, then never acknowledged)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        batches = []
        for path in sorted(self.folder.glob("*.npz")):
            start = int(path.stem)
            if start >= end:
                path.unlink()
                continue
            with np.load(path, allow_pickle=False) as data:
                arrays = tuple(data[f"arr_{i}"] for i in range(len(self.names)))
            batches.append(_Batch(start, arrays, path))
        with self._lock:
            self._batches = batches

    @property
    def end(self) -> int:
        """One past the last stored sample."""
        with self._lock:
            return self._batches[-1].end if self._batches else 0

    def append(self, start: int, arrays: Sequence[np.ndarray]) -> None:
        """Store a batch whose first sample gets number `start` (durably, before returning)."""
        buf = io.BytesIO()
        np.savez(buf, *arrays)
        path = self.folder / f"{start:012d}.npz"
        atomic_write_bytes(path, buf.getvalue())
        with self._lock:
            self._batches = [b for b in self._batches if b.start < start]  # a leftover at or after start is stale
            self._batches.append(_Batch(start, tuple(arrays), path))

    def first(self) -> int:
        """The number of the oldest sample still stored."""
        with self._lock:
            return self._batches[0].start if self._batches else 0

    def gather(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The samples with these numbers, one stacked array per input."""
        with self._lock:
            starts = [b.start for b in self._batches]
            parts: list[list[np.ndarray]] = [[] for _ in self.names]
            for i in indices:
                k = bisect.bisect_right(starts, i) - 1
                if k < 0 or i >= self._batches[k].end:
                    raise IndexError(f"sample {i} is not stored")
                batch = self._batches[k]
                for j, a in enumerate(batch.arrays):
                    parts[j].append(a[i - batch.start])
        return [np.stack(p) for p in parts]

    def evict_before(self, index: int) -> int:
        """Delete the batches whose samples are all numbered below `index`; return how many samples went."""
        with self._lock:
            gone = [b for b in self._batches if b.end <= index]
            self._batches = [b for b in self._batches if b.end > index]
        for b in gone:
            b.path.unlink(missing_ok=True)
        if gone:
            fsync_dir(self.folder)
        return sum(b.end - b.start for b in gone)
