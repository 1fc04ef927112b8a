"""The edge study's Markdown tables, computed from its result rows (pure functions, no files)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from fairedge.simulations.edge_lockstep import MODES
from fairedge.simulations.report import mean_std


def gains(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per seed: accuracy of each mode, gains over no adaptation, and gain_cema / gain_all."""
    by = {(r["mode"], r["seed"]): r for r in rows}
    out = {}
    for seed in sorted({r["seed"] for r in rows}):
        if not all((m, seed) in by for m in MODES):
            continue
        acc = {m: by[(m, seed)]["accuracy"] for m in MODES}
        g_cema, g_all = acc["cema"] - acc["none"], acc["all"] - acc["none"]
        out[seed] = {
            **{f"acc_{m}": a for m, a in acc.items()},
            "gain_cema": g_cema,
            "gain_all": g_all,
            "gain_ratio": g_cema / g_all if g_all > 0 else math.nan,
            "uploaded_cema": by[("cema", seed)]["uploaded_fraction"],
        }
    return out


def target_misses(g: dict[int, dict[str, float]]) -> dict[str, list[int]]:
    """The seeds that miss the issue's target, which holds per seed (a mean over seeds is not enough):
    `over` uploaded more than half the stream, `short` kept under 0.9 of the gain of uploading everything,
    `lost` had no gain to keep (uploading everything did not help)."""
    return {
        "over": [seed for seed, v in g.items() if v["uploaded_cema"] > 0.5],
        "short": [seed for seed, v in g.items() if v["gain_ratio"] < 0.9],
        "lost": [seed for seed, v in g.items() if math.isnan(v["gain_ratio"])],
    }


def ratio_interval(
    by_mode: dict[str, Sequence[Sequence[float]] | None], segments: int, draws: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % interval of one seed's gain ratio over the stream's batches: the three modes' per-batch records
    (`[start, samples, correct, ...]`, the same batches in each) resampled together, within each segment.

    It says how much of a ratio is the luck of which images were scored, given what each mode learned; it
    does not cover another stream's path (other seeds do). None without per-batch records."""
    if not all(by_mode.get(m) for m in MODES):
        return None
    rec = {m: np.asarray(by_mode[m], dtype=np.float64) for m in MODES}
    n = len(rec["none"])
    per = n // segments if segments and n % segments == 0 else n  # no batch straddles two segments
    rng = np.random.default_rng(seed)
    idx = np.concatenate([s + rng.integers(0, per, (draws, per)) for s in range(0, n, per)], axis=1)
    correct = {m: rec[m][idx, 2].sum(1) for m in MODES}
    gain_all = correct["all"] - correct["none"]
    ratios = np.where(gain_all > 0, (correct["cema"] - correct["none"]) / np.maximum(gain_all, 1), np.nan)
    if np.isnan(ratios).mean() > 0.025:  # uploading everything gains nothing in too many draws
        return None
    lo, hi = np.nanquantile(ratios, [0.025, 0.975])
    return float(lo), float(hi)


def mode_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per mode, mean ± std over seeds."""
    lines = [
        "| mode | accuracy | uploaded fraction | bytes up / run | bytes down / run | cloud versions "
        "| wall s / run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        mean = {k: statistics.mean(r[k] for r in sel) for k in ("bytes_up", "bytes_down", "params_version", "seconds")}
        lines.append(
            f"| {mode} | {mean_std([r['accuracy'] for r in sel])} | {mean_std([r['uploaded_fraction'] for r in sel], '{:.3f}')} "
            f"| {mean['bytes_up']:,.0f} | {mean['bytes_down']:,.0f} | {mean['params_version']:.1f} "
            f"| {mean['seconds']:.1f} | {len(sel)} |"
        )
    return "\n".join(lines)


def gain_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per seed and mean: accuracies, gains over no adaptation (points), the gain ratio and CEMA's uploads."""
    g = gains(rows)
    lines = [
        "| seed | none | CEMA | all | gain CEMA (pts) | gain all (pts) | gain ratio CEMA/all "
        "| its 95 % interval over batches | CEMA uploaded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, v in g.items():
        seed_rows = [r for r in rows if r["seed"] == seed]
        interval = ratio_interval(
            {r["mode"]: r.get("batches") for r in seed_rows}, len(seed_rows[0].get("segment_accuracy", {}))
        )
        lines.append(
            f"| {seed} | {v['acc_none']:.4f} | {v['acc_cema']:.4f} | {v['acc_all']:.4f} "
            f"| {100 * v['gain_cema']:+.2f} | {100 * v['gain_all']:+.2f} | {v['gain_ratio']:.2f} "
            f"| {'–' if interval is None else f'[{interval[0]:.2f}, {interval[1]:.2f}]'} | {v['uploaded_cema']:.1%} |"
        )
    if len(g) > 1:
        col = lambda k: [v[k] for v in g.values()]  # noqa: E731
        lines.append(
            f"| mean | {mean_std(col('acc_none'))} | {mean_std(col('acc_cema'))} | {mean_std(col('acc_all'))} "
            f"| {mean_std([100 * x for x in col('gain_cema')], '{:+.2f}')} "
            f"| {mean_std([100 * x for x in col('gain_all')], '{:+.2f}')} | {_ratio_cell(col('gain_ratio'))} | "
            f"| {mean_std([100 * x for x in col('uploaded_cema')], '{:.1f}')} % |"
        )
    return "\n".join(lines)


def _ratio_cell(ratios: Sequence[float]) -> str:
    """Mean ± std of the defined gain ratios, saying over how many seeds when some are undefined."""
    defined = [r for r in ratios if not math.isnan(r)]
    return mean_std(ratios, "{:.2f}") + (
        f" ({len(defined)} of {len(ratios)} seeds)" if len(defined) < len(ratios) else ""
    )


def segment_table(rows: Sequence[dict[str, Any]], segments: Sequence[str]) -> str:
    """Accuracy per corruption segment (mean over seeds), one column per mode."""
    lines = ["| segment | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for seg in segments:
        cells = []
        for mode in MODES:
            vals = [r["segment_accuracy"][seg] for r in rows if r["mode"] == mode and seg in r["segment_accuracy"]]
            cells.append(f"{statistics.mean(vals):.4f}" if vals else "-")
        lines.append(f"| {seg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(rows: Sequence[dict[str, Any]], chosen: str | None = None) -> str:
    """Seed-0 tuning runs: one line per setting (none is the same for every setting), the chosen one in bold."""
    none = next((r["accuracy"] for r in rows if r["mode"] == "none"), math.nan)
    lines = [
        f"No adaptation: accuracy {none:.4f}.\n",
        "| setting | overrides | CEMA acc | all acc | gain CEMA (pts) | gain all (pts) | ratio | CEMA uploaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["setting"] for r in rows):
        by = {r["mode"]: r for r in rows if r["setting"] == label}
        if "cema" not in by or "all" not in by:
            continue
        c, a = by["cema"]["accuracy"], by["all"]["accuracy"]
        ratio = (c - none) / (a - none) if a > none else math.nan
        name = f"**{label}**" if label == chosen else label
        lines.append(
            f"| {name} | `{' '.join(by['cema']['overrides']) or '-'}` | {c:.4f} | {a:.4f} "
            f"| {100 * (c - none):+.2f} | {100 * (a - none):+.2f} | {ratio:.2f} "
            f"| {by['cema']['uploaded_fraction']:.1%} |"
        )
    return "\n".join(lines)


def headroom_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per corruption, served vs label-fitted norm params and the gain."""
    lines = [
        "| corruption | in the stream | served norm params | fitted to the labels | headroom (pts) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corruption']}-{r['severity']} | {'yes' if r['in_stream'] else 'no'} | {r['served']:.3f} "
            f"| {r['fitted']:.3f} | {100 * (r['fitted'] - r['served']):+.1f} |"
        )
    return "\n".join(lines) + "\n"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per teacher: chosen setting, mean accuracies, gains, ratio, uploads, target."""
    lines = [
        "| teacher | teacher acc on stream | setting | none | CEMA | all | gain CEMA (pts) | gain all (pts) "
        "| gain ratio | CEMA uploaded | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for teacher, data in results.items():
        g = gains(data.get("rows", []))
        if not g:
            continue
        col = lambda k: [v[k] for v in g.values()]  # noqa: E731, B023
        t_acc = data.get("teacher_stream_accuracy", {})
        upload = statistics.mean(col("uploaded_cema"))
        met = not any(target_misses(g).values())
        lines.append(
            f"| {teacher} | {statistics.mean(t_acc.values()):.4f} | {data.get('chosen')} "
            f"| {mean_std(col('acc_none'))} | {mean_std(col('acc_cema'))} | {mean_std(col('acc_all'))} "
            f"| {mean_std([100 * x for x in col('gain_cema')], '{:+.2f}')} "
            f"| {mean_std([100 * x for x in col('gain_all')], '{:+.2f}')} | {_ratio_cell(col('gain_ratio'))} "
            f"| {100 * upload:.1f} % | {'met' if met else 'not met'} |"
        )
    return "\n".join(lines)


def latency_summary(text: str, keep: Sequence[str] = ("Latency", "Swapping")) -> str:
    """The intro and the `## ` sections of the latency report whose titles start with `keep`, one level down."""
    sections: list[list[str]] = [[]]
    for line in text.strip().splitlines()[1:]:  # the first line is the report's own title
        if line.startswith("## "):
            sections.append([])
        sections[-1].append(line)
    chosen = [sections[0]] + [s for s in sections[1:] if s[0][3:].startswith(tuple(keep))]
    return "\n".join(("#" + line) if line.startswith("#") else line for sec in chosen for line in sec).strip()
