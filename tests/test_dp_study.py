"""The DP study's settings (noise seeded per run seed) and its table (paired with no DP, the pre-trained row)."""

from __future__ import annotations

import math

import pytest

from fairedge.simulations import dp_study


def test_every_dp_setting_seeds_its_noise_with_the_run_seed_and_no_dp_has_none():
    settings = dp_study.variants(3)
    assert len(settings) == len(dp_study.METHODS) * len(dp_study.EPSILONS)
    for label, overrides in settings.items():
        private = "privacy.enabled=true" in overrides
        assert private == (not label.endswith("ε=∞"))
        assert ("privacy.noise_seed=3" in overrides) == private
    assert "aggregation.objective=frobenius" in settings["LoRA-FAIR (frobenius) ε=8"]


def _row(seed, final, base=0.4, eps=None):
    summary = {"epsilon": eps, "noise_multiplier": 2.0} if eps is not None else {}
    last = {"round": 1, "mean_accuracy": final}
    if eps is not None:
        last |= {"sampled": [1, 2], "privacy": {"clipped": 1}}
    return {"seed": seed, "summary": summary, "rounds": [{"round": 0, "mean_accuracy": base}, last]}


def test_table_pairs_each_epsilon_with_no_dp_by_seed_and_shows_the_pretrained_model():
    table = dp_study.table(
        {
            "FedIT ε=8": [_row(0, 0.30, eps=7.9), _row(1, 0.40, eps=8.0)],
            "FedIT ε=∞": [_row(0, 0.50), _row(1, 0.55)],
        },
        lm=False,
    )
    assert "| FedIT ε=8 | 0.3500 ± 0.0707 | -0.1750 ± 0.0354 | 8 | 2.000 ± 0.000 | 0.50 ± 0.00 | 0, 1 |" in table
    assert "| FedIT ε=∞ | 0.5250 ± 0.0354 | +0.0000 ± 0.0000 | ∞ |" in table
    assert "| before training (the pre-trained model) | 0.4000 ± 0.0000 |" in table
    assert math.isinf(max(dp_study.EPSILONS))


def test_every_lm_setting_is_a_valid_config_with_a_cohort_of_twenty():
    from fairedge.common.config import load_config
    from fairedge.common.privacy_config import check_privacy

    for label, overrides in dp_study.variants(0).items():
        cfg = load_config(dp_study.CONFIGS / "shakespeare.toml", [*dp_study.COMMON["lm"], *overrides])
        check_privacy(cfg)  # e.g. central DP with sampling refuses error-feedback compression
        f = cfg.federation
        assert round(f.num_clients * f.fraction_train) == 20, label
        assert cfg.privacy.enabled == (not label.endswith("ε=∞"))


def test_lm_utility_is_the_geometric_mean_perplexity_so_one_outlier_client_cannot_dominate():
    normal = {f"role-{i}": math.log(250.0) for i in range(15)}
    outlier = {**normal, "role-odd": math.log(281_661.0)}  # one role's few held-out tokens (seed 1 of the study)
    assert dp_study.utility({"loss": normal}, lm=True) == pytest.approx(250.0)
    assert dp_study.utility({"loss": outlier}, lm=True) == pytest.approx(250.0 * (281_661.0 / 250.0) ** (1 / 16))
    assert dp_study.utility({"loss": outlier}, lm=True) < 400  # the arithmetic mean would be about 17 800
    rounds = [{"round": 0, "loss": normal}, {"round": 1, "loss": {k: math.log(200.0) for k in normal}}]
    table = dp_study.table({"FedIT ε=∞": [{"seed": 0, "summary": {}, "rounds": rounds}]}, lm=True)
    assert "| FedIT ε=∞ | 200.0 ± 0.0 | +0.0 ± 0.0 | ∞ |" in table
    assert "| before training (the pre-trained model) | 250.0 ± 0.0 |" in table
