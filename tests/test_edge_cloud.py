"""Export + edge runtime + the real CEMA cloud service over real gRPC on loopback.

A tiny ViT is exported once; the cloud serves the same merged model. Checked: a wrong or revoked
credential is refused and loses nothing, a device that restarts with an empty queue folder is
resynchronised (its new samples are stored, not taken for re-sends), the cloud going down (and
restarting from its state folder) loses no sample and counts none twice, the device's ONNX output
after each swap equals PyTorch with the cloud's published parameters, TLS, and the `fairedge-edge run`
command end to end.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import torch

from fairedge.client.edge import CloudEndpoint, EdgeRuntime
from fairedge.client.edge_cli import main as edge_main
from fairedge.common.certificates import make_credentials
from fairedge.common.config import CloudConfig, EdgeConfig, load_config
from fairedge.common.edge_format import InputSpec
from fairedge.common.edge_model import MergedModel, export_onnx, forward_with_norm
from fairedge.common.models.vision import build_vision_classifier
from fairedge.server.cloud import CloudService, CredentialStore, ServedModel

C = 10
INPUTS = [InputSpec("pixel_values", (1, 16, 16), "float32")]
CLOUD_CFG = CloudConfig(
    port=0, new_per_step=8, min_new_per_update=8, replay_per_step=8, max_batch_samples=64, lr=0.05, teacher_lr=0.01
)
EDGE_CFG = EdgeConfig(
    select="cema",
    e_min=0.0,
    e_max=1.0,
    dynamic_exclusion=False,
    batch_size=8,
    upload_batch_size=8,
    backoff_initial_s=0.05,
    backoff_max_s=0.3,
    rpc_timeout_s=5,
    threads=1,
)


@pytest.fixture(scope="module")
def merged_and_onnx(tmp_path_factory):
    cfg = load_config(
        None,
        [
            "name=edge-cloud-test",
            "model.hidden_size=16",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.intermediate_size=32",
        ],
    )
    model = build_vision_classifier(
        image_size=16,
        num_channels=1,
        num_classes=C,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        patch_size=4,
        seed=0,
    )
    merged = MergedModel(model, cfg, INPUTS, [str(i) for i in range(C)], "tiny", "v1")
    return merged, export_onnx(merged, tmp_path_factory.mktemp("edge-cloud") / "tiny.onnx")


def cloud_service(merged: MergedModel, state_dir, **kwargs) -> CloudService:
    served = ServedModel.from_modules(merged.model, inputs=INPUTS, num_classes=C, model_id="tiny", model_version="v1")
    return CloudService(served, state_dir, CLOUD_CFG, **kwargs)


def start_for(service: CloudService, device: str) -> CloudEndpoint:
    """Issue `device` its credential, start the service, and return the device's endpoint."""
    token = service.credentials.issue(device)
    return CloudEndpoint(service.start(), token)


def images(n: int, seed: int = 0) -> np.ndarray:
    """Shifted inputs (bright, noisy), so the cloud has something to adapt to."""
    rng = np.random.default_rng(seed)
    return (1.5 + 2.0 * rng.standard_normal((n, 1, 16, 16))).astype(np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_parity(rt: EdgeRuntime, merged: MergedModel, params: dict[str, np.ndarray], x: np.ndarray) -> None:
    logits, _ = rt.session.predict({"pixel_values": x})
    with torch.no_grad():
        ref = forward_with_norm(
            merged.model, {k: torch.from_numpy(v) for k, v in params.items()}, {"pixel_values": torch.from_numpy(x)}
        ).numpy()
    assert np.abs(logits - ref).max() <= 1e-4


def wait_for_code(rt: EdgeRuntime, code: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while code not in rt.sync.status.errors_by_code and time.monotonic() < deadline:
        time.sleep(0.02)
    assert code in rt.sync.status.errors_by_code, rt.sync.status


def test_wrong_or_revoked_credentials_are_refused_and_the_queue_keeps_the_samples(merged_and_onnx, tmp_path):
    merged, onnx_path = merged_and_onnx
    with cloud_service(merged, tmp_path / "state") as service:
        good = start_for(service, "cam-1")
        address = good.address
        with EdgeRuntime(
            onnx_path,
            EDGE_CFG,
            cloud=CloudEndpoint(address, "cam-1:not-the-secret"),
            device_id="cam-1",
            queue_dir=tmp_path / "q",
        ) as rt:
            rt.process(images(8))
            wait_for_code(rt, "UNAUTHENTICATED")
            assert "token" in rt.sync.status.last_error
            assert not rt.sync.status.registered and rt.queue.pending_samples == rt.selector.stats.selected == 8
        with pytest.raises(ValueError, match="credential is for device 'cam-1'"):  # bound to one id
            EdgeRuntime(onnx_path, EDGE_CFG, cloud=good, device_id="cam-2", queue_dir=tmp_path / "q2")
        with EdgeRuntime(onnx_path, EDGE_CFG, cloud=good, device_id="cam-1", queue_dir=tmp_path / "q") as rt:
            assert rt.drain(timeout=15), rt.sync.status
            service.credentials.revoke("cam-1")  # the operator revokes it while the device runs
            rt.process(images(8, seed=1))
            wait_for_code(rt, "UNAUTHENTICATED")
            assert rt.queue.pending_samples == 8  # kept for when the device has a credential again
        assert service.device("cam-1").meta["total_accepted"] == 8


def test_a_device_restarting_with_an_empty_queue_folder_is_resynchronised_not_muted(merged_and_onnx, tmp_path):
    merged, onnx_path = merged_and_onnx
    cfg = EDGE_CFG.model_copy(update={"select": "all"})
    with cloud_service(merged, tmp_path / "state") as service:
        cam = start_for(service, "cam-6")
        with EdgeRuntime(onnx_path, cfg, cloud=cam, device_id="cam-6", queue_dir=tmp_path / "q") as rt:
            for seed in range(5):
                rt.process(images(8, seed=seed))
            assert rt.drain(timeout=15), rt.sync.status
            first_epoch = rt.queue.epoch
        assert service.device("cam-6").last_batch_id() == 5
        # the device is re-imaged: same id and credential, an empty queue folder, batch ids from 1 again
        with EdgeRuntime(onnx_path, cfg, cloud=cam, device_id="cam-6", queue_dir=tmp_path / "q-new") as rt:
            assert rt.queue.epoch != first_epoch
            for seed in range(10, 13):
                rt.process(images(8, seed=seed))
            assert rt.drain(timeout=15), rt.sync.status
            report = rt.report()
        device = service.device("cam-6")
        assert device.meta["total_accepted"] == 40 + 24 and device.meta["epochs_started"] == 2
        assert report["uploaded"] == 24 and report["cloud"]["samples_new"] == 24
        assert report["cloud"]["samples_resent"] == 0 and report["queue"]["pending_samples"] == 0


def test_a_batch_the_cloud_refuses_is_set_aside_and_the_others_still_arrive(merged_and_onnx, tmp_path):
    merged, onnx_path = merged_and_onnx
    with cloud_service(merged, tmp_path / "state") as service:
        with EdgeRuntime(
            onnx_path, EDGE_CFG, cloud=start_for(service, "cam-5"), device_id="cam-5", queue_dir=tmp_path / "q"
        ) as rt:
            bad = images(3)
            bad[1, 0, 0, 0] = np.nan  # non-finite: INVALID_ARGUMENT
            rt.queue.put({"pixel_values": images(4, seed=1)}, np.ones(4))
            rt.queue.put({"pixel_values": bad}, np.ones(3))
            rt.queue.put({"pixel_values": images(5, seed=2)}, np.ones(5))
            rt.sync.wake()
            assert rt.drain(timeout=15), rt.sync.status
            assert rt.queue.counters()["rejected_samples"] == 3
            assert len(list((tmp_path / "q" / "rejected").glob("*.npz"))) == 1
            assert "INVALID_ARGUMENT" in rt.sync.status.errors_by_code and "non-finite" in rt.sync.status.last_error
        assert service.device("cam-5").meta["total_accepted"] == 9


def test_cloud_down_and_back_loses_nothing_and_swaps_match_pytorch(merged_and_onnx, tmp_path):
    merged, onnx_path = merged_and_onnx
    port = free_port()
    x = images(96, seed=1)
    token = CredentialStore(tmp_path / "state" / "credentials.json").issue("cam-2")
    with EdgeRuntime(
        onnx_path,
        EDGE_CFG,
        cloud=CloudEndpoint(f"127.0.0.1:{port}", token),
        device_id="cam-2",
        queue_dir=tmp_path / "q",
    ) as rt:
        for start in range(0, 32, 8):  # no cloud yet: predictions go on, samples queue up
            rt.process(x[start : start + 8])
        assert rt.queue.pending_samples == rt.selector.stats.selected > 0

        service = cloud_service(merged, tmp_path / "state")
        service.start(port=port)
        try:
            for start in range(32, 64, 8):
                rt.process(x[start : start + 8])
            assert rt.drain(timeout=20), rt.sync.status
            service.flush(timeout=30)
            version, params = service.norm_params("cam-2")
            assert version >= 1  # the cloud learned from the uploads and published
            assert rt.wait_for_params(version, timeout=10), rt.sync.status
            assert_parity(rt, merged, params, x[:8])
        finally:
            service.stop()  # the cloud goes away again...

        for start in range(64, 96, 8):
            rt.process(x[start : start + 8])
        assert rt.queue.pending_samples > 0

        service = cloud_service(merged, tmp_path / "state")  # ...and comes back from its state folder
        service.start(port=port)
        try:
            assert rt.drain(timeout=20), rt.sync.status
            service.flush(timeout=30)
            version, params = service.norm_params("cam-2")
            assert rt.wait_for_params(version, timeout=10), rt.sync.status
            assert_parity(rt, merged, params, x[:8])
            report = rt.report()
            selected = rt.selector.stats.selected
            assert service.device("cam-2").meta["total_accepted"] == selected  # each sample once, none lost
            assert report["uploaded"] == selected and report["queue"]["pending_samples"] == 0
            assert report["params_version"] == version >= 2
            assert report["version_changes"][0]["version"] == 0
            assert report["bytes_up"] > selected * 16 * 16 * 4 and report["bytes_down"] > 0
        finally:
            service.stop()


def test_tls_and_the_command_line_end_to_end(merged_and_onnx, tmp_path, capsys):
    merged, onnx_path = merged_and_onnx
    creds = make_credentials(tmp_path / "creds")
    tls = (creds.server.cert_path.read_bytes(), creds.server.key_path.read_bytes())
    (tmp_path / "token").write_text(CredentialStore(tmp_path / "state" / "credentials.json").issue("cam-3") + "\n")
    np.savez(tmp_path / "stream.npz", x=images(40, seed=2), y=np.arange(40) % C)
    with cloud_service(merged, tmp_path / "state", tls=tls) as service:
        address = service.start(host="localhost")
        code = edge_main(
            [
                "run",
                "--model",
                str(onnx_path),
                "--input",
                str(tmp_path / "stream.npz"),
                "--cloud",
                address,
                "--token-file",
                str(tmp_path / "token"),
                "--tls-ca",
                str(creds.ca.cert_path),
                "--queue-dir",
                str(tmp_path / "q"),
                "--log",
                str(tmp_path / "log.json"),
                "--drain-timeout",
                "20",
                "--set",
                "edge.batch_size=8",
                "--set",
                "edge.select=all",
                "--set",
                "edge.threads=1",
                "--set",
                "edge.backoff_max_s=0.5",
                "--progress-every",
                "2",
            ]
        )
        assert code == 0
        assert service.device("cam-3").meta["total_accepted"] == 40
    out = capsys.readouterr().out
    assert "device cam-3," in out  # the id its credential is bound to
    assert "(TLS)" in out and "40 samples" in out and "log written" in out
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["predictions"] == 40 and log["uploaded"] == 40 and log["uploaded_fraction"] == 1.0
    assert log["accuracy"] is not None and log["edge_config"]["select"] == "all"
    assert log["config_name"] == "edge-cloud-test" and log["model"]["model_id"] == "tiny"
    # bad arguments fail before anything runs, naming the problem
    assert (
        edge_main(["run", "--model", str(onnx_path), "--input", str(tmp_path / "stream.npz"), "--cloud", address]) == 2
    )
    assert "--token-file" in capsys.readouterr().err
    mismatch = ["--cloud", address, "--token-file", str(tmp_path / "token"), "--device-id", "cam-9"]
    assert edge_main(["run", "--model", str(onnx_path), "--input", str(tmp_path / "stream.npz"), *mismatch]) == 2
    assert "credential is for device 'cam-3'" in capsys.readouterr().err
    assert (
        edge_main(
            ["run", "--model", str(onnx_path), "--input", str(tmp_path / "nope"), "--queue-dir", str(tmp_path / "q2")]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_lockstep_runs_in_process_are_reproducible(merged_and_onnx, tmp_path):
    """How a study drives device and cloud in one process: wait for the cloud after every batch."""
    merged, onnx_path = merged_and_onnx
    x, y = images(48, seed=3), np.arange(48) % C

    def one_run(folder) -> dict:
        with cloud_service(merged, folder / "state") as service:
            cam = start_for(service, "cam-4")

            def lockstep(rt: EdgeRuntime) -> None:
                assert rt.drain(timeout=20)
                service.flush(timeout=30)
                assert rt.wait_for_params(service.norm_params("cam-4")[0], timeout=10)

            cfg = EDGE_CFG.model_copy(update={"select": "all"})
            with EdgeRuntime(onnx_path, cfg, cloud=cam, device_id="cam-4", queue_dir=folder / "q") as rt:
                return rt.run(((x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)), after_batch=lockstep)

    first, second = one_run(tmp_path / "a"), one_run(tmp_path / "b")
    assert [b["params_version"] for b in first["batches"]] == [0, 1, 2, 3, 4, 5]  # 8 uploads -> 1 update
    for key in ("accuracy", "selected", "uploaded", "params_version", "version_changes"):
        assert first[key] == second[key], key
    assert [b["mean_entropy"] for b in first["batches"]] == [b["mean_entropy"] for b in second["batches"]]
