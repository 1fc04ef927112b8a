"""The CEMA cloud service over real gRPC on loopback, with a tiny ViT: round trips, auth, bad
requests, dedup of re-sent batches, restarts, TLS, and that learning moves the student."""

from __future__ import annotations

import os
import signal
import threading
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
from fairedge.server.cloud import CemaLearner, CloudService, ServedModel, bearer_metadata
from fairedge.server.cloud.errors import CloudError, Overloaded
from fairedge.server.cloud.servicer import STATUS, status_of

TOKEN = "test-token-0123"
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


def batch(device: str, batch_id: int, x: np.ndarray) -> pb.SampleBatch:
    return pb.SampleBatch(device_id=device, batch_id=batch_id, inputs=[to_proto("pixel_values", x)])


class Client:
    """A bare gRPC client of the service (what an edge device does, minus the device)."""

    def __init__(self, address: str, token: str | None = TOKEN, credentials: grpc.ChannelCredentials | None = None):
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = pb_grpc.EdgeAdaptationStub(self.channel)
        self.md = bearer_metadata(token) if token is not None else None

    def register(self, device: str, model_id: str = "tiny", model_version: str = "v1") -> pb.RegisterReply:
        return self.stub.Register(
            pb.RegisterRequest(device_id=device, model_id=model_id, model_version=model_version),
            metadata=self.md,
            timeout=10,
        )

    def upload(self, *batches: pb.SampleBatch) -> pb.UploadReply:
        return self.stub.Upload(iter(batches), metadata=self.md, timeout=10)

    def get(self, device: str) -> tuple[int, dict[str, np.ndarray]]:
        reply = self.stub.GetNormParams(pb.NormParamsRequest(device_id=device), metadata=self.md, timeout=10)
        return reply.version, {t.name: from_proto(t) for t in reply.params}

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def cloud(tmp_path):
    service = CloudService(served(), tmp_path / "state", CFG, tokens=[TOKEN])
    address = service.start()
    client = Client(address)
    yield service, client
    client.close()
    service.stop()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_register_upload_get_watch_round_trip(cloud):
    service, client = cloud
    reply = client.register("cam-1")
    defaults = {k: v.numpy() for k, v in service.model.student_norm.items()}
    assert reply.params_version == 0 and list(reply.norm_param_names) == list(defaults)
    assert reply.max_batch_samples == 64 and any("layernorm" in n for n in reply.norm_param_names)
    version, params = client.get("cam-1")
    assert version == 0 and all(np.array_equal(params[k], defaults[k]) for k in defaults)

    watch = client.stub.WatchNormParams(
        pb.NormParamsRequest(device_id="cam-1", known_version=0), metadata=client.md, timeout=20
    )
    up = client.upload(batch("cam-1", 1, images(8, 1)), batch("cam-1", 2, images(8, 2)))
    assert (up.accepted, up.total_accepted, up.last_batch_id) == (16, 16, 2)
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
    idle = client.stub.WatchNormParams(
        pb.NormParamsRequest(device_id="cam-1", known_version=2), metadata=client.md, timeout=20
    )
    threading.Timer(0.3, service.stop).start()
    code, details = code_of(next, idle)
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details


def test_missing_or_wrong_token_is_unauthenticated(cloud):
    service, client = cloud
    client.register("cam-1")
    for token in (None, "not-the-token", ""):
        bad = Client(f"127.0.0.1:{service.port}", token=token)
        try:
            code, details = code_of(bad.register, "cam-2")
            assert code == grpc.StatusCode.UNAUTHENTICATED and ("token" in details or "authorization" in details)
            code, _ = code_of(bad.upload, batch("cam-1", 1, images(2)))  # client streaming
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = code_of(bad.get, "cam-1")
            assert code == grpc.StatusCode.UNAUTHENTICATED
            stream = bad.stub.WatchNormParams(pb.NormParamsRequest(device_id="cam-1"), metadata=bad.md, timeout=5)
            code, _ = code_of(next, stream)  # server streaming
            assert code == grpc.StatusCode.UNAUTHENTICATED
        finally:
            bad.close()
    code, _ = code_of(
        client.stub.Register,
        pb.RegisterRequest(device_id="x"),
        metadata=(("authorization", f"Basic {TOKEN}"),),
        timeout=5,
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "cam-2" not in service._devices and client.get("cam-1")[0] == 0


def test_bad_requests_get_clear_codes_and_others_keep_working(cloud):
    service, client = cloud
    client.register("cam-a")
    client.register("cam-b")
    x = images(4)
    int_pixels = pb.SampleBatch(device_id="cam-a", batch_id=1, inputs=[to_proto("pixel_values", x.astype(np.int64))])
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    short_data = batch("cam-a", 1, x)
    short_data.inputs[0].data = short_data.inputs[0].data[:-4]
    cases = [
        (batch("cam-a", 1, images(4)[:, :, :8]), grpc.StatusCode.INVALID_ARGUMENT, "shape = [4, 1, 8, 16]"),
        (int_pixels, grpc.StatusCode.INVALID_ARGUMENT, "dtype = 'int64'"),
        (batch("cam-a", 1, nan), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        (short_data, grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (
            pb.SampleBatch(device_id="cam-a", batch_id=1, inputs=[to_proto("pixels", x)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "['pixels']",
        ),
        (batch("cam-zz", 1, x), grpc.StatusCode.NOT_FOUND, "'cam-zz' is not registered"),
        (batch("../etc", 1, x), grpc.StatusCode.INVALID_ARGUMENT, "device_id = '../etc'"),
        (batch("cam-a", 1, images(65)), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_samples = 64"),
    ]
    for i, (bad, code, words) in enumerate(cases):
        got, details = code_of(client.upload, bad)
        assert got == code and words in details, (i, got, details)
        # everyone else is still served
        reply = client.upload(batch("cam-b", i + 1, images(2, i)))
        assert reply.accepted == 2 and reply.last_batch_id == i + 1
    assert service.device("cam-a").meta["total_accepted"] == 0  # nothing of the bad batches was stored
    # a bad batch in the middle of a stream: the earlier one is stored and said so
    code, details = code_of(client.upload, batch("cam-a", 1, x), batch("cam-a", 2, nan))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "last_batch_id = 1" in details
    code, details = code_of(client.upload, batch("cam-a", 3, x), batch("cam-b", 99, x))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one device per stream" in details
    code, details = code_of(client.register, "cam-c", model_id="other")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "model_id = 'other'" in details and "'tiny'" in details
    code, _ = code_of(client.register, "cam-c", model_version="v0")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(client.get, "cam-c")
    assert code == grpc.StatusCode.NOT_FOUND
    assert client.upload(batch("cam-b", 100, x)).total_accepted == 2 * len(cases) + 4


def test_resent_batch_is_acknowledged_but_not_counted_twice(cloud):
    service, client = cloud
    client.register("cam-1")
    assert client.upload(batch("cam-1", 1, images(3))).accepted == 3
    again = client.upload(batch("cam-1", 1, images(3)))  # the reply was lost; the device sends it again
    assert (again.accepted, again.total_accepted, again.last_batch_id) == (0, 3, 1)
    both = client.upload(batch("cam-1", 1, images(3)), batch("cam-1", 2, images(5)))
    assert (both.accepted, both.total_accepted, both.last_batch_id) == (5, 8, 2)
    device = service.device("cam-1")
    assert device.meta["batches_accepted"] == 2 and device.samples.end == 8


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
    service = CloudService(served(), tmp_path / "b", CFG, tokens=[TOKEN])
    client = Client(service.start())
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
        first = CloudService(served(), tmp_path / "s1", CFG, tokens=[TOKEN])
        first.start()
        second = CloudService(served(), tmp_path / "s2", CFG, tokens=[TOKEN])
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
    service = CloudService(served(), tmp_path / "state", CFG, tokens=[TOKEN], tls=tls)
    service.start(host="localhost")
    secure = Client(
        f"localhost:{service.port}", credentials=grpc.ssl_channel_credentials(creds.ca.cert_path.read_bytes())
    )
    plain = Client(f"localhost:{service.port}")
    try:
        assert secure.register("cam-1").params_version == 0
        assert secure.upload(batch("cam-1", 1, images(2))).accepted == 2
        code, _ = code_of(plain.register, "cam-2")  # no TLS handshake, no service
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
    monkeypatch.setenv("FAIREDGE_CLOUD_TOKENS", TOKEN)
    (tmp_path / "config.toml").write_text('name = "tiny"\n')
    with socket.socket() as s:  # a free port (the CLI prints it too, but we are in the same process)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen: dict[str, object] = {}
    returned = threading.Event()

    def device_then_sigterm() -> None:
        client = Client(f"127.0.0.1:{port}")
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


def test_cli_refuses_to_run_without_tokens(tmp_path, monkeypatch, capsys):
    from fairedge.server.cli import main

    monkeypatch.delenv("FAIREDGE_CLOUD_TOKENS", raising=False)
    (tmp_path / "config.toml").write_text('name = "tiny"\n')
    assert main(["cloud", "--run", str(tmp_path)]) == 2
    assert "no access tokens" in capsys.readouterr().err
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
