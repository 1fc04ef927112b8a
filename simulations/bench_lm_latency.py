"""Causal-LM generation on the edge: ONNX Runtime (fp32, int8) vs PyTorch eager, per generated token.

    python -m fairedge.simulations.bench_lm_latency [--new-tokens 32] [--threads 1 2] [--repeats 3]
        [--model-dir HF_FOLDER [--adapter PEFT_ADAPTER]] [--export-dir DIR]

The model is the built-in SmolLM2-135M-Instruct (converted once from its GGUF into the cache folder:
`$FAIREDGE_CACHE_DIR`, else the user's cache) or `--model-dir` with an optional LoRA adapter merged in. It is
exported once with `fairedge.common.lm_onnx.export_causal_lm` (decoder with past key values, fp32 and int8)
into `<cache>/onnx/<model>` (or `--export-dir`); later runs reuse that folder.

Beside what the export ships (`model.onnx`, blockwise int8 `model_quantized.onnx`) it measures two graphs it
builds once into the same folder, to show why the export is as it is: `bench_fp32_fused.onnx`, the fp32 graph
after onnxscript's ONNX Runtime fusions (RMSNorm, skip-RMSNorm, attention), and `bench_int8_dynamic.onnx`,
ONNX Runtime's `quantize_dynamic` (one scale per activation tensor), the usual int8 recipe for encoders.

Checks, on fixed chat prompts: max |logit difference| to PyTorch for the prompt and 5 decoding steps (each side
with its own KV cache); whether the greedy replies (up to `--new-tokens` tokens, stopping at EOS) are the
same token ids as `model.generate(do_sample=False)`; and, fed PyTorch's reply (teacher forcing), how often
each graph predicts PyTorch's next token and the KL divergence of its next-token distribution from PyTorch's.

Latency: batch 1, exactly `--new-tokens` new tokens per prompt (EOS ignored, so every backend does the same
work), PyTorch `generate` with its `DynamicCache` vs the torch-free loop of `fairedge.common.lm_generate_ort`.
Per generated token = the median time between consecutive tokens (decoding steps); the prompt's time (time to
first token) is reported apart. Backends run alternately, one generation each per round, so load from other
processes hits them alike. Writes `simulations/results/lm_latency.{json,md}`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import transformers
from transformers import StoppingCriteria, StoppingCriteriaList

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import CACHE_ENV
from fairedge.common.lm_generate_ort import FP32_FILE, INT8_FILE, OrtCausalLM
from fairedge.common.lm_onnx import (
    PARITY_TOLERANCE,
    export_causal_lm,
    load_merged_causal_lm,
    logits_parity,
    quantize_causal_lm,
)
from fairedge.common.models.causal_lm import builtin_model_dir
from fairedge.common.quiet_logs import quiet_root_logger
from fairedge.simulations.paths import RESULTS, display

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    "Explain what a neural network is in one sentence.",
)
BACKENDS = ("torch_eager", "ort_fp32", "ort_fp32_fused", "ort_int8", "ort_int8_dynamic")
ORT_FILES = {
    "ort_fp32": FP32_FILE,
    "ort_fp32_fused": "bench_fp32_fused.onnx",
    "ort_int8": INT8_FILE,
    "ort_int8_dynamic": "bench_int8_dynamic.onnx",
}
LABELS = {
    "torch_eager": "PyTorch eager",
    "ort_fp32": "ORT fp32",
    "ort_fp32_fused": "ORT fp32 + fusions",
    "ort_int8": "ORT int8 blockwise (shipped)",
    "ort_int8_dynamic": "ORT int8 dynamic",
}
PARITY_STEPS = 5
TIMINGS_FILE = "export_seconds.json"
"""How long this benchmark's export took, kept in the export folder for the reports of later runs."""


class _Stamps(StoppingCriteria):
    """Records the time after each generation step (transformers calls stopping criteria once per token)."""

    def __init__(self, stamps: list[float]) -> None:
        self.stamps = stamps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _torch_generate(model: Any, ids: list[int], n: int, pad: int, *, fixed: bool, stamps: list[float]) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n if fixed else None,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_Stamps(stamps)]),
        )
    return [int(t) for t in out[0, len(ids) :]]


def _timed(run: Callable[[list[float]], Any]) -> tuple[float, list[float]]:
    """(time to first token, [time of each later token]) in ms."""
    stamps: list[float] = []
    start = time.perf_counter()
    run(stamps)
    points = [start, *stamps]
    gaps = [1000 * (b - a) for a, b in itertools.pairwise(points)]
    return gaps[0], gaps[1:]


def _prepare(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    cache = Path(os.environ.get(CACHE_ENV) or _user_cache())
    model_dir = Path(args.model_dir) if args.model_dir else builtin_model_dir(cache, log=log)
    name = model_dir.name + (f"+{Path(args.adapter).name}" if args.adapter else "")
    export_dir = Path(args.export_dir) if args.export_dir else cache / "onnx" / name
    made: dict[str, Any] = {}
    if not (export_dir / FP32_FILE).is_file():
        log(f"exporting {name} to {export_dir} (once; may take many minutes)...")
        model, tokenizer = load_merged_causal_lm(model_dir, args.adapter)
        start = time.perf_counter()
        export_causal_lm(model, tokenizer, export_dir, quantize=False, log=log)
        made["export_fp32_seconds"] = time.perf_counter() - start
    if not _has_op(export_dir / INT8_FILE, "MatMulNBits"):  # missing, or an older export's dynamic int8
        start = time.perf_counter()
        quantize_causal_lm(export_dir)
        made["quantize_int8_seconds"] = time.perf_counter() - start
    if not (export_dir / ORT_FILES["ort_fp32_fused"]).is_file():
        log("fusing the fp32 graph with onnxscript's ONNX Runtime rules (once)...")
        made["fusions"] = _fuse(export_dir / FP32_FILE, export_dir / ORT_FILES["ort_fp32_fused"])
    if not (export_dir / ORT_FILES["ort_int8_dynamic"]).is_file():
        log("quantising the fp32 graph with quantize_dynamic (once)...")
        _quantize_dynamic(export_dir / FP32_FILE, export_dir / ORT_FILES["ort_int8_dynamic"])
    timings = export_dir / TIMINGS_FILE
    if made:
        atomic_write_json(timings, {**_read_json(timings), **made, "load_average": os.getloadavg()[0]})
    return model_dir, export_dir, _read_json(timings)


def _file_mb(path: Path) -> float:
    """Size of an ONNX file with its external data, if any, in MB."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6


def _has_op(path: Path, op_type: str) -> bool:
    return path.is_file() and any(n.op_type == op_type for n in onnx.load(str(path)).graph.node)


def _fuse(src: Path, dst: Path) -> dict[str, int]:
    """onnxscript's ORT fusions (the dynamo export's RMSNorm and attention are patterns ORT's own optimiser misses)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with quiet_root_logger():
        model, counts = optimize_for_ort(ir.load(str(src)))
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        ir.save(model, f"{tmp}/{dst.name}")
        os.replace(f"{tmp}/{dst.name}", dst)
    return {k: int(v) for k, v in counts.items() if v}


def _quantize_dynamic(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic int8 (per-channel int8 MatMul weights, one scale per activation tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, quiet_root_logger():
        quantize_dynamic(
            str(src), f"{tmp}/q.onnx", weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
        )
        os.replace(f"{tmp}/q.onnx", dst)


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _shown(path: Path) -> str:
    """A path for the report: relative to the repository, or to the cache folder (`<cache>/...`)."""
    cache = Path(os.environ.get(CACHE_ENV) or _user_cache()).resolve()
    return f"<cache>/{path.resolve().relative_to(cache)}" if path.resolve().is_relative_to(cache) else display(path)


def _user_cache() -> str:
    from platformdirs import user_cache_dir

    return user_cache_dir("fairedge")


def _quality(model: Any, ort: dict[str, OrtCausalLM], prompts: list[list[int]], n: int, pad: int) -> dict[str, Any]:
    per_prompt = []
    for text, ids in zip(PROMPTS, prompts, strict=True):
        want = _torch_generate(model, ids, n, pad, fixed=False, stamps=[])
        row: dict[str, Any] = {"prompt": text, "prompt_tokens": len(ids), "torch_reply": _decode(ort, want)}
        with torch.no_grad():
            reference = model(torch.tensor([ids + want])).logits[0, len(ids) - 1 : -1].double().numpy()
        for name, lm in ort.items():
            got = lm.generate_ids([ids], n)[0]
            same = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
            )
            x = np.array([ids + want])
            forced = lm.forward(x, np.ones_like(x), lm.empty_past(1))[0][0, len(ids) - 1 : -1].astype(np.float64)
            top2 = np.sort(reference[same])[-2:] if got != want and same < len(want) else None
            row[name] = {
                "logit_max_abs_diff": max(logits_parity(model, lm, ids, steps=PARITY_STEPS)),
                "same_greedy_ids": got == want,
                "same_prefix_tokens": same,
                # how close PyTorch's own top two tokens were where the replies part
                "torch_top2_margin_at_divergence": None if top2 is None else float(top2[1] - top2[0]),
                "next_token_agreement": float((forced.argmax(-1) == reference.argmax(-1)).mean()),
                "kl_from_torch": _mean_kl(reference, forced),
                "reply": _decode(ort, got),
            }
        per_prompt.append(row)
    return {
        "prompts": per_prompt,
        **{
            name: {
                "logit_max_abs_diff": max(r[name]["logit_max_abs_diff"] for r in per_prompt),
                "same_greedy_ids_all": all(r[name]["same_greedy_ids"] for r in per_prompt),
                "same_greedy_replies": sum(r[name]["same_greedy_ids"] for r in per_prompt),
                "next_token_agreement": statistics.mean(r[name]["next_token_agreement"] for r in per_prompt),
                "kl_from_torch": statistics.mean(r[name]["kl_from_torch"] for r in per_prompt),
            }
            for name in ort
        },
    }


def _divergence(cell: dict[str, Any]) -> str:
    if cell["same_greedy_ids"]:
        return "same"
    margin = cell.get("torch_top2_margin_at_divergence")
    return f"{cell['same_prefix_tokens']}" + (f" ({margin:.2f})" if margin is not None else "")


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) ‖ softmax(q)), in nats."""
    log_p = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    log_q = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def _ort_models(export_dir: Path, threads: int | None = None) -> dict[str, OrtCausalLM]:
    return {name: OrtCausalLM(export_dir / file, threads=threads) for name, file in ORT_FILES.items()}


def _decode(ort: dict[str, OrtCausalLM], ids: list[int]) -> str:
    return str(next(iter(ort.values())).tokenizer.decode(ids, skip_special_tokens=True))


def _latency(
    model: Any, export_dir: Path, prompts: list[list[int]], n: int, pad: int, threads: int, repeats: int
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    ort = _ort_models(export_dir, threads)

    def ort_run(lm: OrtCausalLM) -> Callable[[list[int], list[float]], Any]:
        return lambda ids, s: lm.generate_ids([ids], n, stop_at_eos=False, stamps=s)

    runs: dict[str, Callable[[list[int], list[float]], Any]] = {
        "torch_eager": lambda ids, s: _torch_generate(model, ids, n, pad, fixed=True, stamps=s),
        **{name: ort_run(lm) for name, lm in ort.items()},
    }
    for run in runs.values():  # warm-up
        _timed(partial(run, prompts[0]))
    first: dict[str, list[float]] = {b: [] for b in BACKENDS}
    per_token: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for _ in range(repeats):
        for ids in prompts:
            for name, run in runs.items():
                ttft, steps = _timed(partial(run, ids))
                first[name].append(ttft)
                per_token[name].extend(steps)
    med = {b: statistics.median(per_token[b]) for b in BACKENDS}
    return {
        "threads": threads,
        "decode_steps_timed": {b: len(per_token[b]) for b in BACKENDS},
        "ms_per_token_median": med,
        "ms_first_token_median": {b: statistics.median(first[b]) for b in BACKENDS},
        "tokens_per_second": {b: 1000 / med[b] for b in BACKENDS},
        "speedup_vs_torch": {b: med["torch_eager"] / med[b] for b in BACKENDS},
    }


def _markdown(res: dict[str, Any]) -> str:
    q = res["quality"]
    lines = [
        "# Causal-LM generation latency: ONNX Runtime vs PyTorch eager",
        "",
        f"Generated by `{res['command']}` in {res['wall_seconds'] / 60:.1f} min.",
        f"Model: {res['model']} ({res['model_dir']}), exported to `{res['export_dir']}` "
        f"({res['size_mb']['ort_fp32']:.0f} MB fp32, {res['size_mb']['ort_int8']:.0f} MB int8). {res['export_note']}",
        f"Machine: {res['machine']}, {os.cpu_count()} cores; torch {res['torch']}, transformers "
        f"{res['transformers']}, onnxruntime {res['onnxruntime']} (CPU provider, default optimisation level). "
        f"Load average {res['load_start']:.1f} at start, {res['load_end']:.1f} at end: the machine was shared with "
        "other engineers' jobs, so absolute times are noisy; the backends ran alternately (one generation each per "
        f"round, {res['repeats']} rounds over {len(PROMPTS)} prompts) so the ratios are fairer than the times.",
        *(
            [
                "",
                f"**Contended run:** the load average exceeded the {os.cpu_count()} cores, so rows with more than one "
                "thread measure competition for cores (PyTorch's thread pool suffers most) rather than the speed-up "
                "a second core gives on an idle device.",
            ]
            if max(res["load_start"], res["load_end"]) > (os.cpu_count() or 1) and max(res["threads"]) > 1
            else []
        ),
        "",
        f"## Per generated token (batch 1, {res['new_tokens']} new tokens, median ms between tokens)",
        "",
        "Speed-ups are over PyTorch eager in the same row; *first token* is the prompt's time (ms).",
        "",
        "| threads | "
        + " | ".join(LABELS[b] for b in BACKENDS)
        + " | "
        + " | ".join(f"{LABELS[b]} speed-up" for b in BACKENDS[1:])
        + " | first token (ms): "
        + " / ".join(LABELS[b] for b in BACKENDS)
        + " |",
        "|---" * (2 * len(BACKENDS) + 1) + "|",
    ]
    for lat in res["latency"]:
        med, sp, ft = lat["ms_per_token_median"], lat["speedup_vs_torch"], lat["ms_first_token_median"]
        lines.append(
            f"| {lat['threads']} | "
            + " | ".join(f"{med[b]:.1f}" for b in BACKENDS)
            + " | "
            + " | ".join(f"{sp[b]:.2f}×" for b in BACKENDS[1:])
            + " | "
            + " / ".join(f"{ft[b]:.0f}" for b in BACKENDS)
            + " |"
        )
    ort_names = [b for b in BACKENDS if b != "torch_eager"]
    lines += [
        "",
        "## Quality against PyTorch",
        "",
        f"*max logit diff*: max |logit difference| over the prompt and {PARITY_STEPS} decoding steps (allowed for "
        f"fp32: {PARITY_TOLERANCE:.0e}); *next-token agreement* and *KL*: fed PyTorch's greedy reply, how often the "
        "graph's most likely next token is PyTorch's, and the mean KL(PyTorch ‖ graph) of the next-token "
        f"distributions (nats), over the {len(PROMPTS)} prompts' replies; *same replies*: greedy replies (up to "
        f"{res['new_tokens']} tokens, stopping at EOS) identical to `model.generate(do_sample=False)`'s.",
        "",
        "| graph | size (MB) | max logit diff | next-token agreement | KL (nats) | same replies |",
        "|---|---|---|---|---|---|",
    ]
    for b in ort_names:
        s = q[b]
        lines.append(
            f"| {LABELS[b]} | {res['size_mb'][b]:.0f} | {s['logit_max_abs_diff']:.1e} "
            f"| {100 * s['next_token_agreement']:.1f} % | {s['kl_from_torch']:.4f} "
            f"| {s['same_greedy_replies']} of {len(q['prompts'])} |"
        )
    if res.get("fusions"):
        lines += [
            "",
            "Fusions in `ORT fp32 + fusions` (onnxscript `optimize_for_ort`): "
            + ", ".join(f"{k} {v}" for k, v in res["fusions"].items())
            + ".",
        ]
    lines += [
        "",
        "Per prompt: the greedy reply agrees with PyTorch's for *prefix* tokens (*same* when all do); in brackets,",
        "PyTorch's margin between its two most likely tokens where the replies part (logits): a small margin",
        "is a near-tie that any rounding can flip.",
        "",
        "| prompt | " + " | ".join(LABELS[b] for b in ort_names) + " |",
        "|---" * (len(ort_names) + 1) + "|",
    ]
    for r in q["prompts"]:
        cells = [_divergence(r[b]) for b in ort_names]
        lines.append(f"| {r['prompt']} | " + " | ".join(cells) + " |")
    lines += ["", "### Replies", ""]
    for r in q["prompts"]:
        lines += [f"**{r['prompt']}**", "", f"- PyTorch: {' '.join(r['torch_reply'].split())}"]
        lines += [f"- {LABELS[b]}: {' '.join(r[b]['reply'].split())}" for b in ort_names]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the prompts per thread count")
    parser.add_argument("--model-dir", help="a local Hugging Face causal-LM folder (default: the built-in SmolLM2)")
    parser.add_argument("--adapter", help="a PEFT adapter folder to merge into the model before export")
    parser.add_argument("--export-dir", help="where the ONNX export lives (default: <cache>/onnx/<model>)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for lm_latency.{json,md}")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or min(args.threads) < 1:
        parser.error("--new-tokens must be >= 2, --repeats and every --threads >= 1")

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    model_dir, export_dir, made = _prepare(args, log)
    model, _ = load_merged_causal_lm(model_dir, args.adapter)
    ort = _ort_models(export_dir)
    prompts = [ort["ort_fp32"].prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    pad = ort["ort_fp32"].info.pad_token_id
    log("checking parity and greedy replies...")
    quality = _quality(model, ort, prompts, args.new_tokens, pad)
    latency = []
    for threads in args.threads:
        log(f"timing with {threads} thread(s)...")
        latency.append(_latency(model, export_dir, prompts, args.new_tokens, pad, threads, args.repeats))
        log(f"  ms/token: {latency[-1]['ms_per_token_median']}")
    export_note = (
        f"Export (once, reused by later runs): {made['export_fp32_seconds'] / 60:.1f} min for fp32 with its parity "
        f"check, {made['quantize_int8_seconds']:.0f} s int8 quantisation"
        + (f" (load average {made['load_average']:.1f} when it ended)." if "load_average" in made else ".")
        if {"export_fp32_seconds", "quantize_int8_seconds"} <= set(made)
        else "The export's duration was not recorded (the folder was made elsewhere)."
    )
    res = {
        "command": " ".join(
            ["python -m fairedge.simulations.bench_lm_latency", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": model_dir.name + (f" + adapter {args.adapter}" if args.adapter else ""),
        "model_dir": _shown(model_dir),
        "export_dir": _shown(export_dir),
        "export_note": export_note,
        **made,
        "size_mb": {name: _file_mb(export_dir / file) for name, file in ORT_FILES.items()},
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "quality": quality,
        "latency": latency,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    atomic_write_json(out / "lm_latency.json", res)
    atomic_write_text(out / "lm_latency.md", _markdown(res) + "\n")
    log(f"wrote {out / 'lm_latency.md'}")


if __name__ == "__main__":
    main()
