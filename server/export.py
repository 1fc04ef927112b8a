"""`fairedge-server export`: a run folder -> an ONNX model for the edge, checked on the run's own test data.

`fairedge.common.edge_model.export_onnx` already refuses an export whose normalisation parameters
could not be swapped; here we also measure what a person deciding to ship it wants to
know: how far ONNX Runtime is from PyTorch on real samples, with the trained and with
changed normalisation parameters, and (int8) how much accuracy quantisation costs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fairedge.common.data import TaskData
from fairedge.common.edge_format import model_inputs, onnx_logits, session
from fairedge.common.edge_model import (
    MergedModel,
    export_onnx,
    forward_with_norm,
    load_merged_model,
    norm_parameters,
    perturbed_norm,
)
from fairedge.common.task import load_task
from fairedge.common.training import evaluate_per_domain


@dataclass
class ExportReport:
    """Where the model went and how it compares to PyTorch on `samples` test samples."""

    path: Path
    model_id: str
    model_version: str
    quantized: bool
    size_bytes: int
    norm_params: int
    samples: int
    max_abs_diff_default: float  # ONNX Runtime vs PyTorch logits, trained norm parameters
    max_abs_diff_swapped: float  # same after swapping in changed norm parameters (no session rebuild)
    accuracy_torch: float
    accuracy_onnx: float
    argmax_agreement: float  # fraction of samples where ONNX and PyTorch predict the same class
    export_seconds: float
    ort_fusions: dict[str, int]  # offline ORT attention rewrites (`fairedge.common.edge_fusion`), by kind

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export_run(
    run_dir: str | Path, out: str | Path | None = None, *, int8: bool = False, max_samples: int = 512, seed: int = 0
) -> ExportReport:
    """Merge and export the run's global model, then compare it to PyTorch on up to `max_samples` test samples.

    `out` defaults to `<run_dir>/model.onnx` (`model-int8.onnx` with `int8`). The samples are a
    seeded random subset of the test split, so every domain is represented.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / ("model-int8.onnx" if int8 else "model.onnx")
    start = time.perf_counter()
    merged = load_merged_model(run_dir)
    task = load_task(merged.cfg)
    check_reproduces_run(merged, run_dir, task=task)
    export_onnx(merged, out, quantize=int8)
    seconds = time.perf_counter() - start

    test = task.test
    if len(test) == 0:
        raise ValueError(f"run {run_dir} has an empty test split: nothing to measure parity on")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:max_samples]
    sample = test.subset(idx)
    sess = session(out)
    norm = norm_parameters(merged.model)
    changed = perturbed_norm(norm, scale=0.1, seed=seed)
    ref, got, ref_sw, got_sw = [], [], [], []
    for i in range(0, len(sample), 64):
        feeds = model_inputs(merged, sample.x[i : i + 64])
        torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            ref.append(merged.model(**torch_feeds).numpy())
            ref_sw.append(forward_with_norm(merged.model, changed, torch_feeds).numpy())
        got.append(onnx_logits(sess, feeds))
        got_sw.append(onnx_logits(sess, feeds, changed))
    ref_a, got_a = np.concatenate(ref), np.concatenate(got)
    y = sample.y.numpy()
    return ExportReport(
        path=out,
        model_id=merged.model_id,
        model_version=merged.model_version,
        quantized=int8,
        size_bytes=out.stat().st_size,
        norm_params=len(norm),
        samples=len(sample),
        max_abs_diff_default=float(np.abs(got_a - ref_a).max()),
        max_abs_diff_swapped=float(np.abs(np.concatenate(got_sw) - np.concatenate(ref_sw)).max()),
        accuracy_torch=float((ref_a.argmax(1) == y).mean()),
        accuracy_onnx=float((got_a.argmax(1) == y).mean()),
        argmax_agreement=float((got_a.argmax(1) == ref_a.argmax(1)).mean()),
        export_seconds=seconds,
        ort_fusions=json.loads(sess.get_modelmeta().custom_metadata_map.get("fairedge.ort_fusions", "{}")),
    )


def check_reproduces_run(
    merged: MergedModel, run_dir: Path, tolerance: float = 0.01, *, task: TaskData | None = None
) -> None:
    """Raise unless the merged model scores the run's final per-domain test accuracy (`metrics.json`).

    The base model is rebuilt from the config by today's code; if that code or the data changed
    since the run, the adapter lands on a different base and the export would silently be a
    different model. A run without metrics.json is not checked. `task` is `load_task(merged.cfg)`,
    loaded here unless given.
    """
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return
    rounds = json.loads(metrics_file.read_text()).get("rounds") or []
    want = rounds[-1].get("accuracy", {}) if rounds else {}
    task = task or load_task(merged.cfg)
    got = evaluate_per_domain(merged.model, task.test, task.domains)
    off = {
        d: (got.get(d, float("nan")), acc) for d, acc in want.items() if not abs(got.get(d, -1.0) - acc) <= tolerance
    }
    if off:
        detail = ", ".join(f"{d}: {g:.4f} now vs {w:.4f} in the run" for d, (g, w) in list(off.items())[:3])
        raise ValueError(
            f"the merged model does not reproduce run {run_dir.name}'s final test accuracy ({detail}): the base "
            "model or data built from its config.toml differ from the run's (the code or cache changed since); "
            "nothing was exported"
        )


def describe(report: ExportReport) -> str:
    """A few lines for the terminal: where the file went and the parity measured."""
    r = report
    kind = "int8 (dynamic quantisation)" if r.quantized else "fp32"
    return (
        f"wrote {r.path} ({r.size_bytes / 1e6:.2f} MB, {kind}, model {r.model_id} version {r.model_version}, "
        f"{r.norm_params} normalisation parameters as swappable graph inputs) in {r.export_seconds:.1f} s\n"
        f"ONNX Runtime rewrites applied offline: {', '.join(f'{k} {v}' for k, v in r.ort_fusions.items()) or 'none'}\n"
        f"parity vs PyTorch on {r.samples} test samples: max |logit diff| {r.max_abs_diff_default:.2e} "
        f"(trained norm params), {r.max_abs_diff_swapped:.2e} (swapped norm params)\n"
        f"accuracy: PyTorch {r.accuracy_torch:.4f}, ONNX Runtime {r.accuracy_onnx:.4f} "
        f"(same prediction on {100 * r.argmax_agreement:.1f}% of samples)"
    )


def export_lm_run(run_dir: str | Path, out: str | Path | None = None, *, int8: bool = False) -> Path:
    """A causal-LM run's merged global model as an ONNX folder for generation with past key values.

    Default folder `<run>/onnx/`: `model.onnx` (fp32, checked against PyTorch), the tokenizer with its chat
    template, and with `int8` also `model_quantized.onnx`; `fairedge.common.lm_generate_ort` runs it
    without torch.
    """
    from transformers import AutoTokenizer, PreTrainedModel

    from fairedge.common.lm_onnx import export_causal_lm
    from fairedge.common.run_model import load_run_model
    from fairedge.common.task import causal_lm_dir

    cfg, model = load_run_model(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir(cfg), local_files_only=True)
    folder = Path(out) if out else Path(run_dir) / "onnx"
    export_causal_lm(cast(PreTrainedModel, model), tokenizer, folder, quantize=int8)
    return folder
