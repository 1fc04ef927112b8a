"""Run one config under several variants and seeds; collect each run's summary.

A study (compression, aggregation, ...) is a base config, a list of named
variants (lists of `--set` overrides) and seeds. Every finished run is appended
to a JSON file at once, so an interrupted sweep keeps what it finished and a
re-run skips it.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fairedge.common.config import config_hash, load_config
from fairedge.server.run_outputs import new_run_dir
from fairedge.simulations.simulate import simulate


def run_sweep(
    config: str | Path,
    variants: dict[str, list[str]],
    seeds: Sequence[int],
    results: Path,
    common_overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Simulate every (variant, seed); return all rows (finished earlier ones included)."""
    rows: list[dict[str, Any]] = json.loads(results.read_text()) if results.exists() else []
    done = {(r["variant"], r["seed"], r["config_hash"]) for r in rows}
    # seed-major: a sweep stopped early still has every variant for the seeds it finished
    jobs = [(label, overrides, seed) for seed in seeds for label, overrides in variants.items()]
    for i, (label, overrides, seed) in enumerate(jobs, 1):
        cfg = load_config(
            config,
            [*common_overrides, *overrides, f"seed={seed}", f"name=sweep-{re.sub(r'[^A-Za-z0-9._-]+', '-', label)}"],
        )
        key = (label, seed, config_hash(cfg))
        if key in done:
            continue
        started = time.time()
        record = simulate(cfg, new_run_dir(cfg))
        rows.append(
            {
                "variant": label,
                "seed": seed,
                "config_hash": key[2],
                "overrides": list(overrides),
                "summary": record.summary(),
                "rounds": record.rounds,
                "run_dir": str(record.run_dir),
            }
        )
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(rows, indent=1))
        print(
            f"[{i}/{len(jobs)}] {label} seed {seed}: final mean acc "
            f"{record.summary()['final_mean_accuracy']:.4f} ({time.time() - started:.0f} s)",
            flush=True,
        )
    return rows


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """`mean ± std` (sample std; 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
