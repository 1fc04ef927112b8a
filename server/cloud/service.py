"""The CEMA cloud service: devices, their uploads, a learner thread, and (optionally) the gRPC server.

RPC threads only validate, store and read; all learning happens on one worker thread, so
an Upload returns as soon as its samples are on disk. The same object is the Python API
for studies and benchmarks: `start()`, `stop()`, `flush()` (wait until every possible
update has run) and `wait_for_version()`, plus in-process `register` / `upload` /
`norm_params` that go through exactly the checks a gRPC call does. A refused request
raises a `fairedge.server.cloud.errors.CloudError`; which gRPC status that is, is the
servicer's business. The torch thread count is the process's (its entry point sets it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairedge.common.atomic_files import atomic_write_json
from fairedge.common.config import CloudConfig
from fairedge.common.tensor_proto import to_proto
from fairedge.common.training import resolve_device
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.server.cloud.credentials import CredentialStore
from fairedge.server.cloud.device import BatchAck, Device
from fairedge.server.cloud.errors import Overloaded, ShuttingDown, UnknownDevice, WrongModel
from fairedge.server.cloud.fleet_stats import FleetStats, StatusWriter
from fairedge.server.cloud.grpc_server import GrpcServer, start_grpc_server
from fairedge.server.cloud.learner import CemaLearner, StepStats
from fairedge.server.cloud.model import ServedModel
from fairedge.server.cloud.validation import check_device_id, check_epoch, decode_batch

log = logging.getLogger("fairedge.cloud")


@dataclass
class UpdateLog:
    """Counters of the learner thread (for benchmarks and the service log)."""

    updates: int = 0
    seconds: float = 0.0
    failures: int = 0
    last: dict[str, StepStats] = field(default_factory=dict)


class CloudService:
    """Serves one model: per-device CEMA adaptation with state in `state_dir`.

    `credentials` is the devices' credentials file (gRPC only; default `<state_dir>/credentials.json`,
    see `credentials.CredentialStore`); `tls` is `(cert chain PEM, private key PEM)`; `seed` makes each
    device's replay sampling reproducible (it depends on the seed, the device id and the version only).
    """

    def __init__(
        self,
        model: ServedModel,
        state_dir: str | Path,
        cfg: CloudConfig | None = None,
        *,
        credentials: CredentialStore | str | Path | None = None,
        tls: tuple[bytes, bytes] | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.cfg = cfg or CloudConfig()
        self.state_dir = Path(state_dir)
        if not isinstance(credentials, CredentialStore):
            credentials = CredentialStore(
                credentials if credentials is not None else self.state_dir / "credentials.json"
            )
        self.credentials = credentials
        self.tls = tls
        self.seed = seed
        self.specs = list(model.inputs)
        self.input_names = [s.name for s in self.specs]
        self.learner = CemaLearner(
            model.student,
            model.teacher,
            student_norm=model.student_norm,
            teacher_norm=model.teacher_norm,
            num_classes=model.num_classes,
            cfg=self.cfg,
            forward=model.forward,
            device=resolve_device(self.cfg.device, field="cloud.device"),
        )
        self.norm_names = list(model.student_norm)
        self.log = UpdateLog()
        self.stats = FleetStats()
        self._devices: dict[str, Device] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._server: GrpcServer | None = None
        self.port: int | None = None
        self._status_writer = StatusWriter(self.state_dir / "status.json", self.status, self.cfg.status_every_s)
        self._metrics: Any = None  # a prometheus.MetricsServer when cloud.metrics_port is set
        self.metrics_port: int | None = None
        self._open_state_dir()

    # ----- state on disk -----

    def _open_state_dir(self) -> None:
        """Check the state dir belongs to this model, then load every device in it."""
        info = {
            "model_id": self.model.model_id,
            "model_version": self.model.model_version,
            "inputs": self.input_names,
            "norm_param_names": self.norm_names,
        }
        path = self.state_dir / "service.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            for key in ("model_id", "model_version", "norm_param_names"):
                if stored.get(key) != info[key]:
                    raise ValueError(
                        f"state dir {str(self.state_dir)!r} belongs to {key} = {stored.get(key)!r}, "
                        f"this service serves {info[key]!r}; use another state dir"
                    )
        else:
            atomic_write_json(path, info)
        (self.state_dir / "devices").mkdir(parents=True, exist_ok=True)
        for folder in sorted((self.state_dir / "devices").iterdir()):
            if (folder / "device.json").is_file():
                device = Device.load(folder, self.learner.new_params(), self.input_names)
                self._devices[device.device_id] = device
        if self._devices:
            log.info("loaded %d devices from %s", len(self._devices), self.state_dir)

    # ----- lifecycle -----

    def start(self, *, serve_grpc: bool = True, host: str | None = None, port: int | None = None) -> str | None:
        """Start the learner thread and, unless `serve_grpc=False`, the gRPC server; return its address."""
        if self._worker is not None:
            raise RuntimeError("the cloud service is already started")
        if serve_grpc and not self.credentials.path.is_file():
            raise ValueError(
                f"no credentials file {str(self.credentials.path)!r}: the cloud service refuses to run without "
                f"authentication; issue device credentials with `fairedge-server credentials issue "
                f"--credentials {self.credentials.path} <device-id>`"
            )
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="cloud-learner", daemon=True)
        self._worker.start()
        self._status_writer.start()
        if not serve_grpc:
            return None
        host = host if host is not None else self.cfg.host
        try:
            self._server, self.port = start_grpc_server(
                self,
                host=host,
                port=self.cfg.port if port is None else port,
                credentials=self.credentials,
                max_message_mb=self.cfg.max_message_mb,
                max_workers=self.cfg.max_workers,
                tls=self.tls,
            )
            if self.cfg.metrics_port is not None:
                from fairedge.server.cloud.prometheus import MetricsServer  # only a service with metrics needs it

                self._metrics = MetricsServer(self.status, self.cfg.metrics_host, self.cfg.metrics_port)
                self.metrics_port = self._metrics.port
        except Exception:
            self.stop()
            raise
        return f"{host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        """End open Watch streams, stop the gRPC server and the learner thread (a running update finishes)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        self._status_writer.stop()  # writes the final counters

    def __enter__(self) -> CloudService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- device operations (the gRPC servicer calls these) -----

    def register(self, device_id: str, model_id: str, model_version: str, epoch: str = "") -> Device:
        """The device (created on first registration), now in `epoch`; WrongModel for a model not served here.

        A new epoch (the device lost its queue folder and numbers its batches from 1 again) restarts the
        batch-id count, so its new batches are stored, never taken for re-sends.
        """
        check_device_id(device_id)
        check_epoch(epoch)
        if (model_id, model_version) != (self.model.model_id, self.model.model_version):
            raise WrongModel(
                f"model_id = {model_id!r}, model_version = {model_version!r}: this cloud serves model_id "
                f"{self.model.model_id!r}, model_version {self.model.model_version!r}; deploy that model",
            )
        with self._cond:
            device = self._devices.get(device_id)
            if device is None:
                device = Device.create(
                    self.state_dir / "devices" / device_id,
                    device_id,
                    model_id,
                    model_version,
                    self.learner.new_params(),
                    self.input_names,
                    epoch,
                )
                self._devices[device_id] = device
                log.info("registered device %s", device_id)
        if device.start_epoch(epoch):
            log.info("device %s starts batch epoch %r: its batch ids count from 1 again", device_id, epoch)
        self.stats.registered(device_id)
        return device

    def device(self, device_id: str) -> Device:
        """A registered device; InvalidRequest for a malformed id, UnknownDevice for an unknown one."""
        check_device_id(device_id)
        with self._cond:
            device = self._devices.get(device_id)
        if device is None:
            raise UnknownDevice(f"device_id = {device_id!r} is not registered; call Register first")
        return device

    def upload_batch(self, batch: pb.SampleBatch) -> BatchAck:
        """Validate and store one SampleBatch; what it did (new samples, re-sent ones, the device's counters)."""
        device = self.device(batch.device_id)
        check_epoch(batch.epoch)
        arrays, _entropies = decode_batch(batch, self.specs, self.cfg.max_batch_samples)
        waiting, limit = device.pending(), self.cfg.max_pending_samples
        if not device.is_resend(batch.epoch, batch.batch_id) and waiting + len(arrays[0]) > limit:
            # the batch is fine: the device should back off and send it again
            raise Overloaded(
                f"batch_id {batch.batch_id}: device {device.device_id!r} has {waiting} samples waiting "
                f"for the learner, at most max_pending_samples = {limit}; retry later",
            )
        ack = device.accept(batch.epoch, batch.batch_id, arrays, batch.stream_seen)
        self.stats.stored(device.device_id, ack.accepted, ack.resent)
        if ack.accepted:
            with self._cond:
                self._cond.notify_all()
        return ack

    def upload(
        self, device_id: str, batch_id: int, inputs: Mapping[str, np.ndarray], epoch: str = "", stream_seen: int = 0
    ) -> int:
        """In-process upload (same checks as gRPC); returns the new samples stored."""
        batch = pb.SampleBatch(
            device_id=device_id,
            batch_id=batch_id,
            epoch=epoch,
            stream_seen=stream_seen,
            inputs=[to_proto(name, np.asarray(a)) for name, a in inputs.items()],
        )
        return self.upload_batch(batch).accepted

    def norm_params(self, device_id: str) -> tuple[int, dict[str, np.ndarray]]:
        """The device's latest published version and its norm params (float32)."""
        return self.device(device_id).published

    def watch(
        self, device_id: str, known_version: int, is_active: Callable[[], bool] = lambda: True, poll_s: float = 0.5
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield the device's latest version each time it is newer than the last one yielded.

        Ends when `is_active()` turns false; raises ShuttingDown when the service stops.
        A slow reader skips intermediate versions: only the newest matters to a device.
        """
        device = self.device(device_id)
        known = known_version
        while is_active():
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or device.published[0] > known, timeout=poll_s)  # noqa: B023  (the lambda runs inside this iteration)
                if self._stopping:
                    raise ShuttingDown("the cloud service is shutting down; reconnect")
            version, arrays = device.published
            if version > known:
                known = version
                yield version, arrays

    def is_known(self, device_id: str) -> bool:
        """Whether `device_id` is registered or holds a credential (refusals are counted against it)."""
        with self._cond:
            if device_id in self._devices:
                return True
        return device_id in self.credentials.entries()

    # ----- the operator's view -----

    def status(self, running: bool = True) -> dict[str, Any]:
        """The status document (`fleet_stats`): global figures and per-device counters and state."""
        with self._cond:
            devices = dict(self._devices)
        service = {
            "model_id": self.model.model_id,
            "model_version": self.model.model_version,
            "address": f"{self.cfg.host}:{self.port}" if self.port is not None else None,
            "metrics_port": self.metrics_port,
            "devices": len(devices),
            "updates": self.log.updates,
            "update_s": self.log.seconds,
            "failures": self.log.failures,
            "status_every_s": self.cfg.status_every_s,
            "running": running,
        }
        return self.stats.snapshot(devices, service)

    # ----- synchronisation for studies and benchmarks -----

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the learner has run every update the stored uploads allow (TimeoutError otherwise)."""
        if self._worker is None:
            raise RuntimeError("flush() needs a started service (start())")
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy and self._next_device() is None, timeout=timeout):
                raise TimeoutError(f"updates still pending after {timeout} s")

    def wait_for_version(self, device_id: str, version: int, timeout: float | None = None) -> int:
        """Block until the device has published at least `version`; return its current version."""
        device = self.device(device_id)
        with self._cond:
            if not self._cond.wait_for(lambda: device.published[0] >= version, timeout=timeout):
                raise TimeoutError(
                    f"device {device_id!r} is at version {device.published[0]} after {timeout} s, not {version}"
                )
            return device.published[0]

    # ----- the learner thread -----

    def _next_device(self) -> Device | None:
        """A device with enough new samples for an update, or one its stream clock makes due for a replay-only
        update (`cloud.replay_every`); the one waiting longest first (round robin)."""
        cfg = self.cfg
        ready = [
            d
            for d in self._devices.values()
            if d.error is None and (d.pending() >= cfg.min_new_per_update or d.replay_due(cfg.replay_every))
        ]
        return min(ready, key=lambda d: d.last_update, default=None)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._next_device() is not None)
                if self._stopping:
                    return
                device = self._next_device()
                assert device is not None  # the wait above ends only when there is one, or on stop
                self._busy = True
            try:
                self.update(device)
            except Exception as err:  # a failing device must not stop the others
                log.exception("update of device %s failed; its updates are paused", device.device_id)
                device.error = f"{type(err).__name__}: {err}"
                self.log.failures += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def update(self, device: Device) -> int:
        """One update of `device`: `steps_per_update` CEMA steps on its next new samples, then publish.

        Without enough new samples (an update its stream clock made due, `cloud.replay_every`) the steps
        learn from replayed samples alone, as many as a step with new ones holds, and the teacher rests.
        Called by the learner thread; returns the new version.
        """
        cfg, t0 = self.cfg, time.perf_counter()
        start = device.consumed
        pending = device.pending()
        replay_only = pending < cfg.min_new_per_update and device.replay_due(cfg.replay_every)
        k = 0 if replay_only else min(pending, cfg.new_per_step)
        lo = max(device.samples.first(), start - cfg.buffer_size)
        rng = np.random.default_rng([self.seed, _stable_key(device.device_id), device.version])
        stats = None
        pool = np.arange(lo, start)
        if cfg.replay_pool == "uploaded":  # also the samples still waiting, past this step's new ones
            pool = np.concatenate([pool, np.arange(start + k, start + pending)])
        for _ in range(cfg.steps_per_update):
            m = min(cfg.replay_per_step if k else cfg.new_per_step + cfg.replay_per_step, len(pool))
            replay = sorted(rng.choice(pool, size=m, replace=False).tolist()) if m else []
            arrays = device.samples.gather(list(range(start, start + k)) + replay)
            tensors = {name: torch.from_numpy(a) for name, a in zip(self.input_names, arrays)}
            stats = self.learner.step(
                device.params, {n: t[:k] for n, t in tensors.items()}, {n: t[k:] for n, t in tensors.items()}
            )
        version = device.publish(start + k)
        device.samples.evict_before(start + k - cfg.buffer_size)
        device.last_update = time.monotonic()
        self.log.updates += 1
        self.log.seconds += time.perf_counter() - t0
        assert stats is not None
        self.log.last[device.device_id] = stats
        log.debug("device %s -> version %d (%s)", device.device_id, version, stats)
        with self._cond:
            self._cond.notify_all()
        return version


def _stable_key(text: str) -> int:
    """A process-independent integer for `text` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
