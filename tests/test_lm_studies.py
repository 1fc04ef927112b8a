"""The causal-LM studies: their fixed roles, the centralised LM reference (tiny llama) and their tables."""

from __future__ import annotations

import json
import math

import pytest

from fairedge.common.config import RunConfig
from fairedge.common.data.shakespeare import load_shakespeare
from fairedge.common.task import load_task
from fairedge.simulations import lm_aggregation_study as agg
from fairedge.simulations import lm_compression_study as comp
from fairedge.simulations import lm_study_setup as setup

ROLES = ["hamlet/Ham", "othello/IAGO"]


def test_study_roles_are_a_fixed_draw_of_eligible_roles_and_pinned_in_every_run():
    roles = setup.pick_roles(8)
    assert roles == setup.pick_roles(8) and len(set(roles)) == 8
    eligible = load_shakespeare(min_lines=setup.MIN_LINES)
    assert all(len(eligible[r].train) + len(eligible[r].test) >= setup.MIN_LINES for r in roles)
    assert roles != setup.pick_roles(8, seed=setup.ROLE_SEED + 1)  # the draw, not the first 8 in id order
    overrides = setup.FULL.overrides(roles)
    assert f"data.clients={json.dumps(roles)}" in overrides
    assert "federation.min_train_nodes=8" in overrides and "lora.top_layers=8" in overrides


def _tiny_config(model_dir, tmp_path) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": "central-test",
            "output_dir": str(tmp_path / "runs"),
            "data": {"task": "shakespeare", "clients": ROLES, "seq_len": 32, "max_eval_tokens": 64},
            "model": {"kind": "hf-causal-lm", "path": str(model_dir)},
            "lora": {"rank": 4, "alpha": 8, "top_layers": 1},
            "federation": {"num_clients": 2, "rounds": 2, "local_steps": 3, "batch_size": 4, "lr": 0.02},
        }
    )


def test_centralised_lm_trains_on_all_clients_text_with_the_federations_steps(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = _tiny_config(tiny_llama_dir, tmp_path)
    calls = []
    train_local = agg.train_local

    def spy(model, data, **kwargs):
        calls.append((len(data), kwargs["steps"], kwargs["batch_size"]))
        return train_local(model, data, **kwargs)

    monkeypatch.setattr(agg, "train_local", spy)
    record = agg.centralised_lm(cfg)
    pooled = len(load_task(cfg).train)
    # every round: the union of both roles' rows, local_steps x num_clients steps of the clients' batch
    assert calls == [(pooled, 6, 4), (pooled, 6, 4)]
    assert [r["round"] for r in record.rounds] == [0, 1, 2]
    for row in record.rounds:
        assert set(row["perplexity"]) == set(ROLES) and all(math.isfinite(v) for v in row["perplexity"].values())
    s = record.summary()
    assert s["final_mean_perplexity"] < s["base_mean_perplexity"]  # a random tiny model learns fast
    assert s["final_worst_perplexity"] == max(record.rounds[-1]["perplexity"].values())


def _row(variant, seed, mean, worst, *, up=1e6, ratio=1.0):
    return {
        "variant": variant,
        "seed": seed,
        "rounds": [
            {"round": 0, "perplexity": {"a": 60.0, "b": 80.0}, "mean_perplexity": 70.0, "worst_perplexity": 80.0},
            {"round": 1, "perplexity": {"a": mean, "b": worst}, "mean_perplexity": mean, "worst_perplexity": worst},
        ],
        "summary": {
            "base_mean_perplexity": 70.0,
            "final_mean_perplexity": mean,
            "final_worst_perplexity": worst,
            "perplexity_change": mean / 70.0 - 1,
            "final_mean_accuracy": 0.3,
            "bytes_up": up,
            "uplink_ratio_vs_fp32": ratio,
            "wall_seconds": 10.0,
        },
    }


def test_lora_fair_minus_fedit_is_paired_by_seed_and_judged_against_seed_noise():
    fedit = [_row("fedit", s, m, m + 5) for s, m in ((0, 50.0), (1, 52.0), (2, 54.0))]
    fair = [_row("lora_fair", s, m, m + 4) for s, m in ((0, 49.0), (1, 51.1), (2, 52.9))]
    d = agg.difference(fair, fedit, "LoRA-FAIR − FedIT")
    assert [x["seed"] for x in d["per_seed"]] == [0, 1, 2]
    assert [round(x["mean"], 3) for x in d["per_seed"]] == [-1.0, -0.9, -1.1]
    assert d["mean"] == "-1.000 ± 0.100" and d["verdict"].startswith("LoRA-FAIR lower")
    noisy = [_row("lora_fair", s, m, m) for s, m in ((0, 48.0), (1, 53.0), (2, 54.5))]  # -2, +1, +0.5
    assert agg.difference(noisy, fedit, "LoRA-FAIR − FedIT")["verdict"].startswith("within seed noise")
    assert agg.difference(fair, [], "LoRA-FAIR − FedIT") is None
    table = agg.main_table({"fedit": fedit, "lora_fair": fair, agg.CENTRAL: [_row("c", 0, 40.0, 45.0)]})
    assert "| **LoRA-FAIR** | **51.000 ± 1.952**" in table  # the best federated method, centralised excluded
    assert "| centralised LoRA (pooled data) | 40.000 ± 0.000 | 45.000 ± 0.000 |" in table
    clients = agg.client_table({"fedit": fedit, "lora_fair": fair}, ["a", "b"])
    assert "| a | 60.00 | 52.00 | 51.00 |" in clients


@pytest.mark.parametrize(("delta", "ratio", "met"), [(0.004, 40.0, "yes"), (0.02, 40.0, "no"), (0.004, 20.0, "no")])
def test_compression_goal_needs_both_the_byte_ratio_and_the_perplexity(delta, ratio, met):
    by_variant = {
        comp.REFERENCE: [_row(comp.REFERENCE, s, 50.0 + s, 60.0) for s in (0, 1)],
        "k=5% +EF": [_row("k=5% +EF", s, (50.0 + s) * (1 + delta), 61.0, ratio=ratio) for s in (0, 1)],
    }
    text, meeting = comp.table(by_variant)
    assert (meeting == ["k=5% +EF"]) == (met == "yes")
    assert f"| {met} | 0, 1 |" in text and "| reference | 0, 1 |" in text
    assert f"| {100 * delta:+.2f} ± 0.00 |" in text


def test_centralised_overfitting_is_explained_only_when_its_best_round_is_not_the_last():
    from fairedge.simulations.lm_aggregation_study import central_curve

    def row(ppl, loss):
        return {"rounds": [{"mean_perplexity": p, "train_loss": lo} for p, lo in zip(ppl, [None, *loss])]}

    rising = central_curve([row([100, 80, 75, 79], [4.4, 4.2, 4.0]), row([100, 82, 77, 81], [4.4, 4.2, 4.0])])
    assert rising == {
        "perplexity": ["100.00", "81.00", "76.00", "80.00"],
        "train_loss": ["4.400", "4.200", "4.000"],
        "best": "76.00",
        "best_round": 2,
    }
    assert central_curve([row([100, 80, 75, 74], [4.4, 4.2, 4.0])]) is None
    assert central_curve([]) is None
