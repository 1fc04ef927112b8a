"""The CEMA cloud service over real gRPC on loopback, with a tiny ViT: round trips, per-device
credentials (another device's id, revoked, rotated, unknown), bad requests, dedup of re-sent
batches, resynchronisation of a device that lost its queue (epochs), restarts, TLS, the
`fairedge-server cloud` and `credentials` commands, and that learning moves the student."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from fairedge.common.certificates import make_credentials
from fairedge.common.config import CloudConfig, ConfigError, build_config
from fairedge.common.edge_model import InputSpec, forward_with_norm, norm_parameters, perturbed_norm
from fairedge.common.models.vision import build_vision_classifier
from fairedge.common.tensor_proto import from_proto, to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.server.cloud import CemaLearner, CloudService, CredentialStore, ServedModel, bearer_metadata
from fairedge.server.cloud.errors import CloudError, Overloaded
from fairedge.server.cloud.servicer import STATUS, status_of

INPUTS = [InputSpec("pixel_values", (1, 16, 16), "float32")]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The test machine's cores are shared; torch's thread pool spinning on them makes steps ~40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_vision_classifier(
        image_size=16,
        num_channels=1,
        num_classes=10,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        patch_size=4,
        seed=seed,
    )


def served() -> ServedModel:
    return ServedModel.from_modules(tiny_model(), inputs=INPUTS, num_classes=10, model_id="tiny", model_version="v1")


CFG = CloudConfig(
    port=0, new_per_step=8, min_new_per_update=8, replay_per_step=8, max_batch_samples=64, lr=0.05, teacher_lr=0.01
)


def images(n: int, seed: int = 0) -> np.ndarray:
    """Shifted inputs: bright, noisy 'images' unlike anything the model was built on."""
    rng = np.random.default_rng(seed)
    return (1.5 + 2.0 * rng.standard_normal((n, 1, 16, 16))).astype(np.float32)


def batch(device: str, batch_id: int, x: np.ndarray, epoch: str = "") -> pb.SampleBatch:
    return pb.SampleBatch(device_id=device, batch_id=batch_id, epoch=epoch, inputs=[to_proto("pixel_values", x)])


class Client:
    """A bare gRPC client of the service (what an edge device does, minus the device)."""

    def __init__(self, address: str, token: str | None, credentials: grpc.ChannelCredentials | None = None):
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = pb_grpc.EdgeAdaptationStub(self.channel)
        self.md = bearer_metadata(token) if token is not None else None

    def register(
        self, device: str, model_id: str = "tiny", model_version: str = "v1", epoch: str = ""
    ) -> pb.RegisterReply:
        return self.stub.Register(
            pb.RegisterRequest(device_id=device, model_id=model_id, model_version=model_version, epoch=epoch),
            metadata=self.md,
            timeout=10,
        )

    def upload(self, *batches: pb.SampleBatch) -> pb.UploadReply:
        return self.stub.Upload(iter(batches), metadata=self.md, timeout=10)

    def get(self, device: str) -> tuple[int, dict[str, np.ndarray]]:
        reply = self.stub.GetNormParams(pb.NormParamsRequest(device_id=device), metadata=self.md, timeout=10)
        return reply.version, {t.name: from_proto(t) for t in reply.params}

    def watch(self, device: str, known_version: int = 0, timeout: float = 20):
        request = pb.NormParamsRequest(device_id=device, known_version=known_version)
        return self.stub.WatchNormParams(request, metadata=self.md, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


class Fleet:
    """Clients of one service, each device with its own credential (issued at its first use)."""

    def __init__(self, service: CloudService, address: str) -> None:
        self.service, self.address = service, address
        self.tokens: dict[str, str] = {}
        self._clients: dict[str, Client] = {}

    def __getitem__(self, device: str) -> Client:
        if device not in self._clients:
            self.tokens[device] = self.service.credentials.issue(device)
            self._clients[device] = Client(self.address, self.tokens[device])
        return self._clients[device]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@pytest.fixture
def cloud(tmp_path):
    service = CloudService(served(), tmp_path / "state", CFG)
    service.credentials.issue("operator-test")  # a credentials file exists: the service may start
    fleet = Fleet(service, service.start())
    yield service, fleet
    fleet.close()
    service.stop()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_register_upload_get_watch_round_trip(cloud):
    service, fleet = cloud
    client = fleet["cam-1"]
    reply = client.register("cam-1")
    defaults = {k: v.numpy() for k, v in service.model.student_norm.items()}
    assert reply.params_version == 0 and list(reply.norm_param_names) == list(defaults)
    assert reply.max_batch_samples == 64 and any("layernorm" in n for n in reply.norm_param_names)
    assert reply.last_batch_id == 0
    version, params = client.get("cam-1")
    assert version == 0 and all(np.array_equal(params[k], defaults[k]) for k in defaults)

    watch = client.watch("cam-1")
    up = client.upload(batch("cam-1", 1, images(8, 1)), batch("cam-1", 2, images(8, 2)))
    assert (up.accepted, up.resent, up.total_accepted, up.last_batch_id) == (16, 0, 16, 2)
    first = next(watch)  # published by the learner thread, streamed without asking
    assert first.version >= 1
    service.flush(timeout=20)
    assert service.wait_for_version("cam-1", 2, timeout=5) == 2  # 16 new samples, 8 per update
    version, params = client.get("cam-1")
    assert version == 2 and set(params) == set(defaults)
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in params.values())
    assert max(float(np.abs(params[k] - defaults[k]).max()) for k in defaults) > 1e-4  # the student moved
    watch.cancel()
    # a later upload reports the version the earlier ones led to
    assert client.upload(batch("cam-1", 3, images(4, 3))).params_version == 2
    # an open Watch learns that the service stops (and can reconnect), it does not just end
    idle = client.watch("cam-1", known_version=2)
    threading.Timer(0.3, service.stop).start()
    code, details = code_of(next, idle)
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


def every_call_refused(client: Client, device: str) -> set[tuple[grpc.StatusCode, str]]:
    """The (status, details) of Register, Upload, GetNormParams and WatchNormParams for `device`."""
    stream = client.watch(device, timeout=5)
    return {
        code_of(client.register, device),
        code_of(client.upload, batch(device, 1, images(2))),  # client streaming
        code_of(client.get, device),
        code_of(next, stream),  # server streaming
    }


def test_missing_malformed_or_unknown_credentials_are_unauthenticated(cloud):
    service, fleet = cloud
    fleet["cam-1"].register("cam-1")
    secret = fleet.tokens["cam-1"].partition(":")[2]
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for token in (None, "", "not-a-credential", "cam-1:not-the-secret", f"cam-1:{flipped}", f"cam-2:{secret}"):
        bad = Client(fleet.address, token=token)
        try:
            for code, details in every_call_refused(bad, "cam-1"):
                assert code == grpc.StatusCode.UNAUTHENTICATED, (token, code, details)
                assert "token" in details or "authorization" in details
                assert secret not in details
        finally:
            bad.close()
    code, _ = code_of(
        fleet["cam-1"].stub.Register,
        pb.RegisterRequest(device_id="cam-1"),
        metadata=(("authorization", f"Basic {fleet.tokens['cam-1']}"),),
        timeout=5,
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert set(service._devices) == {"cam-1"} and fleet["cam-1"].get("cam-1")[0] == 0
    # at rest: only salted hashes, no secret, file readable by its owner only
    text = service.credentials.path.read_text()
    assert secret not in text and "hmac_sha256" in text
    assert service.credentials.path.stat().st_mode & 0o077 == 0


def test_a_credential_acts_only_for_its_own_device(cloud):
    service, fleet = cloud
    mine, theirs = fleet["cam-1"], fleet["cam-2"]
    theirs.register("cam-2")
    theirs.upload(batch("cam-2", 1, images(8)))
    for code, details in every_call_refused(mine, "cam-2"):  # cam-1's credential, cam-2's id
        assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
        assert "credential is for device 'cam-1'" in details and "'cam-2'" in details
    # a batch for another device in the middle of an own stream: refused, the own batch before it stored
    mine.register("cam-1")
    code, details = code_of(mine.upload, batch("cam-1", 1, images(2)), batch("cam-2", 99, images(2)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "last_batch_id = 1" in details
    # nobody can mute cam-2: its counters are untouched and it carries on
    assert service.device("cam-2").meta["total_accepted"] == 8 and service.device("cam-2").last_batch_id() == 1
    assert theirs.upload(batch("cam-2", 2, images(3))).accepted == 3
    assert mine.upload(batch("cam-1", 2, images(3))).total_accepted == 5


def test_revoked_or_rotated_credentials_are_refused_without_a_restart(cloud):
    service, fleet = cloud
    client = fleet["cam-3"]
    client.register("cam-3")
    watch = client.watch("cam-3", timeout=20)
    other = CredentialStore(service.credentials.path)  # the operator's command, another process
    other.revoke("cam-3")
    t0 = time.monotonic()
    code, details = code_of(next, watch)  # the open stream is closed too, within a poll
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details and time.monotonic() - t0 < 5
    for code, _ in every_call_refused(client, "cam-3"):
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(KeyError, match="has no credential"):
        other.revoke("cam-3")
    # issued again: the new credential works, the old one stays dead; a rotation kills the one before it
    new = Client(fleet.address, other.issue("cam-3"))
    try:
        assert new.register("cam-3").params_version == 0
        with pytest.raises(ValueError, match="already has a credential"):
            other.issue("cam-3")
        newest = Client(fleet.address, other.issue("cam-3", replace=True))
        try:
            assert code_of(new.get, "cam-3")[0] == grpc.StatusCode.UNAUTHENTICATED
            assert newest.get("cam-3")[0] == 0
        finally:
            newest.close()
    finally:
        new.close()
    # a malformed file (a hand edit gone wrong) is reported and the last good one stays in force
    one = fleet["cam-1"]
    assert one.register("cam-1").params_version == 0  # the service has read the file with cam-1 in it
    good = service.credentials.path.read_text()
    service.credentials.path.write_text("{not json")
    assert one.register("cam-1").params_version == 0
    service.credentials.path.unlink()  # no file: no credentials, every call refused
    assert code_of(one.get, "cam-1")[0] == grpc.StatusCode.UNAUTHENTICATED
    service.credentials.path.write_text(good)


def test_credential_checks_are_constant_time_for_known_and_unknown_ids(tmp_path, monkeypatch):
    from fairedge.server.cloud import credentials

    store = CredentialStore(tmp_path / "credentials.json")
    token = store.issue("cam-1")
    compared: list[tuple[int, int]] = []
    real = credentials.hmac.compare_digest
    monkeypatch.setattr(
        credentials.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b)
    )
    assert store.verify(token) == "cam-1"
    assert store.verify(token.replace("cam-1", "cam-9")) is None  # unknown id: compared against a dummy
    assert store.verify(token[:-2]) is None
    assert compared == [(32, 32)] * 3  # every check is one full-length digest comparison
    assert store.verify("no-separator") is None


def test_bad_requests_get_clear_codes_and_others_keep_working(cloud):
    service, fleet = cloud
    client, b = fleet["cam-a"], fleet["cam-b"]
    client.register("cam-a")
    b.register("cam-b")
    x = images(4)
    int_pixels = pb.SampleBatch(device_id="cam-a", batch_id=1, inputs=[to_proto("pixel_values", x.astype(np.int64))])
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    short_data = batch("cam-a", 1, x)
    short_data.inputs[0].data = short_data.inputs[0].data[:-4]
    cases = [
        (client, batch("cam-a", 1, images(4)[:, :, :8]), grpc.StatusCode.INVALID_ARGUMENT, "shape = [4, 1, 8, 16]"),
        (client, int_pixels, grpc.StatusCode.INVALID_ARGUMENT, "dtype = 'int64'"),
        (client, batch("cam-a", 1, nan), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        (client, short_data, grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (
            client,
            pb.SampleBatch(device_id="cam-a", batch_id=1, inputs=[to_proto("pixels", x)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "['pixels']",
        ),
        (fleet["cam-zz"], batch("cam-zz", 1, x), grpc.StatusCode.NOT_FOUND, "'cam-zz' is not registered"),
        (client, batch("../etc", 1, x), grpc.StatusCode.PERMISSION_DENIED, "device_id = '../etc'"),
        (client, batch("cam-a", 1, x, epoch="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "epoch = 'a/b'"),
        (client, batch("cam-a", 1, images(65)), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_samples = 64"),
    ]
    for i, (sender, bad, code, words) in enumerate(cases):
        got, details = code_of(sender.upload, bad)
        assert got == code and words in details, (i, got, details)
        # everyone else is still served
        reply = b.upload(batch("cam-b", i + 1, images(2, i)))
        assert reply.accepted == 2 and reply.last_batch_id == i + 1
    assert service.device("cam-a").meta["total_accepted"] == 0  # nothing of the bad batches was stored
    # a bad batch in the middle of a stream: the earlier one is stored and said so
    code, details = code_of(client.upload, batch("cam-a", 1, x), batch("cam-a", 2, nan))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "last_batch_id = 1" in details
    c = fleet["cam-c"]
    code, details = code_of(c.register, "cam-c", model_id="other")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "model_id = 'other'" in details and "'tiny'" in details
    code, _ = code_of(c.register, "cam-c", model_version="v0")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(c.get, "cam-c")
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = code_of(c.register, "cam-c", epoch="x" * 65)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "epoch" in details
    assert b.upload(batch("cam-b", 100, x)).total_accepted == 2 * len(cases) + 4


def test_resent_batch_is_acknowledged_but_not_counted_twice(cloud):
    service, fleet = cloud
    client = fleet["cam-1"]
    client.register("cam-1")
    assert client.upload(batch("cam-1", 1, images(3))).accepted == 3
    again = client.upload(batch("cam-1", 1, images(3)))  # the reply was lost; the device sends it again
    assert (again.accepted, again.resent, again.total_accepted, again.last_batch_id) == (0, 3, 3, 1)
    both = client.upload(batch("cam-1", 1, images(3)), batch("cam-1", 2, images(5)))
    assert (both.accepted, both.resent, both.total_accepted, both.last_batch_id) == (5, 3, 8, 2)
    device = service.device("cam-1")
    assert device.meta["batches_accepted"] == 2 and device.samples.end == 8
    assert client.register("cam-1").last_batch_id == 2  # a restarted device learns what is held already


def test_a_device_that_lost_its_queue_starts_a_new_epoch_and_is_never_muted(cloud, tmp_path):
    service, fleet = cloud
    client = fleet["cam-1"]
    assert client.register("cam-1", epoch="first").last_batch_id == 0
    client.upload(*(batch("cam-1", i, images(2, i), epoch="first") for i in (1, 2, 3)))
    huge = client.upload(batch("cam-1", 2**64 - 1, images(2), epoch="first"))  # the largest id there is
    assert huge.accepted == 2 and huge.last_batch_id == 2**64 - 1
    # the queue folder is lost: a new epoch, numbering from 1 again; nothing is taken for a re-send
    assert client.register("cam-1", epoch="second").last_batch_id == 0
    up = client.upload(batch("cam-1", 1, images(4, 7), epoch="second"), batch("cam-1", 2, images(4, 8), "second"))
    assert (up.accepted, up.resent, up.total_accepted, up.last_batch_id) == (8, 0, 16, 2)
    # a batch of the epoch left behind (another process with the same id): ABORTED, register again
    code, details = code_of(client.upload, batch("cam-1", 4, images(2), epoch="first"))
    assert code == grpc.StatusCode.ABORTED and "call Register again" in details
    # that process registers again: its epoch's last batch id is remembered, so its re-send is still one
    assert client.register("cam-1", epoch="first").last_batch_id == 2**64 - 1
    again = client.upload(batch("cam-1", 3, images(2, 3), epoch="first"))
    assert (again.accepted, again.resent) == (0, 2)
    # epochs survive a restart of the cloud
    service.stop()
    restarted = CloudService(served(), service.state_dir, CFG)
    device = restarted.device("cam-1")
    assert (
        device.meta["epoch"] == "first" and device.meta["epochs_started"] == 3 and device.last_batch_id() == 2**64 - 1
    )
    assert restarted.register("cam-1", "tiny", "v1", epoch="second").last_batch_id() == 2
    assert restarted.device("cam-1").meta["total_accepted"] == 16


def run_in_process(state_dir: Path, plan: list[list[int]]) -> tuple[int, dict[str, np.ndarray], dict]:
    """Upload batches 1..n (8 samples each) in phases; every phase on a freshly started service."""
    for phase in plan:
        service = CloudService(served(), state_dir, CFG)
        service.start(serve_grpc=False)
        try:
            service.register("cam-1", "tiny", "v1")
            for i in phase:
                service.upload("cam-1", i, {"pixel_values": images(8 if i != 3 else 4, i)})
                service.flush(timeout=20)
        finally:
            service.stop()
    service = CloudService(served(), state_dir, CFG)
    version, params = service.norm_params("cam-1")
    return version, params, dict(service.device("cam-1").meta)


def test_restart_on_the_same_state_dir_loses_nothing(tmp_path):
    # an uninterrupted run vs the same uploads with two restarts; batch 3 (4 samples) is below
    # min_new_per_update, so it waits on disk across a restart before it is learned from
    straight = run_in_process(tmp_path / "a", [[1, 2, 3, 4, 5]])
    restarted = run_in_process(tmp_path / "b", [[1, 2], [3], [4, 5]])
    assert straight[0] == restarted[0] == 4  # 36 samples -> 4 updates of 8, 4 samples still waiting
    assert all(np.array_equal(straight[1][k], restarted[1][k]) for k in straight[1])  # momentum, RNG, buffer kept
    assert restarted[2]["total_accepted"] == 36 and restarted[2]["last_batch_id"] == 5

    # and over gRPC: versions, params and counters survive a stop/start
    service = CloudService(served(), tmp_path / "b", CFG)
    token = service.credentials.issue("cam-1")
    client = Client(service.start(), token)
    try:
        version, params = client.get("cam-1")
        assert version == 4 and all(np.array_equal(params[k], restarted[1][k]) for k in params)
        assert client.register("cam-1").params_version == 4
        assert client.upload(batch("cam-1", 5, images(8))).accepted == 0  # already stored before the restart
        reply = client.upload(batch("cam-1", 6, images(4, 6)))
        assert (reply.accepted, reply.total_accepted) == (4, 40)
        service.flush(timeout=20)
        assert client.get("cam-1")[0] == 5  # the 4 waiting + 4 new samples made one more update
    finally:
        client.close()
        service.stop()


def test_a_failing_update_pauses_only_its_device_and_backpressure_is_explicit(tmp_path):
    model = served()

    def forward(module, norm, inputs):  # a model that cannot digest one device's samples
        if (inputs["pixel_values"] == 123.0).any():
            raise RuntimeError("poisoned sample")
        return forward_with_norm(module, norm, inputs)

    model.forward = forward
    cfg = CFG.model_copy(update={"max_pending_samples": 20})
    with CloudService(model, tmp_path / "state", cfg) as service:
        service.start(serve_grpc=False)
        for device in ("cam-a", "cam-b"):
            service.register(device, "tiny", "v1")
        service.upload("cam-a", 1, {"pixel_values": np.full((8, 1, 16, 16), 123.0, np.float32)})
        service.upload("cam-b", 1, {"pixel_values": images(8)})
        service.flush(timeout=20)  # returns: a failed device is not waited for
        assert service.device("cam-a").error == "RuntimeError: poisoned sample" and service.log.failures == 1
        assert service.norm_params("cam-a")[0] == 0 and service.norm_params("cam-b")[0] == 1
        assert service.upload("cam-a", 2, {"pixel_values": images(8)}) == 8  # still stored, nothing lost
        with pytest.raises(Overloaded, match="max_pending_samples = 20"):  # 16 waiting + 8 > 20
            service.upload("cam-a", 3, {"pixel_values": images(8)})
        assert service.upload("cam-a", 2, {"pixel_values": images(8)}) == 0  # a re-send is still acknowledged
        # a second service on a port in use fails loudly (no silent SO_REUSEPORT sharing)
        first = CloudService(served(), tmp_path / "s1", CFG)
        with pytest.raises(ValueError, match="no credentials file .* `fairedge-server credentials issue"):
            first.start()  # no credentials: no unauthenticated service
        first.credentials.issue("cam-1")
        first.start()
        second = CloudService(served(), tmp_path / "s2", CFG, credentials=first.credentials.path)
        try:
            with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
                second.start(port=first.port)
        finally:
            first.stop()


def test_state_dir_of_another_model_is_refused(tmp_path):
    CloudService(served(), tmp_path / "s", CFG)
    other = ServedModel.from_modules(tiny_model(), inputs=INPUTS, num_classes=10, model_id="other", model_version="v1")
    with pytest.raises(ValueError, match="model_id = 'tiny'"):
        CloudService(other, tmp_path / "s", CFG)


def test_tls_with_a_local_ca(tmp_path):
    creds = make_credentials(tmp_path / "certs")
    tls = (creds.server.cert_path.read_bytes(), creds.server.key_path.read_bytes())
    service = CloudService(served(), tmp_path / "state", CFG, tls=tls)
    token = service.credentials.issue("cam-1")
    service.start(host="localhost")
    secure = Client(
        f"localhost:{service.port}", token, credentials=grpc.ssl_channel_credentials(creds.ca.cert_path.read_bytes())
    )
    plain = Client(f"localhost:{service.port}", token)
    try:
        assert secure.register("cam-1").params_version == 0
        assert secure.upload(batch("cam-1", 1, images(2))).accepted == 2
        code, _ = code_of(plain.register, "cam-1")  # no TLS handshake, no service
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        secure.close()
        plain.close()
        service.stop()


def test_learning_moves_the_student_to_the_teacher_and_the_teacher_to_confidence():
    student = tiny_model()
    norm = norm_parameters(student)
    teacher_norm = perturbed_norm(norm, scale=0.5, seed=3)  # a teacher that disagrees with the student
    x = {"pixel_values": torch.from_numpy(images(32, 7))}

    def gap_and_distance(cfg: CloudConfig, steps: int) -> tuple[list[float], list[float], list[float]]:
        learner = CemaLearner(
            student,
            student,
            student_norm=norm,
            teacher_norm=teacher_norm,
            num_classes=10,
            cfg=cfg,
            forward=forward_with_norm,
        )
        params = learner.new_params()
        gaps, dist, ent = [], [], []
        for _ in range(steps):
            gaps.append(learner.distillation_gap(params, x))
            dist.append(sum(float((params.student[k] - params.teacher[k]).detach().norm()) for k in norm))
            ent.append(
                learner.step(
                    params, {k: v[:16] for k, v in x.items()}, {k: v[16:] for k, v in x.items()}
                ).teacher_entropy
            )
        return gaps, dist, ent

    frozen = CloudConfig(lr=0.05, teacher_lr=0.0, entropy_weight=0.0)
    gaps, dist, _ = gap_and_distance(frozen, 25)
    assert gaps[-1] < 0.5 * gaps[0] and dist[-1] < dist[0]
    _, _, ent = gap_and_distance(CloudConfig(lr=0.05, teacher_lr=0.05, e_max=1.0), 25)
    assert ent[-1] < ent[0]  # the teacher's own entropy falls on the shifted inputs


def test_cloud_config_checks_and_run_config_section():
    assert build_config({}).cloud.buffer_size == 10_000
    assert build_config({}, ["cloud.lr=0.01"]).cloud.lr == 0.01
    with pytest.raises(ConfigError, match="cloud.min_new_per_update=64 exceeds cloud.new_per_step=32"):
        build_config({}, ["cloud.min_new_per_update=64"])
    with pytest.raises(ConfigError, match="cloud.port"):
        build_config({}, ["cloud.port=70000"])


def test_cli_serves_until_sigterm(tmp_path, monkeypatch, capsys):
    import socket

    from fairedge.server import cloud
    from fairedge.server.cli import main

    monkeypatch.setattr(cloud, "load_served_model", lambda run, teacher=None: served())
    (tmp_path / "config.toml").write_text('name = "tiny"\n')
    assert (
        main(["credentials", "issue", "cam-1", "--credentials", str(tmp_path / "cloud-state" / "credentials.json")])
        == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.startswith("cam-1:")
    with socket.socket() as s:  # a free port (the CLI prints it too, but we are in the same process)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen: dict[str, object] = {}
    returned = threading.Event()

    def device_then_sigterm() -> None:
        client = Client(f"127.0.0.1:{port}", token)
        try:
            grpc.channel_ready_future(client.channel).result(timeout=30)
            seen["max_batch_samples"] = client.register("cam-1").max_batch_samples
        finally:
            client.close()
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # what `kill` / a service manager sends

    helper = threading.Thread(target=device_then_sigterm)
    helper.start()
    try:
        code = main(
            [
                "cloud",
                "--run",
                str(tmp_path),
                "--port",
                str(port),
                "--set",
                "cloud.max_batch_samples=7",
                "--set",
                "cloud.threads=2",
            ]
        )
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
        returned.set()
        helper.join()
    assert threads == 2  # the entry point sets the process's torch threads (the service never does)
    out = capsys.readouterr().out
    assert code == 0 and f"serving model tiny (v1) on 127.0.0.1:{port} (plaintext)" in out and "stopped" in out
    assert seen["max_batch_samples"] == 7
    assert (tmp_path / "cloud-state" / "devices" / "cam-1" / "device.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_cli_refuses_to_run_without_credentials(tmp_path, capsys):
    from fairedge.server.cli import main

    (tmp_path / "config.toml").write_text('name = "tiny"\n')
    assert main(["cloud", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no credentials file" in err and "cloud-state/credentials.json" in err and "credentials issue" in err
    assert main(["cloud", "--run", str(tmp_path), "--tls-cert", "x.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    assert main(["cloud", "--run", str(tmp_path), "--set", "cloud.lr=-1"]) == 2
    assert "cloud.lr = -1" in capsys.readouterr().err


def test_every_refusal_has_one_grpc_status_and_the_service_leaves_torch_threads_alone(tmp_path):
    from fairedge.server.cloud import errors

    refusals = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CloudError)}
    assert refusals - {CloudError} == set(STATUS)

    class Stale(errors.UnknownDevice):
        pass

    assert status_of(Stale("x")) == grpc.StatusCode.NOT_FOUND and status_of(CloudError("x")) == grpc.StatusCode.INTERNAL
    with CloudService(served(), tmp_path, CloudConfig(threads=3)) as service:
        service.start(serve_grpc=False)
        assert torch.get_num_threads() == 1


def test_credentials_command_issues_lists_and_revokes_while_the_service_runs(tmp_path, capsys):
    from fairedge.server.cli import main

    service = CloudService(served(), tmp_path / "state", CFG)
    file = str(service.credentials.path)
    assert main(["credentials", "issue", "cam-1", "--credentials", file, "--out", str(tmp_path / "cam-1.token")]) == 0
    assert "written to" in capsys.readouterr().out
    token = (tmp_path / "cam-1.token").read_text().strip()
    assert (tmp_path / "cam-1.token").stat().st_mode & 0o077 == 0  # the device's secret: owner only
    client = Client(service.start(), token)
    try:
        assert client.register("cam-1").params_version == 0
        assert main(["credentials", "issue", "cam-2", "--credentials", file]) == 0
        assert capsys.readouterr().out.startswith("cam-2:")
        assert main(["credentials", "issue", "cam-2", "--credentials", file]) == 2
        assert "already has a credential" in capsys.readouterr().err
        assert main(["credentials", "list", "--credentials", file]) == 0
        listed = capsys.readouterr().out
        assert "cam-1\tissued" in listed and "cam-2\tissued" in listed and token not in listed
        assert main(["credentials", "revoke", "cam-1", "--credentials", file]) == 0
        assert code_of(client.get, "cam-1")[0] == grpc.StatusCode.UNAUTHENTICATED  # no restart needed
        assert main(["credentials", "revoke", "cam-1", "--credentials", file]) == 2
        assert "has no credential" in capsys.readouterr().err
        assert main(["credentials", "issue", "../x", "--credentials", file]) == 2
        assert "device_id = '../x'" in capsys.readouterr().err
    finally:
        client.close()
        service.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cloud_device_cuda_without_a_gpu_is_refused_by_name(tmp_path):
    with pytest.raises(RuntimeError, match="cloud.device = 'cuda' but no CUDA device"):
        CloudService(served(), tmp_path / "state", CloudConfig(device="cuda"))
    service = CloudService(served(), tmp_path / "state2", CloudConfig())  # auto: the CPU here
    assert service.learner.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in service.learner.new_params().student.values())
