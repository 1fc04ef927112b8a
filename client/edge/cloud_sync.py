"""Keeping a device in step with the cloud, off the prediction path: uploads out, parameters in.

Two daemon threads. The uploader registers the device with its queue's epoch (so a device whose queue
folder was lost is counted afresh, never taken for a re-sender), drops the queued batches the Register
reply says the cloud already holds, then streams the oldest queued batches (`Upload`, client streaming,
in batch-id order) and deletes them from disk only once the reply acknowledges them. The watcher holds
a `WatchNormParams` stream and hands each new parameter set to the session. Both retry every failure
with capped exponential backoff and full jitter (`Backoff`), so an unreachable cloud costs nothing but
waiting: samples stay queued and the device keeps predicting, and a fleet that lost the cloud together
does not come back in lockstep.

Error handling by status code: UNAVAILABLE / DEADLINE_EXCEEDED / anything transient -> back off and
retry; UNAUTHENTICATED, PERMISSION_DENIED and FAILED_PRECONDITION -> recorded in `last_error`, retried
at backoff (an operator can issue the credential or fix the cloud's model without restarting the
device); NOT_FOUND and ABORTED (another registration changed the epoch) -> register again;
INVALID_ARGUMENT / RESOURCE_EXHAUSTED on an upload -> resend one batch per call until the culprit is
found, then move it to the queue's `rejected/` folder (counted, not deleted).

Parameters: with `watch`, a WatchNormParams stream; without, GetNormParams whenever a Register or
Upload reply reports a newer version (a failed Get is retried while idle). Either way the session only takes versions
newer than its own.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from fairedge.client.edge.cloud_link import CloudLink, WatchCall
from fairedge.client.edge.upload_queue import QueuedBatch, UploadQueue
from fairedge.common.tensor_proto import TensorError, from_proto, to_proto
from fairedge.common.wire import edge_service_pb2 as pb

log = logging.getLogger(__name__)

ParamsSink = Callable[[int, dict[str, np.ndarray]], bool]
"""Called with (version, arrays) for each new parameter set; True if it was swapped in."""


class Backoff:
    """Capped exponential backoff with full jitter; `reset` after a success.

    The n-th delay after a success is uniform in [0, min(maximum, initial·2ⁿ)] ("full jitter"), so
    devices that failed together spread their retries out. `rng` makes the delays reproducible.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff: need 0 < initial <= maximum, got initial={initial}, maximum={maximum}")
        self.initial, self.maximum = initial, maximum
        self._rng = rng if rng is not None else random.Random()
        self._cap = initial

    def next(self) -> float:
        delay = self._rng.uniform(0.0, self._cap)
        self._cap = min(self.maximum, self._cap * 2)
        return delay

    def reset(self) -> None:
        self._cap = self.initial


@dataclass
class SyncStatus:
    """What the sync threads did, for the run log."""

    registered: bool = False
    upload_calls: int = 0
    batches_acked: int = 0
    samples_acked: int = 0  # removed from the queue: held by the cloud
    samples_new: int = 0  # of those, stored by the cloud in that call (the rest it already held)
    samples_resent: int = 0
    failures: int = 0
    params_received: int = 0
    params_rejected: int = 0
    cloud_params_version: int = 0  # the newest version the cloud reported
    handled_version: int = 0  # the newest version received and swapped in or refused
    last_error: str = ""
    errors_by_code: dict[str, int] = field(default_factory=dict)


class CloudSync:
    """Owns the uploader and the parameter watcher; `start`, `wake` after enqueuing, `drain`, `stop`."""

    def __init__(
        self,
        link: CloudLink,
        queue: UploadQueue,
        *,
        device_id: str,
        model_id: str,
        model_version: str,
        norm_param_names: list[str],
        params_version: Callable[[], int],
        apply_params: ParamsSink,
        batches_per_call: int = 8,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        watch: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.link = link
        self.queue = queue
        self.device_id = device_id
        self.model_id, self.model_version = model_id, model_version
        self.norm_param_names = list(norm_param_names)
        self.params_version = params_version
        self.apply_params = apply_params
        self.batches_per_call = batches_per_call
        # one Backoff and generator per thread; a seeded `rng` seeds both
        rng = rng if rng is not None else random.Random()
        self._upload_backoff = Backoff(backoff_initial_s, backoff_max_s, random.Random(rng.getrandbits(64)))
        self._watch_backoff = Backoff(backoff_initial_s, backoff_max_s, random.Random(rng.getrandbits(64)))
        self.watch = watch
        self.status = SyncStatus()
        self.stream_seen = 0  # samples predicted so far: each upload carries it (SampleBatch.stream_seen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._registered = threading.Event()
        self._watch_call: WatchCall | None = None
        self._threads = [threading.Thread(target=self._upload_loop, name="edge-uploader", daemon=True)]
        if watch:
            self._threads.append(threading.Thread(target=self._watch_loop, name="edge-param-watch", daemon=True))

    # ---- control -----------------------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def note_seen(self, samples: int) -> None:
        """The device has predicted `samples` in all (its stream clock, sent with the next uploads)."""
        with self._lock:
            self.stream_seen = max(self.stream_seen, int(samples))

    def wake(self) -> None:
        """New batches are queued: send them now rather than at the next poll."""
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty and the device holds the cloud's newest parameters (or timeout)."""
        deadline = time.monotonic() + timeout
        self.wake()
        while time.monotonic() < deadline:
            handled = max(self.params_version(), self.status.handled_version)
            if self.queue.pending_batches == 0 and handled >= self.status.cloud_params_version:
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            if self._watch_call is not None:
                self._watch_call.cancel()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # ---- errors ------------------------------------------------------------------------------
    def _record(self, where: str, err: grpc.RpcError) -> grpc.StatusCode:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        with self._lock:
            self.status.failures += 1
            self.status.last_error = f"{where}: {code.name}: {details}"
            self.status.errors_by_code[code.name] = self.status.errors_by_code.get(code.name, 0) + 1
        if code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION,
        ):
            log.error("%s refused by the cloud: %s: %s", where, code.name, details)
        else:
            log.info("%s failed: %s: %s (will retry)", where, code.name, details)
        return code

    # ---- parameters --------------------------------------------------------------------------
    def _receive(self, message: pb.NormParams) -> None:
        """Decode and hand over one parameter set (only if newer than what the session holds)."""
        if message.version <= self.params_version():
            return
        try:
            arrays = {t.name: from_proto(t) for t in message.params}
            swapped = self.apply_params(int(message.version), arrays)
        except (TensorError, ValueError) as err:
            swapped = False
            log.error("norm params version %d refused: %s", message.version, err)
            with self._lock:
                self.status.last_error = f"params v{message.version}: {err}"
        with self._lock:
            if swapped:
                self.status.params_received += 1
            else:
                self.status.params_rejected += 1
            self.status.cloud_params_version = max(self.status.cloud_params_version, int(message.version))
            self.status.handled_version = max(self.status.handled_version, int(message.version))

    def _note_cloud_version(self, version: int) -> None:
        with self._lock:
            self.status.cloud_params_version = max(self.status.cloud_params_version, int(version))

    def _fetch_if_newer(self) -> None:
        """GetNormParams when the cloud reported a newer version than the session holds."""
        if self.status.cloud_params_version <= max(self.params_version(), self.status.handled_version):
            return  # nothing newer, or the newest was already refused
        try:
            self._receive(self.link.get_norm_params(self.device_id, self.params_version()))
        except grpc.RpcError as err:
            self._record("get params", err)  # tried again after the next upload or poll

    # ---- uploader ----------------------------------------------------------------------------
    def _register(self) -> None:
        reply = self.link.register(self.device_id, self.model_id, self.model_version, self.queue.epoch)
        if reply.norm_param_names and list(reply.norm_param_names) != self.norm_param_names:
            log.warning(
                "the cloud names %d norm params, the model %d; swaps will be refused if they differ",
                len(reply.norm_param_names),
                len(self.norm_param_names),
            )
        if reply.last_batch_id:  # stored before a lost reply: no need to send them again
            held = self.queue.ack_through(int(reply.last_batch_id))
            with self._lock:
                self.status.samples_acked += held
        if reply.max_batch_samples:
            self.queue.split_larger_than(int(reply.max_batch_samples))
        self._note_cloud_version(reply.params_version)
        with self._lock:
            self.status.registered = True
        self._registered.set()
        self._fetch_if_newer()

    def _messages(self, batches: list[QueuedBatch]) -> list[pb.SampleBatch]:
        with self._lock:
            seen = self.stream_seen
        return [
            pb.SampleBatch(
                device_id=self.device_id,
                epoch=self.queue.epoch,
                batch_id=b.batch_id,
                inputs=[to_proto(name, array) for name, array in b.inputs.items()],
                entropies=b.entropy.tolist(),
                stream_seen=seen,
            )
            for b in batches
        ]

    def _upload_loop(self) -> None:
        backoff = self._upload_backoff
        one_at_a_time = False  # after a refused multi-batch call: find the bad batch
        while not self._stop.is_set():
            batches: list[QueuedBatch] = []
            try:
                if not self._registered.is_set():
                    self._register()
                    backoff.reset()
                batches = self.queue.peek(1 if one_at_a_time else self.batches_per_call)
                if not batches:
                    if not self.watch:
                        self._fetch_if_newer()
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                reply = self.link.upload(self._messages(batches))
                ids = [b.batch_id for b in batches]
                removed = self.queue.ack(ids, reply.last_batch_id)
                with self._lock:
                    self.status.upload_calls += 1
                    self.status.batches_acked += sum(1 for i in ids if i <= reply.last_batch_id)
                    self.status.samples_acked += removed
                    self.status.samples_new += int(reply.accepted)
                    self.status.samples_resent += int(reply.resent)
                self._note_cloud_version(reply.params_version)
                if not self.watch:
                    self._fetch_if_newer()
                one_at_a_time = False
                backoff.reset()
            except grpc.RpcError as err:
                code = self._record("upload" if batches else "register", err)
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED):
                    self._registered.clear()
                elif batches and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    if len(batches) == 1:
                        log.error(
                            "batch %d refused by the cloud; moved to %s", batches[0].batch_id, self.queue.rejected_dir
                        )
                        self.queue.reject(batches[0].batch_id)
                    one_at_a_time = True  # until a call succeeds
                    continue
                self._stop.wait(backoff.next())
            except Exception as err:  # a local failure (disk, a corrupt file): keep the thread alive, retry later
                log.exception("uploader: %s", err)
                with self._lock:
                    self.status.failures += 1
                    self.status.last_error = f"uploader: {type(err).__name__}: {err}"
                self._stop.wait(backoff.next())

    # ---- parameter watcher -------------------------------------------------------------------
    def _watch_loop(self) -> None:
        backoff = self._watch_backoff
        while not self._stop.is_set():
            if not self._registered.wait(timeout=0.5):
                continue
            try:
                call = self.link.watch_norm_params(self.device_id, self.params_version())
                with self._lock:
                    self._watch_call = call
                if self._stop.is_set():
                    call.cancel()
                for message in call:
                    backoff.reset()
                    self._receive(message)
            except grpc.RpcError as err:
                if self._stop.is_set():
                    break
                code = self._record("watch", err)
                if code == grpc.StatusCode.NOT_FOUND:
                    self._registered.clear()
            except Exception as err:  # e.g. the session refusing a set in an unexpected way: keep watching
                log.exception("param watcher: %s", err)
                with self._lock:
                    self.status.last_error = f"watch: {type(err).__name__}: {err}"
            finally:
                with self._lock:
                    self._watch_call = None
            self._stop.wait(backoff.next())
