"""The edge and cloud settings of the edge study, and the seed-0 search that picks one per teacher.

`FIXED` is plumbing applied to every run; `TUNING` the settings tried on seed 0; `chosen_setting`
the rule that picks the one every seed then runs with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairedge.common.config import RunConfig, load_config

FIXED = [
    "edge.batch_size=32",
    "edge.upload_batch_size=32",
    "edge.threads=1",
    "edge.backoff_initial_s=0.05",
    "edge.backoff_max_s=1.0",
    "cloud.threads=1",
]
"""Study plumbing, not tuned: one thread each side (2 shared cores), quick retries on loopback."""

KL_FROZEN = [
    "cloud.entropy_weight=0",
    "cloud.ce_weight=0",
    "cloud.teacher_lr=0",
    "cloud.lr=0.05",
    "cloud.steps_per_update=4",
    "cloud.min_new_per_update=8",
]
TUNING: dict[str, list[str]] = {
    "defaults": [],  # the public CEMA code's values (common.config)
    "KL only": ["cloud.entropy_weight=0", "cloud.ce_weight=0", "cloud.lr=0.01", "cloud.teacher_lr=0.0025"],
    "cautious": ["cloud.e_max=0.2", "cloud.lr=0.001"],
    # the student follows a frozen teacher by KL alone, 4 steps per update, an update once 8 new samples wait
    # (so CEMA's uploads get as many updates as uploading everything does)
    "KL, frozen teacher": KL_FROZEN,
    "KL, frozen teacher, E_max 0.7": [*KL_FROZEN, "edge.e_max=0.7"],
}
"""Settings tried on the tuning seed (0) with every teacher; `chosen_setting` picks the one each study runs."""


def chosen_setting(tuning: Sequence[dict[str, Any]]) -> str | None:
    """The TUNING label to run every seed with, from the seed-0 tuning rows (None before any complete setting).

    The largest CEMA gain over no adaptation among the settings where CEMA uploads at most 50 % and
    uploading everything gains too; failing that, the largest gain of uploading everything.
    """
    none = next((r["accuracy"] for r in tuning if r["mode"] == "none"), None)
    if none is None:
        return None
    scores = {}
    for label in TUNING:
        by = {r["mode"]: r for r in tuning if r["setting"] == label}
        if "cema" in by and "all" in by:
            scores[label] = (
                by["cema"]["accuracy"] - none,
                by["all"]["accuracy"] - none,
                by["cema"]["uploaded_fraction"],
            )
    within = {k: v for k, v in scores.items() if v[2] <= 0.5 and v[1] > 0}
    if within:
        return max(within, key=lambda k: within[k][0])
    return max(scores, key=lambda k: scores[k][1]) if scores else None


def study_settings(run_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The run's own config with FIXED and `overrides` applied (edge and cloud sections)."""
    return load_config(run_dir / "config.toml", [*FIXED, *overrides])
