"""The rank study's tables (synthetic rows) and its quick smoke run into a temporary folder."""

import json

import pytest

from fairedge.simulations import rank_study


def _row(variant, seed, final, accuracy):
    return {
        "variant": variant,
        "seed": seed,
        "config_hash": "x",
        "rounds": [{"round": 0, "accuracy": {"a": 0.1, "b": 0.1}}, {"round": 1, "accuracy": accuracy}],
        "summary": {"final_mean_accuracy": final, "final_worst_accuracy": final - 0.1, "bytes_up": 2e6,
                    "bytes_down": 4e6},
    }  # fmt: skip


def test_tables_pair_mixed_with_uniform_by_seed():
    by_variant = {
        "uniform-r8/fedit": [_row("uniform-r8/fedit", s, 0.80 + s / 100, {"a": 0.8, "b": 0.6}) for s in (0, 1)],
        "mixed-4-8-16/fedit": [_row("mixed-4-8-16/fedit", s, 0.83 + s / 50, {"a": 0.9, "b": 0.7}) for s in (0, 1)],
    }
    table = rank_study.main_table(by_variant)
    assert "| FedIT (HetLoRA padding) | mixed-4-8-16 | 84.00 ± 1.41 | 74.00 ± 1.41 | 2.00 | 4.00 | 0, 1 |" in table
    (line,) = rank_study.differences(by_variant, ["fedit"])
    assert "mixed − uniform = +3.50 ± 0.71 points (paired over 2 seeds: +3.00, +4.00)" in line
    domains = rank_study.domain_table(by_variant, {"a": 4, "b": 16})
    assert "| method | ranks | a (r4) | b (r16) |" in domains and "| mixed-4-8-16 | 90.0 | 70.0 |" in domains


@pytest.mark.slow
def test_quick_smoke_writes_rows_and_report(tmp_path):
    rank_study.main(["--quick", "--methods", "lora_fair", "--results", str(tmp_path),
                     "--set", f"model.cache_dir='{tmp_path / 'cache'}'"])  # fmt: skip
    rows = json.loads((tmp_path / "rank_study.json").read_text())
    assert sorted(r["variant"] for r in rows) == ["mixed-4-8-16/lora_fair", "uniform-r8/lora_fair"]
    mixed = next(r for r in rows if r["variant"].startswith("mixed"))
    assert set(mixed["rounds"][1]["ranks"].values()) == {4, 8, 16} and mixed["cpu_seconds"] > 0
    report = (tmp_path / "rank_study.md").read_text()
    assert "Quick smoke" in report and "LoRA-FAIR: mixed − uniform" in report


def test_correction_table_averages_lora_fairs_round_metrics_and_marks_rows_without_them():
    def fair_row(seed, ratio):
        row = _row("mixed-4-8-16/lora_fair", seed, 0.5, {"a": 0.5})
        metrics = {f"lora_fair/{k}": 0.5 for k in rank_study.CORRECTION}
        row["rounds"][1]["aggregator_metrics"] = {**metrics, "lora_fair/norm_ratio": ratio}
        row["rounds"].append(
            {**row["rounds"][1], "round": 2, "aggregator_metrics": {**metrics, "lora_fair/norm_ratio": 0.0}}
        )
        return row

    old = _row("uniform-r8/lora_fair_frobenius", 0, 0.5, {"a": 0.5})
    old["rounds"][1]["aggregator_metrics"] = {"lora_fair/cos_fair": 0.9}
    table = rank_study.correction_table(
        {
            "mixed-4-8-16/lora_fair": [fair_row(0, 0.2), fair_row(1, 0.4)],
            "uniform-r8/lora_fair_frobenius": [old],
            "mixed-4-8-16/fedit": [_row("mixed-4-8-16/fedit", 0, 0.5, {"a": 0.5})],
        }
    )
    assert (
        "| LoRA-FAIR | mixed-4-8-16 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.150 ± 0.071 |"
        in table
    )
    assert "| LoRA-FAIR (frobenius) | uniform-r8 | - | 0.900 ± 0.000 | - | - | - |" in table
    assert "FedIT" not in table
