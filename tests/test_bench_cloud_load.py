"""The load test's memory table: a noisy plateau reads flat, a leak reads as rising medians and slope."""

from __future__ import annotations

import json

import numpy as np

from fairedge.simulations.bench_cloud_load import markdown, rss_table
from fairedge.simulations.paths import RESULTS


def _run(mb: np.ndarray) -> dict:
    return {"devices": 50, "rss_mb": {"samples": [[float(t), float(m)] for t, m in enumerate(mb)]}}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def _medians(row: list[str]) -> list[float]:
    return [float(c.split()[0]) for c in row[1:6]]


def test_a_noisy_plateau_has_equal_medians_and_no_slope_and_a_leak_has_both():
    rng = np.random.default_rng(0)
    t = np.arange(600.0)
    fill = np.minimum(t, 30.0) * 8.0  # start-up: +240 MB in 30 s, then a plateau
    plateau = 560.0 + fill + rng.normal(0.0, 25.0, t.size)
    leak = plateau + t * (10.0 / 60.0)  # +10 MB/min
    (flat,) = (_cells(line) for line in rss_table([_run(plateau)])[4:])
    (rising,) = (_cells(line) for line in rss_table([_run(leak)])[4:])
    assert max(_medians(flat)[1:]) - min(_medians(flat)[1:]) < 10
    assert abs(float(flat[6])) < 1.0
    assert _medians(rising) == sorted(_medians(rising)) and _medians(rising)[4] - _medians(rising)[1] > 50
    assert 9.0 < float(rising[6]) < 11.0


def test_the_page_renders_a_run_where_some_latencies_could_not_be_measured():
    """No flooder acknowledged and nothing learned yet: those cells read '–' instead of failing the report."""
    result = json.loads((RESULTS / "cloud_load.json").read_text())
    run = result["runs"][0]
    run["ack_latency_ms"].update(flooder_p50=None, flooder_p99=None)
    run["fair_share"].update(ordinary_ack_to_learned_s_p50=None, ordinary_ack_to_learned_s_p99=None)
    page = markdown(result)
    rows = [_cells(line) for line in page.splitlines() if line.startswith(f"| {run['devices']} |")]
    assert rows[0][8] == "– / –"  # ack p50 / p99 ms (flooder)
    assert rows[1][6] == "– / –"  # ordinary: ack to learned p50 / p99 s
