"""The edge study's figure: windowed accuracy along the stream per mode, its gain, and CEMA's uploads."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.common.atomic_files import atomic_save_figure
from fairedge.simulations.edge_lockstep import MODES


def windowed_accuracy(batches: Sequence[Sequence[int]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(samples seen, accuracy over the last `window` samples) after each batch of `[start, n, correct, ...]`."""
    n = np.array([b[1] for b in batches], dtype=float)
    ok = np.array([b[2] for b in batches], dtype=float)
    seen, hits = np.cumsum(n), np.cumsum(ok)
    acc = np.empty(len(n))
    for i, s in enumerate(seen):
        j = int(np.searchsorted(seen, s - window, side="right")) - 1  # last batch fully before the window
        base_n, base_ok = (seen[j], hits[j]) if j >= 0 else (0.0, 0.0)
        acc[i] = (hits[i] - base_ok) / (s - base_n)
    return seen, acc


def plot(
    rows: Sequence[dict[str, Any]],
    boundaries: Sequence[int],
    segments: Sequence[str],
    path: Path,
    *,
    window: int = 256,
    title: str = "",
) -> Path:
    """Windowed accuracy along the stream (mean over seeds) per mode, corruption boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gain, ax2) = plt.subplots(
        3, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1.5, 1]}
    )
    colors = {"none": "tab:gray", "cema": "tab:blue", "all": "tab:orange"}
    labels = {"none": "no adaptation", "cema": "CEMA", "all": "upload every sample"}
    mean_curve: dict[str, np.ndarray] = {}
    x = np.zeros(0)
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        curves = [windowed_accuracy(r["batches"], window) for r in sel]
        x = curves[0][0]
        mean_curve[mode] = np.mean([c[1] for c in curves], axis=0)
        ax.plot(
            x,
            mean_curve[mode],
            color=colors[mode],
            label=f"{labels[mode]} ({statistics.mean(r['accuracy'] for r in sel):.3f})",
        )
        if mode == "cema":
            picked = np.cumsum(np.mean([[b[3] for b in r["batches"]] for r in sel], axis=0))
            j = np.searchsorted(x, x - window, side="right") - 1  # last batch before each window
            before_n, before_k = np.where(j >= 0, x[j], 0.0), np.where(j >= 0, picked[j], 0.0)
            ax2.plot(
                x,
                (picked - before_k) / (x - before_n),
                color=colors[mode],
                label=f"CEMA: fraction uploaded (last {window} samples)",
            )
    for mode in ("cema", "all"):
        if mode in mean_curve and "none" in mean_curve:
            ax_gain.plot(x, 100 * (mean_curve[mode] - mean_curve["none"]), color=colors[mode], label=labels[mode])
    ax_gain.axhline(0, color=colors["none"], lw=0.8)
    ax_gain.set_ylabel("vs no adaptation\n(points)")
    ax_gain.legend(loc="lower left", fontsize=8)
    ax_gain.grid(alpha=0.3)
    for a in (ax, ax_gain, ax2):
        for b in boundaries[1:-1]:
            a.axvline(b, color="black", lw=0.6, ls=":")
    for name, lo, hi in zip(segments, boundaries[:-1], boundaries[1:]):
        ax.text((lo + hi) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"accuracy (last {window} samples)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    ax2.set_ylabel("uploaded")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("samples seen")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)
    return path
