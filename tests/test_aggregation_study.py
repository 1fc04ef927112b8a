"""The aggregation study's tables, its 95 %-round rule and its centralised reference (no Ray)."""

import json
from pathlib import Path

import pytest

from fairedge.common.task import client_partition
from fairedge.simulations import aggregation_study as study
from fairedge.simulations.sweep import sweep_config

DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"


def _rounds(means, worst=None):
    return [
        {"round": i, "mean_accuracy": m, "worst_accuracy": (worst or means)[i], "accuracy": {"a": m}}
        for i, m in enumerate(means)
    ]


def _row(variant, seed, means, *, up=0, down=0, personal=None):
    rounds = _rounds(means)
    return {
        "variant": variant,
        "seed": seed,
        "config_hash": "x",
        "rounds": rounds,
        "summary": {
            "final_mean_accuracy": means[-1],
            "final_worst_accuracy": means[-1] - 0.1,
            "bytes_up": up,
            "bytes_down": down,
            "final_personal_mean_accuracy": personal,
        },
    }


def test_round_reaching_95_percent_of_final():
    assert study.round_reaching(_rounds([0.2, 0.5, 0.76, 0.74, 0.8])) == 2  # 0.76 = 95 % of 0.8 exactly
    assert study.round_reaching(_rounds([0.2, 0.5, 0.75, 0.9, 0.8])) == 3  # first round, not a later one
    assert study.round_reaching(_rounds([0.2, 0.9, 0.5, 0.8])) == 1  # overshoot, then a dip, counts
    assert study.round_reaching(_rounds([0.79, 0.3, 0.8])) == 0  # the base model may already be there
    assert study.round_reaching(_rounds([0.1, 0.2, 0.3, 0.4])) == 3  # steadily rising: the last round
    assert study.round_reaching(_rounds([0.1, 0.9, 0.4]), fraction=0.5, key="worst_accuracy") == 1


def test_table_bolds_best_federated_method_and_reports_differences():
    by_method = {
        "fedit": [_row("p/fedit", 0, [0.5, 0.70], up=2e6, down=4e6), _row("p/fedit", 1, [0.5, 0.72], up=2e6, down=4e6)],
        "lora_fair": [
            _row("p/lora_fair", 0, [0.5, 0.78, 0.80], up=2e6, down=6e6),
            _row("p/lora_fair", 1, [0.5, 0.70, 0.82], up=2e6, down=6e6),
        ],
        "fedsa_lora": [
            _row("p/fedsa_lora", 0, [0.5, 0.4], up=1e6, personal=0.9),
            _row("p/fedsa_lora", 1, [0.5, 0.4], up=1e6, personal=0.8),
        ],
        "centralised": [_row("p/centralised", 0, [0.5, 0.9]), _row("p/centralised", 1, [0.5, 0.9])],
    }
    lines = study.table(by_method).splitlines()
    assert len(lines) == 2 + 4 and "personal acc" in lines[0]
    fair = next(line for line in lines if "LoRA-FAIR" in line)
    assert fair.startswith("| **LoRA-FAIR** | **81.00 ± 1.41** |")  # bold although centralised is higher
    assert "| 1.5 |" in fair  # rounds 2 and 1 -> mean 1.5
    assert "| 2.00 | 6.00 |" in fair and "| — | 0, 1 |" in fair
    central = next(line for line in lines if "centralised" in line)
    assert "**" not in central and "| — | — |" in central
    assert "| 85.00 ± 7.07 |" in next(line for line in lines if "FedSA" in line)
    text = "\n".join(study.comparisons(by_method))
    assert "LoRA-FAIR − FedIT: +10.00 ± 0.00 points" in text
    assert "centralised − LoRA-FAIR: +9.00 ± 1.41 points" in text
    assert "Here: holds" in text and "= +9.00 points (does not hold)" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("agg")
    return [
        f"output_dir='{root / 'runs'}'",
        f"model.cache_dir='{root / 'cache'}'",
        "model.pretrain_epochs=1",
        "data.samples_per_domain=40",
        "federation.num_clients=2",
        "federation.min_train_nodes=2",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.device=cpu",
    ]


@pytest.mark.slow
def test_centralised_rows_have_run_sweep_shape_and_are_not_rerun(tiny, tmp_path, monkeypatch):
    results = tmp_path / "aggregation_accuracy.json"
    rows = study.run_centralised(DEFAULT, ["feature"], [0], results, tiny)
    assert len(rows) == 1 and json.loads(results.read_text()) == json.loads(json.dumps(rows))
    row = rows[0]
    assert row["variant"] == "feature/centralised" and row["seed"] == 0 and len(row["config_hash"]) == 16
    assert [r["round"] for r in row["rounds"]] == [0, 1]
    for r in row["rounds"]:
        assert set(r["accuracy"]) == {"clean", "rotated", "inverted", "noisy", "blurred", "thick"}
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["mean_accuracy"] == pytest.approx(sum(r["accuracy"].values()) / 6)
        assert r["worst_accuracy"] == min(r["accuracy"].values())
    s = row["summary"]
    assert s["final_mean_accuracy"] == row["rounds"][-1]["mean_accuracy"] and 0 <= s["final_worst_accuracy"] <= 1
    assert s["bytes_up"] == 0 and row["rounds"][1]["train_loss"] > 0
    # the hash is the one the table selects by, and a finished run is skipped
    assert study.select(rows, DEFAULT, "feature", "centralised", [0], tiny) == rows
    assert study.select(rows, DEFAULT, "feature", "centralised", [0], [*tiny, "lora.rank=4"]) == []
    monkeypatch.setattr(study, "centralised", lambda cfg: pytest.fail("finished run was re-run"))
    assert study.run_centralised(DEFAULT, ["feature"], [0], results, tiny) == rows


def test_pooled_data_is_the_union_of_the_client_partitions(tiny):
    cfg = sweep_config(DEFAULT, "feature/centralised", ["data.partition=feature"], 0, tiny)
    parts = [client_partition(cfg, k) for k in range(2)]
    pooled = study._pool(parts)
    assert len(pooled) == sum(len(p) for p in parts)
    assert set(pooled.domain.tolist()) == {0, 1}  # 2 clients: domains 0 and 1 only, like the federation
