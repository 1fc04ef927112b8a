"""Run one config under several variants and seeds; collect each run's summary.

A study (compression, aggregation, ...) is a base config, a list of named
variants (lists of `--set` overrides) and seeds. Every finished run is added
to a JSON file at once (atomically: the file holds the old rows or the new ones,
never half of them), so an interrupted sweep keeps what it finished and a
re-run skips it. A run is a federated simulation by default, or any function
from a config to a `RunRecord` (the centralised references).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fairedge.common.atomic_files import atomic_write_json
from fairedge.common.config import RunConfig, config_hash, load_config
from fairedge.server.run_outputs import RunRecord, new_run_dir

QUICK_VIT = [
    "model.pretrain_epochs=1",
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=16",
    "data.samples_per_domain=40",
]
"""The tiny ViT of the digits studies' `--quick` smokes: a one-block, width-16 model on 40 digits per domain."""


def sweep_config(
    config: str | Path, label: str, overrides: Sequence[str], seed: int, common: Sequence[str] = ()
) -> RunConfig:
    """The config of one (variant, seed): `common`, the variant's overrides, the seed and a name from the label.

    Its hash is the row's key: a study selects its rows by rebuilding this config.
    """
    return load_config(
        config, [*common, *overrides, f"seed={seed}", f"name=sweep-{re.sub(r'[^A-Za-z0-9._-]+', '-', label)}"]
    )


def load_rows(results: Path) -> list[dict[str, Any]]:
    """The rows a sweep has written to `results` (none when the file does not exist yet)."""
    return json.loads(results.read_text()) if results.exists() else []


def save_rows(results: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace `results` with `rows`, atomically."""
    atomic_write_json(results, list(rows), indent=1, sort_keys=False)


def simulate_run(cfg: RunConfig) -> RunRecord:
    """A federated simulation of `cfg` in a fresh run folder."""
    from fairedge.simulations.simulate import simulate

    return simulate(cfg, new_run_dir(cfg))


def run_sweep(
    config: str | Path,
    variants: dict[str, list[str]],
    seeds: Sequence[int],
    results: Path,
    common_overrides: Sequence[str] = (),
    run: Callable[[RunConfig], RunRecord] = simulate_run,
) -> list[dict[str, Any]]:
    """Run every (variant, seed) with `run`; return all rows (finished earlier ones included)."""
    rows = load_rows(results)
    done = {(r["variant"], r["seed"], r["config_hash"]) for r in rows}
    # seed-major: a sweep stopped early still has every variant for the seeds it finished
    jobs = [(label, overrides, seed) for seed in seeds for label, overrides in variants.items()]
    for i, (label, overrides, seed) in enumerate(jobs, 1):
        cfg = sweep_config(config, label, overrides, seed, common_overrides)
        key = (label, seed, config_hash(cfg))
        if key in done:
            continue
        started = time.time()
        record = run(cfg)
        rows.append(
            {
                "variant": label,
                "seed": seed,
                "config_hash": key[2],
                "overrides": list(overrides),
                "summary": record.summary(),
                "rounds": record.rounds,
                # runs without Flower (the centralised references) leave no run folder
                "run_dir": str(record.run_dir) if record.run_dir != Path() else None,
            }
        )
        save_rows(results, rows)
        print(
            f"[{i}/{len(jobs)}] {label} seed {seed}: final mean acc "
            f"{record.summary()['final_mean_accuracy']:.4f} ({time.time() - started:.0f} s)",
            flush=True,
        )
    return rows
