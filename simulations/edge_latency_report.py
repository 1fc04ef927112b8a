"""The markdown report of `bench_edge_latency` (its JSON result -> `edge_latency.md`).

Section titles starting with "Latency" and "Swapping" are what `edge_tables.latency_summary` copies
into the edge study's report: keep them.
"""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    ("torch_eager", "PyTorch eager"),
    ("ort_fp32", "ORT fp32"),
    ("ort_int8", "ORT int8"),
    ("ort_fp32_folded", "fp32, norms folded"),
    ("ort_int8_folded", "int8, norms folded"),
    ("ort_fp32_unfused", "fp32, unfused"),
    ("ort_int8_unfused", "int8, unfused"),
)


def _latency_table(res: dict[str, Any]) -> list[str]:
    head = "| model | batch | load avg | " + " | ".join(title for _, title in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(_COLUMNS))]
    for name, m in res["models"].items():
        for batch, lat in m["latency"].items():
            med, sp = lat["median_ms"], lat["speedup_vs_torch"]
            cells = [f"{med['torch_eager']:.2f}"] + [
                f"{med[key]:.2f} (**{sp[key]:.2f}×**)"
                if key in ("ort_fp32", "ort_int8")
                else f"{med[key]:.2f} ({sp[key]:.2f}×)"
                for key, _ in _COLUMNS[1:]
            ]
            load = "–".join(f"{v:.1f}" for v in lat.get("load_average", []))
            lines.append(f"| {name} | {batch.split('_')[1]} | {load} | " + " | ".join(cells) + " |")
    return lines


def _cpu_table(res: dict[str, Any]) -> list[str]:
    """Median CPU time of the calling thread per call, and the speed-ups it gives."""
    lines = ["| model | batch | " + " | ".join(title for _, title in _COLUMNS) + " |"]
    lines.append("|" + "---|" * (2 + len(_COLUMNS)))
    for name, m in res["models"].items():
        for batch, lat in m["latency"].items():
            med, sp = lat.get("median_cpu_ms"), lat.get("speedup_cpu_vs_torch")
            if med and sp:
                cells = [f"{med['torch_eager']:.2f}"] + [
                    f"{med[key]:.2f} (**{sp[key]:.2f}×**)"
                    if key in ("ort_fp32", "ort_int8")
                    else f"{med[key]:.2f} ({sp[key]:.2f}×)"
                    for key, _ in _COLUMNS[1:]
                ]
                lines.append(f"| {name} | {batch.split('_')[1]} | " + " | ".join(cells) + " |")
    return lines


def _swap_table(res: dict[str, Any]) -> list[str]:
    lines = [
        "| model | norm params (values) | fp32: defaults / new norm feeds | fp32 swap overhead, wall / CPU "
        "| int8: defaults / new norm feeds | int8 swap overhead, wall / CPU | rebuild + run (fp32) | rebuild / swapped run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        s = m["swap"]
        cells = []
        for kind in ("fp32", "int8"):
            k = s[kind]
            cells += [
                f"{k['run_with_defaults_ms']:.2f} / {k['run_with_new_norm_feeds_ms']:.2f} ms",
                f"{k['swap_overhead_ms']:+.2f} / {k.get('swap_overhead_cpu_ms', float('nan')):+.2f} ms",
            ]
        lines.append(
            f"| {name} | {s['norm_params']} ({s['norm_values']:,}) | " + " | ".join(cells) + " | "
            f"{s['rebuild_session_and_run_ms']:.1f} ms | {s['rebuild_over_swapped_run']:.0f}× |"
        )
    return lines


def _ops_table(res: dict[str, Any]) -> list[str]:
    """Op types whose count differs between the graphs ONNX Runtime runs (after its own optimisation)."""
    kinds = ("fp32_unfused", "fp32", "fp32_folded", "int8_unfused", "int8", "int8_folded")
    lines = ["| model | op type | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, m in res["models"].items():
        ops = m["ort_optimised_ops"]
        types = sorted({t for k in kinds for t in ops[k]})
        for t in types:
            counts = [ops[k].get(t, 0) for k in kinds]
            if len(set(counts)) > 1:
                lines.append(f"| {name} | {t} | " + " | ".join(map(str, counts)) + " |")
        lines.append(f"| {name} | *all nodes* | " + " | ".join(str(sum(ops[k].values())) for k in kinds) + " |")
    return lines


def _same_as_folded(m: dict[str, Any]) -> str:
    ops = m["ort_optimised_ops"]
    same = [k for k in ("fp32", "int8") if ops[k] == ops[f"{k}_folded"]]
    return " and ".join(same) if same else "neither"


def _quality_table(res: dict[str, Any]) -> list[str]:
    kinds = (("fp32", "fp32"), ("fp32_unfused", "fp32 unfused"), ("int8", "int8"))
    head = "| model | samples | |logit| max | " + " | ".join(f"{t} diff / swapped" for _, t in kinds)
    lines = [head + " | int8 same argmax | accuracy torch / fp32 / int8 |", "|---|---|---|" + "---|" * (len(kinds) + 2)]
    for name, m in res["models"].items():
        q = m["quality"]
        acc = (
            f"{q['accuracy_torch']:.4f} / {q['fp32']['accuracy']:.4f} / {q['int8']['accuracy']:.4f}"
            if "accuracy_torch" in q
            else "n/a"
        )
        diffs = [f"{q[k]['max_abs_diff_vs_torch']:.1e} / {q[k]['max_abs_diff_vs_torch_swapped']:.1e}" for k, _ in kinds]
        lines.append(
            f"| {name} | {q['samples']} | {q['logit_abs_max_torch']:.2f} | " + " | ".join(diffs) + " | "
            f"{100 * q['int8']['argmax_agreement_with_torch']:.1f}% | {acc} |"
        )
    return lines


def markdown(res: dict[str, Any]) -> str:
    """The whole report."""
    lines = [
        "# Edge inference latency: ONNX Runtime vs PyTorch eager",
        "",
        f"Generated by `{res['command']}` in {res['wall_seconds'] / 60:.1f} min.",
        f"Machine: {res['machine']}; torch {res['torch']}, onnxruntime {res['onnxruntime']}, onnxscript "
        f"{res.get('onnxscript', '?')}; one thread for torch and ONNX Runtime (CPU provider, default optimisation "
        f"level). Load average {res['load_start']:.1f} at start, {res['load_end']:.1f} at end (per row below: "
        "before–after its measurement): the machine was shared, so absolute times are noisy and the "
        f"speed-ups are what to read: ratios of medians of calls made alternately ({res['repeats']} rounds after "
        "3 warm-up rounds, one call of every column per round, in a fresh random order).",
        "",
        "## Latency (median ms per call, speed-up over PyTorch eager)",
        "",
        "**ORT fp32 / int8**: what `fairedge-server export` ships: attention fused into ORT's `MultiHeadAttention` "
        "offline (`fairedge.common.edge_fusion`), norm parameters swappable graph inputs. **norms folded**: the "
        "same graphs with the norm parameters constant initializers, the speed ceiling of a model whose norm "
        "parameters cannot change. **unfused**: the export without the offline fusion (what shipped before).",
        "",
        *_latency_table(res),
        "",
        "The same calls in CPU time of the calling thread (`time.thread_time`; with one thread both runtimes "
        "compute on it), which leaves out the time other jobs held the core — the steadier measure on this "
        "busy machine (it still includes their effect on shared caches and on the sibling hyper-thread):",
        "",
        *_cpu_table(res),
        "",
        "## Swapping norm parameters vs rebuilding the session (batch 1)",
        "",
        "*swap*: one run whose feed carries the whole new set of norm parameters (no rebuild). *rebuild*: write "
        "the new values into the initializers, serialise, build a new InferenceSession and run once — what a "
        "model with folded norm parameters would need. The swap overhead is the difference of two medians "
        "(wall time, and CPU time of the calling thread) on a shared machine: values within ±10 % of the run time "
        "are noise.",
        "",
        *_swap_table(res),
        "",
        "## What blocks and what the offline fusion changes",
        "",
        "Node counts of the graphs ONNX Runtime actually runs (`SessionOptions.optimized_model_filepath`, default "
        "level), op types whose count differs between the variants. The norm parameters as graph inputs block no "
        "fusion: ORT's load-time optimisers turn `LayerNormalization` (+ residual `Add`) into "
        "`SkipLayerNormalization` and `Gelu` into `BiasGelu` with them as inputs just as with them folded; the "
        "optimised graphs of shipped and folded variants have identical op counts (here: "
        + ", ".join(f"{name}: {_same_as_folded(m)}" for name, m in res["models"].items())
        + "). What stayed unfused was attention: the dynamo exporter writes `scaled_dot_product_attention` "
        "decomposed (MatMul, Softmax, an `IsNaN`/`Where` guard, per-head Reshape/Transpose), a pattern that "
        "neither ORT's load-time fusions nor `onnxruntime.transformers.optimizer` (model_type bert) match, with "
        "or without folded norms. onnxscript's ORT rewriter matches it and keeps graph inputs, so the export "
        "runs its attention rules offline and ships `MultiHeadAttention`; Q, K and V stay separate MatMuls so "
        "that dynamic int8 quantisation reaches them (a packed `Attention` node stays fp32 when quantised). "
        "Offline rewrites applied: "
        + "; ".join(
            f"{name}: " + (", ".join(f"{k} {v}" for k, v in m["offline_fusions"].items()) or "none")
            for name, m in res["models"].items()
        )
        + ".",
        "",
        *_ops_table(res),
        "",
        "## Parity and int8 quality",
        "",
        "Max |logit difference| to PyTorch on the samples, with the trained norm parameters and after swapping in "
        "changed ones (weights × (1 + 0.1·N(0,1)) + 0.1·N(0,1), in the same session).",
        "",
        *_quality_table(res),
        "",
        "## Models",
        "",
    ]
    for name, m in res["models"].items():
        size = m["size_mb"]
        lines.append(
            f"- **{name}**: {m['model']}; config `{m['config']}` (hash `{m['config_hash']}`); inputs "
            + ", ".join(f"`{i['name']}` {tuple(i['shape'])} {i['dtype']}" for i in m["inputs"])
            + f"; ONNX {size['fp32']:.1f} MB fp32, {size['int8']:.1f} MB int8; "
            f"export {m['export_seconds_fp32']:.1f} s (fusion included)."
        )
    lines += [
        "",
        "int8: `onnxruntime.quantization.quantize_dynamic` of the fused graph, QInt8 weights with per-channel "
        "scales; norm parameters stay fp32 graph inputs. MiniLM timings exclude tokenization (done before the "
        "graph, the same for both runtimes) and every text is padded to 64 tokens, as on the edge.",
        "",
    ]
    return "\n".join(lines)
