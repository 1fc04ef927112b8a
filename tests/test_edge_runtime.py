"""The edge runtime: CEMA selection on synthetic logits, the disk upload queue (restart, byte bound,
epochs, a full disk and an unwritable folder), atomic norm-param swaps with PyTorch parity, and a
cloud that is down at first and comes back.

The cloud here is a minimal in-test gRPC servicer that records every batch it gets, so
"each selected sample arrives exactly once" can be checked directly; tests/test_edge_cloud.py
runs the runtime against the real cloud service.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from fairedge.client.edge import (
    CemaSelector,
    CloudEndpoint,
    EdgeRuntime,
    EdgeSession,
    FixedSelector,
    UploadQueue,
    batched,
)
from fairedge.client.edge.cloud_link import SERVICE, retry_service_config
from fairedge.client.edge.cloud_sync import Backoff
from fairedge.client.edge.inputs import open_stream
from fairedge.common.config import ConfigError, EdgeConfig, build_config, load_config
from fairedge.common.edge_format import InputSpec
from fairedge.common.edge_model import (
    MergedModel,
    export_onnx,
    forward_with_norm,
    norm_parameters,
    perturbed_norm,
)
from fairedge.common.models.vision import build_vision_classifier
from fairedge.common.tensor_proto import from_proto, to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc

SECRET = "edge-test-secret"
C = 10


def token(device: str) -> str:
    """The credential the recording cloud below accepts for `device`."""
    return f"{device}:{SECRET}"


# ---------------------------------------------------------------------------------------- selection


def logits_with_entropy(target: float, c: int = C) -> np.ndarray:
    """Logits (1, c) whose softmax entropy is `target` nats: one class at z, the others at 0 (bisection)."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        z = (lo + hi) / 2
        p = np.exp(np.r_[z, np.zeros(c - 1)])
        p /= p.sum()
        if -(p * np.log(p)).sum() > target:
            lo = z
        else:
            hi = z
    return np.r_[z, np.zeros(c - 1)][None, :]


def stack(entropies_as_fraction: list[float]) -> np.ndarray:
    return np.concatenate([logits_with_entropy(f * math.log(C)) for f in entropies_as_fraction])


def test_entropy_window_keeps_only_samples_between_e_min_and_e_max():
    sel = CemaSelector(C, e_min=0.1, e_max=0.4, dynamic_exclusion=False)
    out = sel.select(stack([0.05, 0.15, 0.39, 0.41, 0.9]))
    np.testing.assert_allclose(out.entropy / math.log(C), [0.05, 0.15, 0.39, 0.41, 0.9], atol=1e-5)
    assert out.mask.tolist() == [False, True, True, False, False]
    assert out.e_max == pytest.approx(0.4 * math.log(C))
    assert (sel.stats.seen, sel.stats.selected, sel.stats.below_e_min, sel.stats.above_e_max) == (5, 2, 1, 2)


def test_dynamic_exclusion_shrinks_e_max_with_the_running_mean_entropy():
    sel = CemaSelector(C, e_min=0.0, e_max=0.4, warmup_samples=4, e_max_coeff=1.0)
    first = sel.select(stack([0.3, 0.3, 0.3, 0.3]))  # warm-up: reference mean = 0.3 ln C
    assert first.e_max == pytest.approx(0.4 * math.log(C))
    second = sel.select(stack([0.1, 0.1, 0.1, 0.1, 0.35, 0.35, 0.35, 0.35]))
    # running mean (4·0.3 + 4·0.1 + 4·0.35) / 12 = 0.25 -> E_max = 0.4 · 0.25 / 0.3 = 1/3 of ln C
    assert second.e_max == pytest.approx(0.4 * (0.25 / 0.3) * math.log(C), rel=1e-4)
    assert second.mask.tolist() == [True] * 4 + [False] * 4  # 0.35 passed before, not any more
    # a stream getting more uncertain never widens the window beyond its start
    third = sel.select(stack([0.9] * 20))
    assert third.e_max == pytest.approx(0.4 * math.log(C))
    # the paper's coefficient scales the shrunk threshold; switched off, E_max stays put
    sel2 = CemaSelector(C, e_min=0.0, e_max=0.4, warmup_samples=4, e_max_coeff=0.5)
    sel2.select(stack([0.3] * 4))
    assert sel2.e_max_now == pytest.approx(0.5 * 0.4 * math.log(C))
    fixed = CemaSelector(C, e_min=0.0, e_max=0.4, warmup_samples=4, dynamic_exclusion=False)
    fixed.select(stack([0.3] * 4))
    fixed.select(stack([0.01] * 40))
    assert fixed.e_max_now == pytest.approx(0.4 * math.log(C))


def test_redundancy_filter_skips_predictions_close_to_the_uploaded_mean():
    a = logits_with_entropy(0.2 * math.log(C))  # confident in class 0
    b = np.roll(a, 5, axis=1)  # the same confidence in class 5
    sel = CemaSelector(C, e_min=0.0, e_max=0.4, dynamic_exclusion=False, redundancy_filter=True, redundancy_margin=0.5)
    assert sel.select(np.concatenate([a, a])).mask.tolist() == [True, True]  # nothing uploaded yet
    out = sel.select(np.concatenate([a, b, a]))  # class 0 again is redundant, class 5 is new
    assert out.mask.tolist() == [False, True, False]
    assert sel.stats.redundant == 2 and sel.stats.selected == 3
    plain = CemaSelector(C, e_min=0.0, e_max=0.4, dynamic_exclusion=False)
    plain.select(np.concatenate([a, a]))
    assert plain.select(np.concatenate([a, b, a])).mask.all()


def test_fixed_selectors_and_bad_arguments():
    x = stack([0.01, 0.5, 0.99])
    assert FixedSelector(C, upload=True).select(x).mask.all()
    assert not FixedSelector(C, upload=False).select(x).mask.any()
    broken = np.concatenate([stack([0.2]), np.full((1, C), np.nan)])  # a NaN input gives NaN logits
    assert CemaSelector(C, dynamic_exclusion=False).select(broken).mask.tolist() == [True, False]
    assert FixedSelector(C, upload=True).select(broken).mask.tolist() == [True, False]
    with pytest.raises(ValueError, match="e_min < e_max"):
        CemaSelector(C, e_min=0.5, e_max=0.4)
    with pytest.raises(ValueError, match="11 classes"):
        CemaSelector(C).select(np.zeros((2, 11)))
    with pytest.raises(ConfigError, match="edge.select"):
        build_config({"edge": {"select": "some"}})
    with pytest.raises(ConfigError, match="edge.queue_max_bytes = 0"):
        load_config(None, ["edge.queue_max_bytes=0"])


def test_backoff_is_jittered_below_a_doubling_cap_and_resets():
    caps = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    runs = []
    for seed in range(50):
        b = Backoff(0.5, 3.0, random.Random(seed))
        delays = [b.next() for _ in caps]
        assert all(0.0 <= d <= cap for d, cap in zip(delays, caps)), delays
        b.reset()
        assert b.next() <= 0.5
        runs.append(delays)
    spread = np.array(runs)
    assert len({tuple(r) for r in runs}) == len(runs)  # jittered: no two devices wait alike
    assert (spread[:, 3:].max(axis=0) > 2.5).all() and (spread[:, 3:].min(axis=0) < 0.5).all()  # full jitter
    same_seed = Backoff(0.5, 3.0, random.Random(7)), Backoff(0.5, 3.0, random.Random(7))
    assert [same_seed[0].next() for _ in caps] == [same_seed[1].next() for _ in caps]  # reproducible when seeded
    with pytest.raises(ValueError, match="initial"):
        Backoff(2.0, 1.0)


def test_unary_calls_carry_grpc_retry_policy_with_our_backoff():
    config = json.loads(retry_service_config(0.25, 4.0))
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Register", "GetNormParams"}
    assert method["retryPolicy"]["initialBackoff"] == "0.250s" and method["retryPolicy"]["maxBackoff"] == "4.000s"
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert pb.DESCRIPTOR.services_by_name["EdgeAdaptation"].full_name == SERVICE


# ---------------------------------------------------------------------------------------- queue


def batch_file_bytes(tmp_path, samples: int, features: int = 2) -> int:
    """The size of one queued batch file of `samples` float32 rows of `features` values."""
    probe = UploadQueue(tmp_path / "probe", device_id="probe", max_bytes=1 << 30, batch_samples=samples)
    probe.put({"x": np.zeros((samples, features), np.float32)}, np.ones(samples))
    return probe.pending_bytes


def test_queue_splits_batches_numbers_them_and_drops_the_oldest_beyond_its_byte_bound(tmp_path):
    four = batch_file_bytes(tmp_path, 4)
    q = UploadQueue(tmp_path / "q", device_id="d", max_bytes=3 * four + four // 2, batch_samples=4)  # ~3 files
    x = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)
    assert q.put({"x": x}, np.ones(9)) == [1, 2, 3]  # 4 + 4 + 1
    assert q.put({"x": x[:3]}, np.ones(3)) == [4]  # over the bound: batch 1 (4 samples) dropped
    c = q.counters()
    assert (c["pending_samples"], c["dropped_samples"], c["dropped_batches"], c["enqueued_samples"]) == (8, 4, 1, 12)
    assert c["pending_bytes"] == sum(f.stat().st_size for f in (tmp_path / "q" / "batches").iterdir())
    assert c["pending_bytes"] <= q.max_bytes
    batches = q.peek(10)
    assert [b.batch_id for b in batches] == [2, 3, 4]
    np.testing.assert_array_equal(batches[0].inputs["x"], x[4:8])
    assert q.ack([2, 3, 4], last_batch_id=3) == 5  # the cloud holds up to 3: batch 4 stays
    assert [b.batch_id for b in q.peek(10)] == [4]
    # one batch alone over the bound is dropped at once, counted, and pushes nothing else out
    assert q.put({"x": np.zeros((4, 2000), np.float32)}, np.ones(4)) == []
    assert q.counters()["dropped_samples"] == 8 and [b.batch_id for b in q.peek(10)] == [4]
    with pytest.raises(ValueError, match="belongs to device 'd'"):
        UploadQueue(tmp_path / "q", device_id="other", max_bytes=1000, batch_samples=4)


def test_queue_epoch_is_kept_across_restarts_and_new_with_a_new_folder(tmp_path):
    q = UploadQueue(tmp_path / "q", device_id="d", max_bytes=1 << 20, batch_samples=4)
    q.put({"x": np.zeros((8, 2), np.float32)}, np.ones(8))
    assert q.ack_through(1) == 4 and [b.batch_id for b in q.peek(10)] == [2]
    again = UploadQueue(tmp_path / "q", device_id="d", max_bytes=1 << 20, batch_samples=4)
    assert again.epoch == q.epoch and len(q.epoch) == 16 and again.counters()["next_batch_id"] == 3
    fresh = UploadQueue(tmp_path / "lost", device_id="d", max_bytes=1 << 20, batch_samples=4)
    assert fresh.epoch != q.epoch and fresh.counters()["next_batch_id"] == 1


def assert_queue_is_sound(folder, queue: UploadQueue) -> None:
    """Nothing half-written: no temporary file, every batch file loads, state.json parses and reserves every id."""
    files = list((folder / "batches").iterdir())
    assert not [f for f in files if f.name.startswith(".")], files
    for f in files:
        with np.load(f) as data:
            assert len(data["__entropy__"]) == int(f.stem.split("-")[1])
    state = json.loads((folder / "state.json").read_text())
    assert all(int(f.name[:12]) < state["next_batch_id"] for f in files)
    assert state["epoch"] == queue.epoch


def test_a_full_disk_keeps_the_device_predicting_counts_what_it_lost_and_leaves_no_corrupt_queue(
    exported, tmp_path, monkeypatch
):
    path, _ = exported
    cfg = EdgeConfig(select="all", batch_size=8, upload_batch_size=8, threads=1)
    real_fsync = os.fsync
    disk: dict[str, int | None] = {"free": None}  # bytes left; None = plenty

    def fsync(fd: int) -> None:  # as on a full disk, the kernel reports ENOSPC when the data is flushed
        st = os.fstat(fd)
        if disk["free"] is not None and stat.S_ISREG(st.st_mode) and st.st_size > disk["free"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    x = images(48)
    with EdgeRuntime(path, cfg, device_id="dev-f", queue_dir=tmp_path / "q") as rt:
        rt.process(x[:8])
        disk["free"] = 2000  # state.json still fits, a batch file (8 images) does not
        for start in range(8, 24, 8):
            assert len(rt.process(x[start : start + 8])) == 8  # predictions go on
        disk["free"] = 100  # not even state.json fits: no batch id can be reserved, so none is written
        assert len(rt.process(x[24:32])) == 8
        report = rt.report()
        assert report["queue"]["unsaved_samples"] == 24 and report["queue"]["pending_samples"] == 8
        assert "No space left on device" in report["queue_error"]
        assert_queue_is_sound(tmp_path / "q", rt.queue)
        disk["free"] = None  # room again: writing resumes by itself
        rt.process(x[32:40])
        assert rt.queue.pending_samples == 16 and rt.queue.counters()["unsaved_samples"] == 24
        used = {b.batch_id for b in rt.queue.peek(100)}
    with EdgeRuntime(path, cfg, device_id="dev-f", queue_dir=tmp_path / "q") as rt:  # a restart
        assert_queue_is_sound(tmp_path / "q", rt.queue)
        assert {b.batch_id for b in rt.queue.peek(100)} == used
        rt.process(x[40:48])
        assert min({b.batch_id for b in rt.queue.peek(100)} - used) > max(used)  # ids never reused


def test_an_unwritable_queue_folder_keeps_the_device_predicting(exported, tmp_path):
    path, _ = exported
    (tmp_path / "a-file").write_text("not a folder")  # a real OSError even for root: no folder can be made here
    cfg = EdgeConfig(select="all", batch_size=8, upload_batch_size=8, threads=1)
    with EdgeRuntime(path, cfg, device_id="dev-u", queue_dir=tmp_path / "a-file" / "q") as rt:
        preds = [rt.process(images(8, seed)) for seed in range(3)]
        report = rt.report()
    assert all(len(p) == 8 for p in preds) and report["predictions"] == 24
    assert report["queue"]["unsaved_samples"] == 24 and report["queue"]["pending_samples"] == 0
    assert "Not a directory" in report["queue_error"]


def test_a_kernel_write_limit_mid_file_leaves_whole_batches_only(tmp_path):
    """A real write failure part-way through a file (RLIMIT_FSIZE: EFBIG), in a child process."""
    script = """
import json, resource, signal, sys
import numpy as np
from fairedge.client.edge import UploadQueue
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
q = UploadQueue(sys.argv[1], device_id="d", max_bytes=1 << 30, batch_samples=4)
resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))  # no file may grow past 32 KiB
q.put({"x": np.ones((4, 4), np.float32)}, np.ones(4))  # ~1 KiB per batch: fits
q.put({"x": np.ones((8, 4096), np.float32)}, np.ones(8))  # 2 x 64 KiB: the kernel stops each write at 32 KiB
q.put({"x": np.ones((4, 4), np.float32)}, np.ones(4))
print(json.dumps(q.counters() | {"error": q.last_error}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "q")], capture_output=True, text=True, timeout=120, check=True
    )
    counters = json.loads(out.stdout)
    assert counters["unsaved_samples"] == 8 and counters["unsaved_batches"] == 2, counters
    assert counters["pending_samples"] == 8 and "File too large" in counters["error"]
    queue = UploadQueue(tmp_path / "q", device_id="d", max_bytes=1 << 30, batch_samples=4)
    assert_queue_is_sound(tmp_path / "q", queue)
    assert [b.batch_id for b in queue.peek(10)] == [1, 4] and queue.counters()["next_batch_id"] == 5


# ---------------------------------------------------------------------------------------- model


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    return build_vision_classifier(
        image_size=16,
        num_channels=1,
        num_classes=C,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        patch_size=4,
        seed=seed,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ViT exported once for the whole module: (onnx path, merged model)."""
    cfg = load_config(
        None,
        [
            "name=edge-runtime-test",
            "model.hidden_size=16",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.intermediate_size=32",
        ],
    )
    model = tiny_vit()
    merged = MergedModel(
        model, cfg, [InputSpec("pixel_values", (1, 16, 16), "float32")], [str(i) for i in range(C)], "tiny", "v1"
    )
    path = export_onnx(merged, tmp_path_factory.mktemp("edge") / "tiny.onnx")
    return path, merged


def images(n: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (shift + rng.standard_normal((n, 1, 16, 16))).astype(np.float32)


def test_swapped_params_match_pytorch_and_bad_sets_are_refused(exported):
    path, merged = exported
    sess = EdgeSession(path, threads=1)
    x = images(6)

    def ref(norm):
        return forward_with_norm(merged.model, norm, {"pixel_values": torch.from_numpy(x)}).numpy()

    with torch.no_grad():
        logits, version = sess.predict({"pixel_values": x})
        assert version == 0
        assert np.abs(logits - ref({})).max() <= 1e-4
        new = perturbed_norm(norm_parameters(merged.model), scale=0.3, seed=3)
        assert sess.swap(1, {k: v.numpy() for k, v in new.items()})
        logits, version = sess.predict({"pixel_values": x})
        assert version == 1
        assert np.abs(logits - ref(new)).max() <= 1e-4
        assert np.abs(logits - ref({})).max() > 1e-2  # the swap did change the model
    good = {k: v.numpy() for k, v in new.items()}
    assert not sess.swap(1, good)  # not newer
    name = next(iter(good))
    with pytest.raises(ValueError, match="missing"):
        sess.swap(2, {k: v for k, v in good.items() if k != name})
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        sess.swap(2, good | {name: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        sess.swap(2, good | {name: np.full_like(good[name], np.nan)})
    assert sess.params_version == 1  # refused sets leave the current one in place
    np.testing.assert_array_equal(sess.default_params()[name], norm_parameters(merged.model)[name].numpy())


def test_a_batch_never_sees_a_half_swapped_set(exported):
    path, merged = exported
    sess = EdgeSession(path, threads=1)
    base = {k: v.numpy() for k, v in norm_parameters(merged.model).items()}
    sets = [base, {k: v * 1.5 + 0.2 for k, v in base.items()}]
    x = images(4, seed=1)
    expected = []
    for s in sets:
        with torch.no_grad():
            expected.append(
                forward_with_norm(
                    merged.model, {k: torch.from_numpy(v) for k, v in s.items()}, {"pixel_values": torch.from_numpy(x)}
                ).numpy()
            )
    stop = threading.Event()

    def swapper() -> None:
        v = 1
        while not stop.is_set():
            sess.swap(v, sets[v % 2])
            v += 1

    t = threading.Thread(target=swapper)
    t.start()
    try:
        versions: set[int] = set()
        checked, deadline = 0, time.monotonic() + 20
        while checked < 150 or (versions != {0, 1} and time.monotonic() < deadline):  # thread timing varies
            logits, version = sess.predict({"pixel_values": x})
            if version:
                assert np.abs(logits - expected[version % 2]).max() <= 1e-4, version
                versions.add(version % 2)
            checked += 1
    finally:
        stop.set()
        t.join()
    assert versions == {0, 1}


# ---------------------------------------------------------------------------------------- runtime, no cloud


def test_queue_persists_across_a_restart_of_the_runtime_and_keeps_its_bound(exported, tmp_path):
    path, _ = exported
    cfg = EdgeConfig(select="all", batch_size=8, upload_batch_size=8, threads=1)
    x = images(48)
    with EdgeRuntime(path, cfg, device_id="dev-a", queue_dir=tmp_path / "q") as rt:
        report = rt.run(batched(zip(x[:24], [0] * 24), 8))
        one_batch = rt.queue.pending_bytes // 3  # the three batch files are the same size
    assert report["predictions"] == 24 and report["selected"] == 24 and report["accuracy"] is not None
    assert report["queue"]["pending_samples"] == 24 and report["queue"]["dropped_samples"] == 0
    cfg = cfg.model_copy(update={"queue_max_bytes": 5 * one_batch + one_batch // 2})
    with EdgeRuntime(path, cfg, device_id="dev-a", queue_dir=tmp_path / "q") as rt:
        assert rt.queue.pending_samples == 24  # survived the restart
        for start in range(24, 48, 8):
            rt.process(x[start : start + 8])
        report = rt.report()
        # 6 batches, room for 5: the oldest batch went, counted
        assert rt.queue.pending_samples == 40 and report["queue"]["dropped_samples"] == 8
        assert report["queue"]["pending_bytes"] <= cfg.queue_max_bytes
        kept = rt.queue.peek(100)
        assert [b.batch_id for b in kept] == [2, 3, 4, 5, 6]
        np.testing.assert_array_equal(kept[-1].inputs["pixel_values"], x[40:48])
    # the JSON log names its config and counts what happened
    rt.write_log(tmp_path / "log.json")
    assert '"config_name": "edge-runtime-test"' in (tmp_path / "log.json").read_text()


def test_input_streams_from_a_folder_and_a_dataset_file(exported, tmp_path):
    from PIL import Image

    path, _ = exported
    session = EdgeSession(path, threads=1)
    for label in ("3", "7"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "imgs" / label / "a.png")
    np.save(tmp_path / "imgs" / "loose.npy", np.zeros((1, 16, 16), np.float32))
    batches = list(open_stream(tmp_path / "imgs", session.info, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    np.testing.assert_allclose(batches[0].x[0], 1.0)  # white -> +1 on the [-1, 1] pixel scale
    assert batches[0].y.tolist() == [3, 7] and batches[1].y is None
    np.savez(tmp_path / "d.npz", x=images(5), y=np.arange(5))
    batches = list(open_stream(tmp_path / "d.npz", session.info, batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1] and batches[2].y.tolist() == [4]
    np.savez(tmp_path / "bad.npz", z=images(2))
    with pytest.raises(ValueError, match="no array 'x'"):
        list(open_stream(tmp_path / "bad.npz", session.info, batch_size=2))


# ---------------------------------------------------------------------------------------- runtime + cloud


class RecordingCloud(pb_grpc.EdgeAdaptationServicer):
    """A minimal cloud: token check, stores batches once per batch_id, publishes param versions on demand."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.batches: dict[int, np.ndarray] = {}
        self.resent = 0
        self.version, self.params = 0, {}
        self.cond = threading.Condition()

    def _auth(self, context) -> None:
        if (
            dict(context.invocation_metadata()).get("authorization", "").removeprefix("Bearer ").partition(":")[2]
            != SECRET
        ):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid access token")

    def publish(self, params: dict[str, np.ndarray]) -> None:
        with self.cond:
            self.version += 1
            self.params = params
            self.cond.notify_all()

    def Register(self, request, context):
        self._auth(context)
        with self.cond:
            last = max(self.batches, default=0)
        return pb.RegisterReply(
            params_version=self.version, norm_param_names=self.names, max_batch_samples=64, last_batch_id=last
        )

    def Upload(self, request_iterator, context):
        self._auth(context)
        for batch in request_iterator:
            with self.cond:
                if batch.batch_id in self.batches or batch.batch_id <= max(self.batches, default=0):
                    self.resent += 1
                else:
                    self.batches[batch.batch_id] = from_proto(batch.inputs[0])
        return pb.UploadReply(last_batch_id=max(self.batches, default=0), params_version=self.version)

    def _message(self) -> pb.NormParams:
        return pb.NormParams(version=self.version, params=[to_proto(k, v) for k, v in self.params.items()])

    def GetNormParams(self, request, context):
        self._auth(context)
        with self.cond:
            return self._message()

    def WatchNormParams(self, request, context):
        self._auth(context)
        known = request.known_version
        while context.is_active():
            with self.cond:
                self.cond.wait_for(lambda: self.version > known, timeout=0.2)  # noqa: B023  (the lambda runs inside this iteration)
                if self.version > known:
                    known = self.version
                    message = self._message()
                else:
                    continue
            yield message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(servicer: RecordingCloud, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_EdgeAdaptationServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("watch", [True, False])
def test_cloud_down_then_up_every_selected_sample_arrives_once_and_params_swap_in(exported, tmp_path, watch):
    path, merged = exported
    port = free_port()
    cfg = EdgeConfig(
        select="cema",
        e_min=0.0,
        e_max=1.0,
        dynamic_exclusion=False,
        batch_size=8,
        upload_batch_size=8,
        upload_batches_per_call=3,
        backoff_initial_s=0.05,
        backoff_max_s=0.3,
        rpc_timeout_s=2,
        watch_params=watch,
        threads=1,
    )
    endpoint = CloudEndpoint(f"127.0.0.1:{port}", token("dev-b"))
    x = images(64, seed=2, shift=1.0)
    cloud = RecordingCloud(list(norm_parameters(merged.model)))
    server = None
    with EdgeRuntime(path, cfg, cloud=endpoint, device_id="dev-b", queue_dir=tmp_path / "q") as rt:
        try:
            t0 = time.monotonic()
            for start in range(0, 32, 8):  # the cloud is not there: predictions still come, promptly
                assert len(rt.process(x[start : start + 8])) == 8
            assert time.monotonic() - t0 < 2.0
            selected_while_down = rt.selector.stats.selected
            assert selected_while_down > 0 and rt.queue.pending_samples == selected_while_down
            assert wait_until(lambda: rt.sync.status.failures > 0) and not rt.sync.status.registered
            server = serve(cloud, port)  # the cloud comes back
            for start in range(32, 64, 8):
                rt.process(x[start : start + 8])
            assert rt.drain(timeout=15), rt.sync.status
            received = np.concatenate([cloud.batches[i] for i in sorted(cloud.batches)])
            selected = rt.selector.stats.selected
            assert len(received) == selected and rt.queue.pending_samples == 0
            # exactly the selected samples, each once, in stream order
            assert len({a.tobytes() for a in received}) == selected
            assert {a.tobytes() for a in received} <= {a.tobytes() for a in x}
            new = {k: v.numpy() for k, v in perturbed_norm(norm_parameters(merged.model), seed=5).items()}
            cloud.publish(new)
            if not watch:  # without a watch stream the device learns of versions from upload replies
                rt.process(x[:8])
            assert wait_until(lambda: rt.session.params_version == 1), rt.sync.status
            rt.process(x[:8])
            assert rt.drain(timeout=15)
            report = rt.report()
            assert report["version_changes"][-1]["version"] == 1
            assert report["uploaded"] == report["selected"] == sum(len(b) for b in cloud.batches.values())
            assert report["bytes_up"] > received.nbytes and report["bytes_down"] > 0
        finally:
            if server is not None:
                server.stop(0)
    assert cloud.resent == 0


def test_wrong_token_is_recorded_and_nothing_is_lost(exported, tmp_path):
    path, merged = exported
    port = free_port()
    cloud = RecordingCloud(list(norm_parameters(merged.model)))
    server = serve(cloud, port)
    cfg = EdgeConfig(select="all", batch_size=8, backoff_initial_s=0.05, backoff_max_s=0.2, threads=1)
    try:
        with EdgeRuntime(
            path,
            cfg,
            cloud=CloudEndpoint(f"127.0.0.1:{port}", "dev-c:wrong-secret"),
            device_id="dev-c",
            queue_dir=tmp_path / "q",
        ) as rt:
            rt.process(images(8))
            assert wait_until(lambda: "UNAUTHENTICATED" in rt.sync.status.errors_by_code)
            assert "invalid access token" in rt.sync.status.last_error
            assert rt.queue.pending_samples == 8 and not cloud.batches
        # the same queue, the right token: the samples go up
        with EdgeRuntime(
            path,
            cfg,
            cloud=CloudEndpoint(f"127.0.0.1:{port}", token("dev-c")),
            device_id="dev-c",
            queue_dir=tmp_path / "q",
        ) as rt:
            assert rt.drain(timeout=10)
            assert sum(len(b) for b in cloud.batches.values()) == 8
    finally:
        server.stop(0)
