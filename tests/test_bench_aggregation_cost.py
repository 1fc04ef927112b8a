"""The aggregation cost benchmark's new parts on tiny inputs: SmolLM2's layer shapes, the switch rows."""

from __future__ import annotations

import pytest

from fairedge.simulations import bench_aggregation_cost as bench
from fairedge.simulations.smollm2_adapter_cost import SMOLLM2_LAYERS, make_adapter_updates


@pytest.mark.parametrize(("targets", "modules"), [("attention", 4), ("all-linear", 7)])
def test_smollm2_adapter_has_the_real_layer_shapes(targets: str, modules: int) -> None:
    updates, current = make_adapter_updates(targets, K=2)
    assert len(updates) == 2 and len(current.factors) == SMOLLM2_LAYERS * modules == 30 * modules
    factors = updates[1].adapter.factors
    A, B = factors["model.layers.29.k_proj"]
    assert (tuple(B.shape), tuple(A.shape)) == ((192, 16), (16, 576))  # 576 → 192: B is 192×r, A is r×576
    assert tuple(factors["model.layers.0.q_proj"][1].shape) == (576, 16)
    if targets == "all-linear":
        assert tuple(factors["model.layers.3.up_proj"][1].shape) == (1536, 16)
        A, B = factors["model.layers.3.down_proj"]
        assert (tuple(B.shape), tuple(A.shape)) == ((576, 16), (16, 1536))
    else:
        assert "model.layers.0.gate_proj" not in factors


def test_switch_worker_times_the_three_forms_side_by_side() -> None:
    row = bench.switch_worker(48, 4, 40, quick=True)  # K·r = 160 > mn/(m+n) = 24: dense has fewer flops
    assert row["auto_form"] == "dense" and row["flops"]["dense"] < row["flops"]["factored"]
    assert set(row["seconds_median"]) == {"fedit", "factored", "dense", "auto"} and row["runs"] >= 3
    assert row["auto_over_best"] == pytest.approx(
        row["seconds_median"]["auto"] / min(row["seconds_median"]["factored"], row["seconds_median"]["dense"])
    )
    table = bench._switch_table([row])
    assert "| 48 | 4 | 40 |" in table and "dense" in table


def test_headline_ratio_is_the_median_over_fresh_processes() -> None:
    def row(method: str, ratio: float, minima: float = 4.0) -> dict:
        return {
            **{"m": 4096, "n": 4096, "r": 16, "K": 10, "method": method, "delta_form": "factored"},
            **{"seconds_median": 5e-3, "fedit_seconds_median": 1e-3, "norm_seconds": 3e-3},
            **{"ratio_to_fedit": ratio, "ratio_to_fedit_of_minima": minima, "peak_extra_bytes": 1 << 20},
        }

    rows = [row("lora_fair_cosine", 5.3), {**row("lora_fair_dense_adam", 1e5), "seconds_median": 100.0}]
    more = [row("lora_fair_cosine", 4.8, 4.6), row("lora_fair_cosine", 4.9, 4.7)]
    h = bench._headline(rows, [], more)
    assert h["lora_fair_over_fedit_per_process"] == [5.3, 4.8, 4.9]
    assert h["lora_fair_over_fedit"] == 4.9 and h["lora_fair_over_fedit_of_minima"] == 4.6
    assert h["targets_met"]["lora_fair_over_fedit <= 5"]
    assert not bench._headline(rows, [])["targets_met"]["lora_fair_over_fedit <= 5"]  # the table row alone


def test_switch_misses_name_the_row_and_the_gap() -> None:
    def row(K: int, auto: str, factored: float, dense: float) -> dict:
        t = {"factored": factored, "dense": dense}
        return {
            "m": 768,
            "r": 64,
            "K": K,
            "auto_form": auto,
            "faster_forced_form": min(t, key=t.__getitem__),
            "seconds_median": t,
        }

    assert bench._switch_misses([row(8, "factored", 0.0116, 0.013)]) == ""
    text = bench._switch_misses([row(8, "factored", 0.0116, 0.013), row(10, "dense", 0.0144, 0.0146)])
    assert text.startswith("; where it did not: 768², r 64, K 10: dense") and "1.4 % apart" in text
