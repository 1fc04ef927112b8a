"""Load test of the CEMA cloud service: N devices upload concurrently over loopback gRPC (issue 15 part 4).

    python -m fairedge.simulations.bench_cloud_load [--devices 10 50] [--duration 120] [--quick]

The cloud (`CloudService` on the digits ViT the edge study serves: `simulations/configs/digits.toml`'s
architecture, its pre-trained base merged with a fresh LoRA adapter, `load_served_model` of a run
folder built here) runs in its own process, so its RSS is its own. Every device has its own credential
(`CredentialStore.issue`) and gRPC channel and uploads the digits test images at a steady pace;
device 0 floods (back-to-back batches of `FLOOD_BATCH`, as fast as the cloud acknowledges them,
backing off only when the cloud says UNAVAILABLE). The devices are simulated at the wire (no ONNX
Runtime): this measures the cloud.

Loss and double use are counted by sample: each uploaded image carries its (device, sequence) id in
the lowest 8 mantissa bits of its first 4 pixels (a relative change below 1e-5), the cloud process
records the ids of every new sample a learning step consumes, and at the end reads the ids of the
samples still waiting in each device's state. lost = acknowledged - consumed - waiting; used twice =
ids consumed more than once. Writes `simulations/results/cloud_load.{json,md}`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import psutil

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.tensor_proto import to_proto
from fairedge.common.wire import edge_service_pb2 as pb
from fairedge.common.wire import edge_service_pb2_grpc as pb_grpc
from fairedge.simulations.paths import CONFIG, RESULTS
from fairedge.simulations.report import one_decimal

BATCH = 8
"""Samples per upload of an ordinary device."""
INTERVAL_S = 2.0
"""An ordinary device uploads one batch every this many seconds (4 samples/s)."""
FLOOD_BATCH = 64
"""Samples per upload of the flooding device (device 0), sent back to back."""
SEQ_BITS = 20
"""A sample id is device << SEQ_BITS | sequence number."""
CLOUD_SETTINGS = ["cloud.threads=1"]
"""The cloud config (defaults otherwise: 32 new + 96 replayed per update, 10 000-sample buffers)."""


def stamp(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A copy of `x` (n, ...) float32 whose first 4 values per sample carry `ids` in their lowest byte."""
    out = np.ascontiguousarray(x, dtype=np.float32).copy()
    bits = out.reshape(len(out), -1)[:, :4].view(np.uint32)
    for j in range(4):
        bits[:, j] = (bits[:, j] & np.uint32(0xFFFFFF00)) | ((ids >> (8 * j)) & 0xFF).astype(np.uint32)
    return out


def read_ids(x: np.ndarray) -> np.ndarray:
    """The ids `stamp` wrote into `x`."""
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)[:, :4].view(np.uint32) & 0xFF
    return cast(np.ndarray, sum(bits[:, j].astype(np.int64) << (8 * j) for j in range(4)))  # 4 terms: never sum's 0


# ----- the cloud process -----


def build_run(folder: Path) -> Path:
    """A run folder of the digits config: pre-trained ViT base (cached) + a fresh LoRA adapter (merged = base)."""
    from fairedge.common.config import load_config, to_toml
    from fairedge.common.lora import save_adapter
    from fairedge.common.task import lora_model

    cfg = load_config(CONFIG, CLOUD_SETTINGS)
    run = folder / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(cfg))
    save_adapter(lora_model(cfg), run / "adapter")
    return run


def serve(run: str, state_dir: str, conn: Any) -> None:
    """The cloud process: serve until told to stop, recording the ids each learning step consumed."""
    import torch

    from fairedge.common.config import load_config
    from fairedge.server.cloud import CloudService, load_served_model

    torch.set_num_threads(1)
    cfg = load_config(Path(run) / "config.toml").cloud
    service = CloudService(load_served_model(run), state_dir, cfg, seed=0)
    name = service.input_names[0]
    consumed: list[tuple[float, np.ndarray]] = []
    step = service.learner.step

    def recording_step(params: Any, new: Any, replay: Any = None) -> Any:
        consumed.append((time.time(), read_ids(new[name].numpy())))
        return step(params, new, replay)

    service.learner.step = recording_step  # type: ignore[method-assign]
    address = service.start(host="127.0.0.1", port=0)
    conn.send((address, os.getpid(), (service.model.model_id, service.model.model_version), name))
    conn.recv()  # the load is over
    service.stop()
    waiting = {}
    for device_id, row in service.status(running=False)["devices"].items():
        if not row.get("registered"):
            continue
        device = service.device(device_id)
        total = device.meta["total_accepted"]
        if total > device.consumed:
            waiting[device_id] = read_ids(device.samples.gather(range(device.consumed, total))[0])
    conn.send(
        {
            "consumed": [(t, ids) for t, ids in consumed],
            "waiting": waiting,
            "updates": service.log.updates,
            "update_s": service.log.seconds,
            "failures": service.log.failures,
            "cfg": cfg.model_dump(),
        }
    )


# ----- the devices -----


class SimulatedDevice(threading.Thread):
    """One device: its own channel and credential; uploads stamped digits images until `stop` is set."""

    def __init__(self, index: int, address: str, token: str, model: tuple[str, str], input_name: str, **kw: Any):
        super().__init__(name=f"device-{index}", daemon=True)
        self.model, self.input_name = model, input_name
        images, stop, flood = kw["images"], kw["stop"], kw["flood"]
        self.index, self.device_id, self.flood = index, f"dev-{index:03d}", flood
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.EdgeAdaptationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.images, self.stop = images, stop
        self.rng = np.random.default_rng(index)
        self.acked: list[tuple[float, np.ndarray]] = []  # (ack time, ids)
        self.latency_s: list[float] = []
        self.refusals: Counter[str] = Counter()
        self.seq = 0

    def run(self) -> None:
        self.stub.Register(
            pb.RegisterRequest(device_id=self.device_id, model_id=self.model[0], model_version=self.model[1]),
            metadata=self.metadata,
            timeout=60,
        )
        n = FLOOD_BATCH if self.flood else BATCH
        next_at = time.monotonic() + self.rng.uniform(0, INTERVAL_S)  # devices do not upload in lockstep
        batch_id = 0
        while not self.stop.is_set():
            if not self.flood:
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at += INTERVAL_S
            ids = (self.index << SEQ_BITS) + np.arange(self.seq, self.seq + n)
            picks = self.rng.integers(0, len(self.images), n)
            batch_id += 1
            message = pb.SampleBatch(
                device_id=self.device_id,
                batch_id=batch_id,
                inputs=[to_proto(self.input_name, stamp(self.images[picks], ids))],
            )
            while not self._send(message, ids) and not self.stop.is_set():
                time.sleep(0.05)  # UNAVAILABLE (too many samples waiting) or a failed call: retry the batch
            self.seq += n
        self.channel.close()

    def _send(self, message: pb.SampleBatch, ids: np.ndarray) -> bool:
        t0 = time.perf_counter()
        try:
            reply = self.stub.Upload(iter([message]), metadata=self.metadata, timeout=60)
        except grpc.RpcError as err:
            self.refusals[err.code().name] += 1
            return False
        self.latency_s.append(time.perf_counter() - t0)
        if reply.accepted + reply.resent != len(ids):
            raise AssertionError(f"{self.device_id}: batch of {len(ids)} acknowledged as {reply}")
        self.acked.append((time.time(), ids))
        return True


def rss_sampler(pid: int, stop: threading.Event, out: list[tuple[float, float]], every_s: float = 1.0) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        out.append((time.time(), proc.memory_info().rss / 2**20))
        stop.wait(every_s)


def run_load(run: Path, images: np.ndarray, n_devices: int, duration_s: float) -> dict[str, Any]:
    """One load test: `n_devices` devices (device 0 floods) for `duration_s` seconds; the figures."""
    from fairedge.server.cloud import CredentialStore

    state = Path(tempfile.mkdtemp(prefix="cloud-load-"))
    store = CredentialStore(state / "credentials.json")
    tokens = [store.issue(f"dev-{i:03d}") for i in range(n_devices)]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    server = ctx.Process(target=serve, args=(str(run), str(state), there), daemon=True)
    server.start()
    address, pid, model, input_name = here.recv()
    stop, sampling = threading.Event(), threading.Event()
    rss: list[tuple[float, float]] = []
    sampler = threading.Thread(target=rss_sampler, args=(pid, sampling, rss), daemon=True)
    devices = [
        SimulatedDevice(i, address, tokens[i], model, input_name, images=images, stop=stop, flood=i == 0)
        for i in range(n_devices)
    ]
    sampler.start()
    t_start = time.time()
    for d in devices:
        d.start()
    time.sleep(duration_s)
    stop.set()
    for d in devices:
        d.join(timeout=120)
    t_end = time.time()
    sampling.set()
    sampler.join()
    here.send("stop")
    cloud = here.recv()
    server.join(timeout=60)
    return summarise(devices, cloud, rss, t_start, t_end, n_devices)


def summarise(
    devices: Sequence[SimulatedDevice],
    cloud: dict[str, Any],
    rss: list[tuple[float, float]],
    t_start: float,
    t_end: float,
    n_devices: int,
) -> dict[str, Any]:
    """The figures of one load test (see the module docstring)."""
    acked_at = {int(i): t for d in devices for t, ids in d.acked for i in ids}
    used = Counter(int(i) for _, ids in cloud["consumed"] for i in ids)
    used_at = {int(i): t for t, ids in cloud["consumed"] for i in ids}
    waiting = {int(i) for ids in cloud["waiting"].values() for i in ids}
    lost = set(acked_at) - set(used) - waiting
    twice = sum(1 for n in used.values() if n > 1) + len(waiting & set(used))
    unacked_used = len(set(used) - set(acked_at))
    window = t_end - t_start
    in_window = [i for i, t in used_at.items() if t <= t_end]
    per_device_used = Counter(i >> SEQ_BITS for i in in_window)
    per_device_acked = Counter(i >> SEQ_BITS for i in acked_at)
    total_used = sum(per_device_used.values())
    ordinary = [d.index for d in devices if not d.flood]
    served_fraction = [per_device_used[i] / max(1, per_device_acked[i]) for i in ordinary]
    lag = [used_at[i] - acked_at[i] for i in in_window if i in acked_at and (i >> SEQ_BITS) in ordinary]

    def pct(values: Sequence[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    def ms(latencies: Sequence[float], q: float) -> float:
        value = pct(latencies, q)
        if value is None:  # no ordinary upload acknowledged: a run too short for the first (up to INTERVAL_S in)
            raise ValueError(f"ack_latency_ms: no upload acknowledged in {window:.1f} s, no p{q:g} latency")
        return 1e3 * value

    lat_ordinary = [x for d in devices if not d.flood for x in d.latency_s]
    lat_flood = [x for d in devices if d.flood for x in d.latency_s]
    times = np.array([t - t_start for t, _ in rss])
    mb = np.array([m for _, m in rss])
    half = times >= times[-1] / 2
    refusals: Counter[str] = Counter()
    for d in devices:
        refusals.update(d.refusals)
    return {
        "devices": n_devices,
        "duration_s": window,
        "uploads_acknowledged": sum(len(d.acked) for d in devices),
        "samples_acknowledged": len(acked_at),
        "samples_used": sum(used.values()),
        "samples_waiting_at_end": len(waiting),
        "samples_lost": len(lost),
        "samples_used_twice": twice,
        "samples_used_never_acknowledged": unacked_used,
        "refusals": dict(refusals),
        "ack_latency_ms": {
            "ordinary_p50": ms(lat_ordinary, 50),
            "ordinary_p99": ms(lat_ordinary, 99),
            "flooder_p50": ms(lat_flood, 50) if lat_flood else None,
            "flooder_p99": ms(lat_flood, 99) if lat_flood else None,
            "all_p50": ms(lat_ordinary + lat_flood, 50),
            "all_p99": ms(lat_ordinary + lat_flood, 99),
        },
        "updates": cloud["updates"],
        "update_failures": cloud["failures"],
        "updates_per_s": sum(1 for t, _ in cloud["consumed"] if t <= t_end) / window,
        "learner_busy_fraction": cloud["update_s"] / window,
        "rss_mb": {
            "start": float(mb[0]),
            "peak": float(mb.max()),
            "end": float(mb[-1]),
            "slope_mb_per_min": float(np.polyfit(times, mb, 1)[0] * 60) if len(mb) > 2 else None,
            "slope_second_half_mb_per_min": float(np.polyfit(times[half], mb[half], 1)[0] * 60)
            if half.sum() > 2
            else None,
            "samples": [[round(float(t), 1), round(float(m), 1)] for t, m in zip(times, mb)],
        },
        "fair_share": {
            "flooder_acked_per_s": per_device_acked[0] / window,
            "ordinary_acked_per_s_each": statistics.mean(per_device_acked[i] for i in ordinary) / window,
            "flooder_share_of_learner": per_device_used[0] / max(1, total_used),
            "ordinary_share_of_learner_each": statistics.mean(per_device_used[i] for i in ordinary)
            / max(1, total_used),
            "ordinary_served_fraction_min": min(served_fraction),
            "ordinary_served_fraction_mean": statistics.mean(served_fraction),
            "ordinary_ack_to_learned_s_p50": pct(lag, 50),
            "ordinary_ack_to_learned_s_p99": pct(lag, 99),
        },
    }


# ----- the report -----


def markdown(result: dict[str, Any]) -> str:
    """The results as a page: how it was run, then one row per N."""
    m, c = result["machine"], result["config"]
    lines = [
        "# Cloud load test",
        "",
        f"Command: `{result['command']}` ({result['date']}).",
        "",
        f"Machine: {m['cpus']} CPU cores, {m['platform']}, Python {m['python']}; **shared with other jobs** "
        f"(1-minute load average {m['load_before'][0]:.1f} before the run, {m['load_after'][0]:.1f} after); "
        "the cloud process and the simulated devices (another process) compete for the same cores.",
        "",
        f"Setup: the cloud (`CloudService`, its own process, learner on 1 torch thread) serves the digits ViT "
        f"({c['model']}); device 0 floods back-to-back batches of {c['flood_batch']} samples, every other device "
        f"uploads {c['batch']} digits test images every {c['interval_s']:g} s; each device has its own credential "
        f"and channel; {c['duration_s']:g} s per N. Cloud settings: defaults plus {', '.join(c['cloud_settings'])} "
        f"(update = {c['new_per_step']} new + {c['replay_per_step']} replayed samples, "
        f"at least {c['min_new_per_update']} waiting; at most {c['max_pending_samples']} waiting per device, "
        "beyond that UNAVAILABLE and the device retries).",
        "",
        "| N | uploads acked | samples acked | used | waiting at end | lost | used twice | ack p50 / p99 ms "
        "(ordinary) | ack p50 / p99 ms (flooder) | updates/s | RSS MB start / peak / end | RSS slope MB/min "
        "(all / 2nd half) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lat, mem = r["ack_latency_ms"], r["rss_mb"]
        lines.append(
            f"| {r['devices']} | {r['uploads_acknowledged']} | {r['samples_acknowledged']} | {r['samples_used']} | "
            f"{r['samples_waiting_at_end']} | **{r['samples_lost']}** | **{r['samples_used_twice']}** | "
            f"{lat['ordinary_p50']:.1f} / {lat['ordinary_p99']:.1f} | {one_decimal(lat['flooder_p50'])} / "
            f"{one_decimal(lat['flooder_p99'])} | {r['updates_per_s']:.1f} | {mem['start']:.0f} / {mem['peak']:.0f} / "
            f"{mem['end']:.0f} | {mem['slope_mb_per_min']:+.1f} / {mem['slope_second_half_mb_per_min']:+.1f} |"
        )
    lines += [
        "",
        "## One flooder vs the others (per-device share of the learner)",
        "",
        "| N | flooder acked samples/s | ordinary acked samples/s (each) | flooder share of learned samples | "
        "ordinary share (each) | ordinary: share of its samples learned during the load (min / mean) | "
        "ordinary: ack to learned p50 / p99 s | refusals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        f = r["fair_share"]
        lines.append(
            f"| {r['devices']} | {f['flooder_acked_per_s']:.0f} | {f['ordinary_acked_per_s_each']:.1f} | "
            f"{f['flooder_share_of_learner']:.1%} | {f['ordinary_share_of_learner_each']:.2%} | "
            f"{f['ordinary_served_fraction_min']:.2f} / {f['ordinary_served_fraction_mean']:.2f} | "
            f"{one_decimal(f['ordinary_ack_to_learned_s_p50'])} / {one_decimal(f['ordinary_ack_to_learned_s_p99'])} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['refusals'].items())) or '-'} |"
        )
    lines += ["", "## Server memory over time", "", *rss_table(result["runs"]), "", *NOTES]
    return "\n".join(lines) + "\n"


WARM_UP_S = 60.0
"""RSS samples before this are the start-up fill (model, gRPC threads, first buffers), left out of the slope."""


def rss_table(runs: Sequence[dict[str, Any]], parts: int = 5) -> list[str]:
    """Median RSS per fifth of each run (min–max beside it) and the slope after the warm-up: a plateau with
    noise shows as equal medians, a leak as rising ones."""
    head = " | ".join(f"{i}/{parts}" for i in range(1, parts + 1))
    lines = [
        f"Median RSS MB (min–max) per {parts}th of the run, and the least-squares slope after the first "
        f"{WARM_UP_S:g} s:",
        "",
        f"| N | {head} | slope after {WARM_UP_S:g} s MB/min |",
        "|---|" + "---|" * (parts + 1),
    ]
    for r in runs:
        t, mb = np.array(r["rss_mb"]["samples"], dtype=float).T
        edges = np.linspace(0.0, t[-1], parts + 1)
        cells = []
        for a, b in itertools.pairwise(edges):
            w = mb[(t >= a) & (t <= b)]
            cells.append(f"{np.median(w):.0f} ({w.min():.0f}–{w.max():.0f})")
        warm = t >= WARM_UP_S
        slope = float(np.polyfit(t[warm], mb[warm], 1)[0] * 60) if warm.sum() > 2 else float("nan")
        lines.append(f"| {r['devices']} | {' | '.join(cells)} | {slope:+.1f} |")
    return lines


NOTES = [
    "How to read it:",
    "",
    "- lost = acknowledged samples neither learned from nor still waiting in the cloud's state; used twice = "
    "samples a learning step consumed more than once (or consumed and still waiting). Both are counted by the "
    "id each image carries, from the ids the learner consumed, so they must be 0.",
    "- The learner takes one device per update, the one whose last update is the oldest among those with "
    "enough samples waiting (round robin), at most `new_per_step` samples each: a flooder gets one update per "
    "round like everyone else, and the spare capacity. An ordinary device's samples wait for the learner until "
    "it has `min_new_per_update` of them (at its pace, several seconds): that, not the flooder, sets the "
    "ack-to-learned lag; the samples still waiting at the end are those.",
    "- The flooder is held back by `max_pending_samples`: once that many of its samples wait, its uploads are "
    "refused with UNAVAILABLE (the refusals column) and it retries after 50 ms.",
    "- RSS grows while the flooder's backlog and replay buffer fill (both bounded: `max_pending_samples` and "
    "`buffer_size` per device, about 1 KB per digits sample) and then moves up and down by tens of MB as the "
    "learner and the gRPC threads allocate and free; so a slope over a few minutes is noisy, and the medians "
    "per part of the run are the better test of a plateau.",
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 50], help="N per load test")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load per N")
    parser.add_argument("--quick", action="store_true", help="a 15-s smoke test per N (results not written)")
    parser.add_argument("--out", default=str(RESULTS / "cloud_load"), help="results file stem (.json and .md)")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>.md from <out>.json (no load)")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.out + ".json").read_text())
        atomic_write_text(Path(args.out + ".md"), markdown(result))
        print(f"wrote {args.out}.md from {args.out}.json")
        return
    if any(n < 2 for n in args.devices):
        parser.error("--devices: each N must be at least 2 (one flooder and one ordinary device)")
    duration = 15.0 if args.quick else args.duration
    from fairedge.common.config import load_config
    from fairedge.common.task import load_task

    load_before = os.getloadavg()
    images = load_task(load_config(CONFIG)).test.x.numpy()
    runs = []
    with tempfile.TemporaryDirectory(prefix="cloud-load-run-") as tmp:
        run = build_run(Path(tmp))
        cfg = load_config(run / "config.toml").cloud
        for n in args.devices:
            print(f"load test: {n} devices for {duration:g} s", flush=True)
            result = run_load(run, images, n, duration)
            runs.append(result)
            print(
                f"  {result['uploads_acknowledged']} uploads, lost {result['samples_lost']}, twice "
                f"{result['samples_used_twice']}, ack p50/p99 {result['ack_latency_ms']['all_p50']:.0f}/"
                f"{result['ack_latency_ms']['all_p99']:.0f} ms, {result['updates_per_s']:.1f} updates/s, "
                f"RSS {result['rss_mb']['start']:.0f}->{result['rss_mb']['end']:.0f} MB",
                flush=True,
            )
    model = load_config(CONFIG).model
    result = {
        "command": "python -m fairedge.simulations.bench_cloud_load " + shlex.join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "shared": True,
        },
        "config": {
            "model": f"builtin-vit, hidden {model.hidden_size}, {model.num_layers} layers, 1x16x16 inputs",
            "batch": BATCH,
            "interval_s": INTERVAL_S,
            "flood_batch": FLOOD_BATCH,
            "duration_s": duration,
            "cloud_settings": CLOUD_SETTINGS,
            "new_per_step": cfg.new_per_step,
            "replay_per_step": cfg.replay_per_step,
            "min_new_per_update": cfg.min_new_per_update,
            "max_pending_samples": cfg.max_pending_samples,
            "buffer_size": cfg.buffer_size,
        },
        "runs": runs,
    }
    bad = [r["devices"] for r in runs if r["samples_lost"] or r["samples_used_twice"] or r["update_failures"]]
    if args.quick:
        print(markdown(result))
    else:
        atomic_write_json(Path(args.out + ".json"), result)
        atomic_write_text(Path(args.out + ".md"), markdown(result))
        print(f"wrote {args.out}.json and .md")
    if bad:
        raise SystemExit(f"samples lost, used twice or failed updates with N = {bad}")


if __name__ == "__main__":
    main()
