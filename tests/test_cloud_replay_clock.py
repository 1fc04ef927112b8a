"""The cloud paced on each device's stream clock (`cloud.replay_every`): as the public CEMA code steps
once per stream batch, a device that uploads little still gets an update per `replay_every` samples it
has seen, learned from replayed samples alone with the teacher resting. Checked in process (counts,
what a replay-only step learns from, restarts, a device that restarts its count) and end to end
(the edge runtime reports its clock over gRPC)."""

from __future__ import annotations

import numpy as np
import pytest

from fairedge.client.edge import EdgeRuntime
from fairedge.common.config import ConfigError, build_config
from fairedge.server.cloud import CloudService, ServedModel
from tests.test_cloud_service import CFG, images, one_torch_thread, served  # noqa: F401  (an autouse fixture)
from tests.test_edge_cloud import CLOUD_CFG, EDGE_CFG, INPUTS, merged_and_onnx, start_for  # noqa: F401  (a fixture)

CLOCKED = CFG.model_copy(update={"replay_every": 8})


def uploads(service: CloudService, batches: list[tuple[int, int]]) -> None:
    """Register cam-1 and send `(samples, stream_seen)` batches, waiting for the learner after each."""
    service.register("cam-1", "tiny", "v1")
    for batch_id, (n, seen) in enumerate(batches, start=1):
        service.upload("cam-1", batch_id, {"pixel_values": images(n, batch_id)}, stream_seen=seen)
        service.flush(timeout=30)


def params(service: CloudService, role: str) -> dict[str, np.ndarray]:
    return {k: v.detach().clone().numpy() for k, v in getattr(service.device("cam-1").params, role).items()}


def test_a_device_that_uploads_little_gets_an_update_per_replay_every_samples_it_has_seen(tmp_path):
    # 8 samples seen 8 -> one update on them; 8 more seen 32 -> one update on them, then two on replay alone
    plan = [(8, 8), (8, 32)]
    with CloudService(served(), tmp_path / "plain", CFG) as plain:
        plain.start(serve_grpc=False)
        uploads(plain, plan)
        assert plain.norm_params("cam-1")[0] == 2
        plain_teacher, plain_student = params(plain, "teacher"), params(plain, "student")
    with CloudService(served(), tmp_path / "clocked", CLOCKED) as clocked:
        clocked.start(serve_grpc=False)
        uploads(clocked, plan)
        assert clocked.norm_params("cam-1")[0] == 4 == 32 // CLOCKED.replay_every
        last = clocked.log.last["cam-1"]
        # a replay-only step: as many samples as a step with new ones (8 + 8), all 16 in the buffer
        assert (last.new, last.replayed, last.teacher_kept) == (0, 16, 0)
        # the teacher learns from new uploads only: the same as without the clock; the student moved further
        teacher, student = params(clocked, "teacher"), params(clocked, "student")
        assert all(np.array_equal(teacher[k], plain_teacher[k]) for k in teacher)
        assert any(not np.array_equal(student[k], plain_student[k]) for k in student)
        # too few new samples for an update and nothing due: nothing runs
        clocked.upload("cam-1", 3, {"pixel_values": images(4, 3)}, stream_seen=39)
        clocked.flush(timeout=30)
        assert clocked.norm_params("cam-1")[0] == 4 and clocked.device("cam-1").pending() == 4
        # a device process that restarts its count reports less: the largest clock is kept, no burst follows
        clocked.upload("cam-1", 4, {"pixel_values": images(2, 4)}, stream_seen=3)
        clocked.flush(timeout=30)
        assert clocked.device("cam-1").meta["stream_seen"] == 39 and clocked.norm_params("cam-1")[0] == 4
        # the 6 waiting samples and a clock at 48: one update on new samples (v5), then one on replay (v6)
        clocked.upload("cam-1", 5, {"pixel_values": images(2, 5)}, stream_seen=48)
        clocked.flush(timeout=30)
        assert clocked.norm_params("cam-1")[0] == 6 and clocked.device("cam-1").pending() == 0
        row = clocked.status()["devices"]["cam-1"]  # what `fairedge-server cloud status` shows
        assert (row["stream_seen"], row["params_version"]) == (48, 6)
    # the clock is on disk: a restarted service knows it
    with CloudService(served(), tmp_path / "clocked", CLOCKED) as again:
        assert again.device("cam-1").meta["stream_seen"] == 48 and again.norm_params("cam-1")[0] == 6


@pytest.mark.parametrize(("pool", "replayed"), [("learned", 8), ("uploaded", 12)])
def test_replay_pool_uploaded_also_draws_the_samples_still_waiting(tmp_path, pool, replayed):
    # 8 samples learned (v1), then 4 more seen 16: too few for a step with new samples, but one replay-only
    # step is due; it draws from the 8 learned ones, or (as the public CEMA code's history) from all 12
    cfg = CLOCKED.model_copy(update={"replay_pool": pool})
    with CloudService(served(), tmp_path, cfg) as service:
        service.start(serve_grpc=False)
        uploads(service, [(8, 8), (4, 16)])
        last = service.log.last["cam-1"]
        assert service.norm_params("cam-1")[0] == 2 and (last.new, last.replayed) == (0, replayed)
        assert service.device("cam-1").pending() == 4  # replaying them does not count them as learned


def test_replay_pool_uploaded_never_replays_a_steps_own_new_samples(tmp_path):
    # 20 samples at once: the first step learns 8 new and replays from the 12 still waiting (not from its own 8)
    cfg = CFG.model_copy(update={"replay_pool": "uploaded", "replay_per_step": 16})
    with CloudService(served(), tmp_path, cfg) as service:
        service.start(serve_grpc=False)
        service.register("cam-1", "tiny", "v1")
        service.upload("cam-1", 1, {"pixel_values": images(20, 1)})
        service.flush(timeout=30)
        steps = service.log.updates
        last = service.log.last["cam-1"]
        # two steps of 8 new; the second replays from 8 learned + 4 waiting = 12 (of the 16 it may take)
        assert steps == 2 and (last.new, last.replayed) == (8, 12) and service.device("cam-1").pending() == 4


def test_replay_every_needs_a_replay_buffer():
    assert build_config({}).cloud.replay_every == 0  # off unless asked for
    assert build_config({}, ["cloud.replay_every=32"]).cloud.replay_every == 32
    with pytest.raises(ConfigError, match=r"cloud.replay_every=32 needs samples to replay, but cloud.buffer_size=0"):
        build_config({}, ["cloud.replay_every=32", "cloud.buffer_size=0"])
    with pytest.raises(ConfigError, match="cloud.replay_every"):
        build_config({}, ["cloud.replay_every=-1"])


def test_the_edge_runtime_reports_its_stream_clock_and_the_cloud_keeps_pace(merged_and_onnx, tmp_path):  # noqa: F811
    merged, onnx_path = merged_and_onnx
    x, y = images(48, seed=3), np.arange(48) % 10
    model = ServedModel.from_modules(merged.model, inputs=INPUTS, num_classes=10, model_id="tiny", model_version="v1")
    cfg = CLOUD_CFG.model_copy(update={"replay_every": 4})  # two updates per batch of 8 seen
    with CloudService(model, tmp_path / "state", cfg) as service:
        cam = start_for(service, "cam-5")

        def lockstep(rt: EdgeRuntime) -> None:
            assert rt.drain(timeout=20)
            service.flush(timeout=30)
            assert rt.wait_for_params(service.norm_params("cam-5")[0], timeout=10)

        edge = EDGE_CFG.model_copy(update={"select": "all"})
        with EdgeRuntime(onnx_path, edge, cloud=cam, device_id="cam-5", queue_dir=tmp_path / "q") as rt:
            report = rt.run(((x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)), after_batch=lockstep)
        # each upload of 8 makes one update on them and one on replay: versions 2, 4, ... in use by the next batch
        assert [b["params_version"] for b in report["batches"]] == [0, 2, 4, 6, 8, 10]
        assert service.device("cam-5").meta["stream_seen"] == 48 and service.norm_params("cam-5")[0] == 12
