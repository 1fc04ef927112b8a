"""One device's state on the cloud, mirrored on disk so that a restart loses nothing.

`<state_dir>/devices/<device_id>/` holds
- `device.json`: registration (model id/version, time), the device's current epoch and upload
  counters (samples accepted, last batch_id per recent epoch, the largest stream clock reported) —
  written by the register and upload paths, atomically, before they reply;
- `params.safetensors`: the published version, how many samples it has learned from,
  the student's and the teacher's norm params and their SGD momentum — written by the
  learner, atomically, once per update (absent = version 0, the exported defaults);
- `samples/`: the uploaded samples (`samples.SampleLog`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from fairedge.common.atomic_files import atomic_write_bytes, atomic_write_json, remove_stale_temps
from fairedge.server.cloud.errors import StaleEpoch
from fairedge.server.cloud.learner import DeviceParams
from fairedge.server.cloud.samples import SampleLog

EPOCHS_KEPT = 16
"""Earlier epochs whose last batch id a device keeps (a re-send from one of them is still recognised)."""


@dataclass(frozen=True)
class BatchAck:
    """What storing one batch did: new samples, samples already held (a re-send), the device's counters."""

    accepted: int
    resent: int
    total_accepted: int
    last_batch_id: int  # in the batch's epoch; 0 = none


class Device:
    """A registered device: counters, samples, learnable params and the published version.

    Upload-side fields (`meta`) are guarded by `lock`; `params` and `consumed` belong to the
    learner thread; `published` is replaced as a whole, so readers never see half an update.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], params: DeviceParams, input_names: list[str]) -> None:
        self.folder = folder
        self.meta = meta
        self.params = params
        self.lock = threading.Lock()
        self.samples = SampleLog(folder / "samples", input_names)
        self.consumed = 0
        self.version = 0
        self.published: tuple[int, dict[str, np.ndarray]] = (0, params.student_arrays())
        self.error: str | None = None  # set when an update failed; the device's updates pause
        self.last_update = 0.0  # time.monotonic() of its last update (learner round robin)

    @property
    def device_id(self) -> str:
        return self.meta["device_id"]

    @classmethod
    def create(
        cls,
        folder: Path,
        device_id: str,
        model_id: str,
        model_version: str,
        params: DeviceParams,
        input_names: list[str],
        epoch: str = "",
    ) -> Device:
        """A new device at version 0; its `device.json` is on disk when this returns."""
        meta = {
            "device_id": device_id,
            "model_id": model_id,
            "model_version": model_version,
            "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "total_accepted": 0,
            "batches_accepted": 0,
            "epoch": epoch,
            "last_batch_id": None,
            "earlier_epochs": [],
            "epochs_started": 1,
            "stream_seen": 0,
        }
        device = cls(folder, meta, params, input_names)
        device.samples.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "device.json", meta)
        return device

    @classmethod
    def load(cls, folder: Path, params: DeviceParams, input_names: list[str]) -> Device:
        """A device as it was persisted in `folder` (params restored into `params`)."""
        remove_stale_temps(folder)
        # a device.json from before epochs, or before stream clocks
        defaults = {"epoch": "", "earlier_epochs": [], "epochs_started": 1, "stream_seen": 0}
        meta = defaults | json.loads((folder / "device.json").read_text())
        device = cls(folder, meta, params, input_names)
        path = folder / "params.safetensors"
        if path.is_file():
            params.load_state_dict(load_file(path))
            with safe_open(path, "pt") as f:
                header = f.metadata()
            device.version, device.consumed = int(header["version"]), int(header["consumed"])
            device.published = (device.version, params.student_arrays())
        device.samples.load(end=meta["total_accepted"])
        return device

    def last_batch_id(self) -> int:
        """The largest batch id stored in the current epoch (0 = none)."""
        with self.lock:
            return self.meta["last_batch_id"] or 0

    def start_epoch(self, epoch: str) -> bool:
        """Make `epoch` the current one (a device that lost its queue numbers from 1 again); True if it changed.

        The last batch id of the epoch it leaves is kept (for the `EPOCHS_KEPT` most recent), so a device
        that comes back to an earlier epoch still has its re-sends recognised.
        """
        with self.lock:
            if epoch == self.meta["epoch"]:
                return False
            earlier = [(e, b) for e, b in self.meta["earlier_epochs"]]  # (epoch, its last batch id), oldest first
            if self.meta["last_batch_id"] is not None:
                earlier.append((self.meta["epoch"], self.meta["last_batch_id"]))
            last = next((b for e, b in earlier if e == epoch), None)
            earlier = [(e, b) for e, b in earlier if e != epoch][-EPOCHS_KEPT:]
            meta = dict(
                self.meta,
                epoch=epoch,
                last_batch_id=last,
                earlier_epochs=earlier,
                epochs_started=self.meta["epochs_started"] + 1,
            )
            atomic_write_json(self.folder / "device.json", meta)
            self.meta = meta
            return True

    def _check_epoch(self, epoch: str, batch_id: int) -> None:
        if epoch != self.meta["epoch"]:
            raise StaleEpoch(
                f"batch_id {batch_id}: epoch = {epoch!r}, but device {self.device_id!r} last registered with "
                f"epoch {self.meta['epoch']!r}; call Register again (another registration of this device id "
                "started a new epoch)"
            )

    def is_resend(self, epoch: str, batch_id: int) -> bool:
        """Whether `batch_id` is not newer than the last stored batch of `epoch` (a re-send after a lost reply)."""
        with self.lock:
            self._check_epoch(epoch, batch_id)
            return self.meta["last_batch_id"] is not None and batch_id <= self.meta["last_batch_id"]

    def accept(self, epoch: str, batch_id: int, arrays: list[np.ndarray], stream_seen: int = 0) -> BatchAck:
        """Store a batch unless `batch_id` is not newer than the last stored one of its epoch (a re-send).

        StaleEpoch for a batch of another epoch than the current one. The samples and then the
        counters are on disk before this returns. `stream_seen`: the device's stream clock
        (`SampleBatch.stream_seen`); the largest reported is kept. A device that restarts its count
        (a new process) thus gets no replay-only updates until it passes that again: no burst of them.
        """
        n = len(arrays[0])
        with self.lock:
            self._check_epoch(epoch, batch_id)
            last = self.meta["last_batch_id"]
            if last is not None and batch_id <= last:
                return BatchAck(0, n, self.meta["total_accepted"], last)
            self.samples.append(self.meta["total_accepted"], arrays)
            meta = dict(
                self.meta,
                total_accepted=self.meta["total_accepted"] + n,
                batches_accepted=self.meta["batches_accepted"] + 1,
                last_batch_id=batch_id,
                stream_seen=max(self.meta["stream_seen"], int(stream_seen)),
            )
            atomic_write_json(self.folder / "device.json", meta)
            self.meta = meta
            return BatchAck(n, 0, meta["total_accepted"], batch_id)

    def pending(self) -> int:
        """Accepted samples not yet learned from."""
        with self.lock:
            return self.meta["total_accepted"] - self.consumed

    def replay_due(self, every: int) -> bool:
        """Whether the device's stream clock calls for an update beyond the versions published so far
        (`cloud.replay_every = every`; 0 = never) and it has learned from samples that can be replayed."""
        with self.lock:
            seen = self.meta["stream_seen"]
        return every > 0 and self.consumed > 0 and self.version < seen // every

    def publish(self, consumed: int) -> int:
        """Persist the learner's params as the next version (learned from `consumed` samples); return it."""
        version = self.version + 1
        data = save_safetensors(self.params.state_dict(), metadata={"version": str(version), "consumed": str(consumed)})
        atomic_write_bytes(self.folder / "params.safetensors", data)
        published = (version, self.params.student_arrays())
        with self.lock:
            self.version, self.consumed, self.published = version, consumed, published
        return version
