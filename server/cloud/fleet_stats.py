"""The operator's view of the fleet: per-device counters, read while the service runs.

The servicer counts what crosses the wire (calls, refusals by reason, when a device was last seen),
the service counts what it stored (registrations, batches, new and re-sent samples); `snapshot` joins
those counters with each device's live state (parameter version, samples waiting for the learner,
replay buffer) into one JSON-ready document. The service writes it atomically to
`<state_dir>/status.json` every `cloud.status_every_s` seconds (`fairedge-server cloud status` reads
it) and, with `cloud.metrics_port` set, `prometheus.py` serves the same numbers in Prometheus text format.

Counters live in memory and restart at 0 with the service (as Prometheus counters do); the stored
totals (`total_accepted`, the version) come from the device's state on disk and survive restarts.
A refusal is counted against the device that made it: the caller for an authenticated call, the id a
refused credential claims if that id is known (registered or holding a credential), else against
`UNATTRIBUTED` — so a stranger cannot grow the table with made-up ids.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fairedge.common.atomic_files import atomic_write_json
from fairedge.server.cloud.errors import CloudError

if TYPE_CHECKING:
    from fairedge.server.cloud.device import Device

log = logging.getLogger("fairedge.cloud")

FORMAT = "fairedge-cloud-status/1"
UNATTRIBUTED = ""
"""The bucket of refusals that name no known device (a malformed or unknown credential)."""


def reason_of(err: CloudError) -> str:
    """The refusal's reason label: its class name in snake case (`NotYourDevice` -> `not_your_device`)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


@dataclass
class DeviceCounters:
    """What one device did since the service started."""

    calls: Counter[str] = field(default_factory=Counter)  # authenticated calls by RPC name
    registrations: int = 0
    batches: int = 0  # batches stored (new samples)
    samples_accepted: int = 0
    samples_resent: int = 0
    rejections: Counter[str] = field(default_factory=Counter)  # by reason_of()
    last_seen: float | None = None  # time.time() of the last authenticated call


class FleetStats:
    """Thread-safe counters keyed by device id (RPC threads write, the status writer reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceCounters] = {}
        self.started = time.time()

    def _of(self, device_id: str) -> DeviceCounters:
        counters = self._devices.get(device_id)
        if counters is None:
            counters = self._devices[device_id] = DeviceCounters()
        return counters

    def seen(self, device_id: str, rpc: str) -> None:
        """An authenticated call of `rpc` by `device_id`."""
        with self._lock:
            c = self._of(device_id)
            c.calls[rpc] += 1
            c.last_seen = time.time()

    def registered(self, device_id: str) -> None:
        with self._lock:
            self._of(device_id).registrations += 1

    def stored(self, device_id: str, accepted: int, resent: int) -> None:
        """One uploaded batch: `accepted` new samples stored, `resent` already held."""
        with self._lock:
            c = self._of(device_id)
            c.batches += accepted > 0
            c.samples_accepted += accepted
            c.samples_resent += resent

    def rejected(self, device_id: str | None, err: CloudError) -> None:
        """A refused call, counted against `device_id` (None: `UNATTRIBUTED`)."""
        with self._lock:
            self._of(device_id or UNATTRIBUTED).rejections[reason_of(err)] += 1

    def snapshot(self, devices: dict[str, Device], service: dict[str, Any]) -> dict[str, Any]:
        """The status document: `service` (global figures) and one row per device (sorted by id)."""
        with self._lock:
            counters = {d: _copy(c) for d, c in self._devices.items()}
        rows = {}
        for device_id in sorted(set(devices) | set(counters)):
            c = counters.get(device_id, DeviceCounters())
            row: dict[str, Any] = {
                "calls": dict(c.calls),
                "registrations": c.registrations,
                "uploads": c.calls.get("Upload", 0),
                "batches": c.batches,
                "samples_accepted": c.samples_accepted,
                "samples_resent": c.samples_resent,
                "rejections": dict(c.rejections),
                "last_seen": c.last_seen,
            }
            device = devices.get(device_id)
            if device is not None:
                row |= device_state(device)
            rows[device_id] = row
        now = time.time()
        return {
            "format": FORMAT,
            "written_at": now,
            "uptime_s": now - self.started,
            "service": service,
            "devices": rows,
        }


class StatusWriter:
    """Rewrites `path` with `snapshot(running=True)` every `every_s` seconds on its own thread; `stop` writes
    the final one (`running=False`)."""

    def __init__(self, path: Path, snapshot: Callable[[bool], dict[str, Any]], every_s: float) -> None:
        self.path, self.snapshot, self.every_s = path, snapshot, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cloud-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            atomic_write_json(self.path, self.snapshot(False))

    def _loop(self) -> None:
        while True:
            try:
                atomic_write_json(self.path, self.snapshot(True))
            except Exception:  # a full disk must not end the status thread
                log.exception("could not write %s", self.path)
            if self._stop.wait(self.every_s):
                return


def device_state(device: Device) -> dict[str, Any]:
    """A registered device's live state: version, totals, samples waiting, replay buffer, its stream clock,
    a paused update."""
    version = device.published[0]
    consumed = device.consumed
    with device.lock:
        total, epochs, seen = device.meta["total_accepted"], device.meta["epochs_started"], device.meta["stream_seen"]
    return {
        "registered": True,
        "params_version": version,
        "total_accepted": total,
        "samples_learned": consumed,
        "pending_samples": total - consumed,
        "replay_buffer": max(0, min(consumed, device.samples.end) - device.samples.first()),
        "epochs_started": epochs,
        "stream_seen": seen,
        "error": device.error,
    }


def _copy(c: DeviceCounters) -> DeviceCounters:
    return DeviceCounters(
        Counter(c.calls),
        c.registrations,
        c.batches,
        c.samples_accepted,
        c.samples_resent,
        Counter(c.rejections),
        c.last_seen,
    )
