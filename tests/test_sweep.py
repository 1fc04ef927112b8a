"""The sweep runner: rows saved atomically after every run, and a re-run resumes from them (no Flower)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fairedge.common import atomic_files
from fairedge.common.config import config_hash
from fairedge.server.run_outputs import RunRecord
from fairedge.simulations.report import mean_std
from fairedge.simulations.sweep import load_rows, run_sweep, sweep_config

DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"
VARIANTS = {"a": ["lora.rank=4"], "b": ["lora.rank=8"]}


class FakeRuns:
    """A run function that records what ran and can fail on a chosen call."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.ran: list[tuple[str, int]] = []
        self.fail_at = fail_at

    def __call__(self, cfg):
        if self.fail_at is not None and len(self.ran) == self.fail_at:
            raise KeyboardInterrupt  # the sweep stopped mid-run
        self.ran.append((cfg.name, cfg.seed))
        record = RunRecord(cfg=cfg, run_dir=Path(), domains=["d"], shifted_domains=["d"])
        record.add_round(0, {"d": 0.5}, None, 0.0)
        record.add_round(1, {"d": 0.5 + 0.01 * cfg.lora.rank + 0.001 * cfg.seed}, None, 0.0)
        return record


def test_rows_are_seed_major_keyed_by_config_hash_and_resumed(tmp_path):
    out = tmp_path / "results" / "sweep.json"
    first = FakeRuns(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(DEFAULT, VARIANTS, [0, 1], out, run=first)
    assert first.ran == [("sweep-a", 0), ("sweep-b", 0), ("sweep-a", 1)]  # seed-major
    kept = load_rows(out)
    assert [(r["variant"], r["seed"]) for r in kept] == [("a", 0), ("b", 0), ("a", 1)]
    assert kept[0]["config_hash"] == config_hash(sweep_config(DEFAULT, "a", VARIANTS["a"], 0))
    assert kept[0]["run_dir"] is None and kept[0]["summary"]["final_mean_accuracy"] == pytest.approx(0.54)

    again = FakeRuns()
    rows = run_sweep(DEFAULT, VARIANTS, [0, 1], out, run=again)
    assert again.ran == [("sweep-b", 1)]  # only the run that was missing
    assert rows == load_rows(out) and len(rows) == 4
    # another common override is another config: every run again
    other = FakeRuns()
    run_sweep(DEFAULT, VARIANTS, [0], out, common_overrides=["lora.alpha=4"], run=other)
    assert len(other.ran) == 2 and len(load_rows(out)) == 6


def test_a_failed_write_leaves_the_rows_written_before(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    run_sweep(DEFAULT, {"a": VARIANTS["a"]}, [0], out, run=FakeRuns())
    before = out.read_bytes()
    real_replace = os.replace

    def crash(src, dst):
        raise OSError("power cut before the rename")

    monkeypatch.setattr(atomic_files.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        run_sweep(DEFAULT, VARIANTS, [0], out, run=FakeRuns())
    assert out.read_bytes() == before and len(json.loads(before)) == 1  # whole, and the old rows
    assert os.listdir(tmp_path) == ["sweep.json"]  # the half-written temporary is gone
    monkeypatch.setattr(atomic_files.os, "replace", real_replace)
    resumed = FakeRuns()
    assert len(run_sweep(DEFAULT, VARIANTS, [0], out, run=resumed)) == 2 and resumed.ran == [("sweep-b", 0)]


def test_mean_std_formats():
    assert mean_std([0.5, 0.7]) == "0.6000 ± 0.1414"
    assert mean_std([1.0, float("nan")], "{:+.2f}") == "+1.00 ± 0.00"  # NaN left out, sign on the mean only
    assert mean_std([], empty="–") == "–"
