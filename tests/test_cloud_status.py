"""The operator's view of a running cloud service: per-device counters move as devices register, upload,
re-send and are refused (another device's id, a revoked credential, a made-up one), and are read while
the service runs — from `status.json` (`fairedge-server cloud status`) and the Prometheus endpoint."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairedge.server.cli import main
from fairedge.server.cloud import CloudService
from fairedge.server.cloud.errors import NotYourDevice, Unauthenticated
from fairedge.server.cloud.fleet_stats import UNATTRIBUTED, reason_of
from tests.test_cloud_service import CFG, Client, Fleet, batch, code_of, images, one_torch_thread, served

__all__ = ["one_torch_thread"]  # the module fixture of the service tests applies here too


@pytest.fixture
def cloud(tmp_path):
    cfg = CFG.model_copy(update={"status_every_s": 0.2, "metrics_port": 0})
    service = CloudService(served(), tmp_path / "state", cfg)
    service.credentials.issue("operator-test")
    fleet = Fleet(service, service.start())
    yield service, fleet
    fleet.close()
    service.stop()


def status_file(service: CloudService, after: float) -> dict:
    """The status document the service writes, once it is newer than `after` (time.time())."""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            status = json.loads((service.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            status = None
        if status is not None and status["written_at"] > after:
            return status
        time.sleep(0.05)
    raise AssertionError("status.json was not rewritten within 10 s")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The Prometheus endpoint's samples: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_reasons_are_snake_case_class_names():
    assert reason_of(NotYourDevice("x")) == "not_your_device" and reason_of(Unauthenticated("x")) == "unauthenticated"


def test_counters_move_with_the_fleet_and_are_read_while_the_service_runs(cloud, capsys):
    service, fleet = cloud
    t0 = time.time()
    before = status_file(service, t0)
    assert before["devices"] == {} and before["service"]["devices"] == 0

    cam1, cam2 = fleet["cam-1"], fleet["cam-2"]
    cam1.register("cam-1")
    cam2.register("cam-2")
    x = images(8)
    assert cam1.upload(batch("cam-1", 1, x)).accepted == 8
    assert cam1.upload(batch("cam-1", 1, x)).resent == 8  # a re-send: acknowledged, not stored again
    service.wait_for_version("cam-1", 1, timeout=30)
    # cam-2's credential used for cam-1: refused, counted against cam-2
    assert code_of(cam2.upload, batch("cam-1", 2, x))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(cam2.get, "cam-1")[0] == grpc.StatusCode.PERMISSION_DENIED
    # cam-2 revoked (no restart): its next call is refused, counted against cam-2
    service.credentials.revoke("cam-2")
    assert code_of(cam2.get, "cam-2")[0] == grpc.StatusCode.UNAUTHENTICATED
    # a made-up credential: refused, counted against no device (no new row)
    stranger = Client(fleet.address, "ghost:not-a-secret")
    try:
        assert code_of(stranger.register, "ghost")[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stranger.close()

    status = status_file(service, time.time())
    rows = status["devices"]
    assert set(rows) == {"cam-1", "cam-2", UNATTRIBUTED}
    c1, c2 = rows["cam-1"], rows["cam-2"]
    assert c1["registrations"] == 1 and c1["uploads"] == 2 and c1["batches"] == 1
    assert c1["samples_accepted"] == 8 and c1["samples_resent"] == 8 and c1["total_accepted"] == 8
    assert c1["params_version"] >= 1 and c1["pending_samples"] == 0 and c1["replay_buffer"] == 8
    assert c1["rejections"] == {} and c1["last_seen"] >= t0
    assert c2["rejections"] == {"not_your_device": 2, "unauthenticated": 1}
    assert c2["uploads"] == 1 and c2["samples_accepted"] == 0 and c2["params_version"] == 0
    assert rows[UNATTRIBUTED]["rejections"] == {"unauthenticated": 1}
    assert status["service"]["updates"] >= 1 and status["service"]["devices"] == 2

    # the same numbers in Prometheus text format, scraped while the service runs
    metrics = scrape(service.metrics_port)
    assert metrics[("fairedge_cloud_device_uploads_total", (("device", "cam-1"),))] == 2
    assert metrics[("fairedge_cloud_device_samples_accepted_total", (("device", "cam-1"),))] == 8
    assert metrics[("fairedge_cloud_device_params_version", (("device", "cam-1"),))] >= 1
    assert (
        metrics[("fairedge_cloud_device_rejections_total", (("device", "cam-2"), ("reason", "not_your_device")))] == 2
    )
    assert metrics[("fairedge_cloud_device_rejections_total", (("device", ""), ("reason", "unauthenticated")))] == 1
    assert metrics[("fairedge_cloud_updates_total", ())] >= 1

    # more uploads move the counters of the running service
    assert cam1.upload(batch("cam-1", 2, images(8, seed=1))).accepted == 8
    service.wait_for_version("cam-1", 2, timeout=30)
    later = status_file(service, time.time())["devices"]["cam-1"]
    assert later["uploads"] == 3 and later["samples_accepted"] == 16 and later["params_version"] >= 2

    # the command: a table of the running service
    assert main(["cloud", "status", "--state-dir", str(service.state_dir)]) == 0
    out, err = capsys.readouterr()
    assert "2 devices" in out and "not_your_device 2, unauthenticated 1" in out and err == ""
    line = next(row for row in out.splitlines() if row.startswith("cam-1 "))
    assert line.split()[1:5] == [str(later["params_version"]), "3", "16", "8"]
    assert main(["cloud", "status", "--state-dir", str(service.state_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "fairedge-cloud-status/1"


def test_status_of_a_stopped_service_is_flagged_and_a_missing_file_is_an_error(tmp_path, capsys):
    cfg = CFG.model_copy(update={"status_every_s": 0.1})
    service = CloudService(served(), tmp_path / "state", cfg)
    service.start(serve_grpc=False)
    service.register("cam-1", "tiny", "v1")
    service.upload("cam-1", 1, {"pixel_values": images(3)})
    service.stop()  # writes the final counters
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["devices"]["cam-1"]["samples_accepted"] == 3 and status["devices"]["cam-1"]["pending_samples"] == 3
    assert main(["cloud", "status", "--state-dir", str(tmp_path / "state")]) == 0
    assert "the service stopped" in capsys.readouterr().err
    status["service"]["running"], status["written_at"] = True, time.time() - 60  # a service that died
    (tmp_path / "state" / "status.json").write_text(json.dumps(status))
    assert main(["cloud", "status", "--state-dir", str(tmp_path / "state")]) == 0
    assert "not running" in capsys.readouterr().err
    assert main(["cloud", "status", "--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert np.isfinite(status["uptime_s"])
