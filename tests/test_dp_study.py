"""The DP study's settings (noise seeded per run seed) and its table (paired with no DP, the pre-trained row)."""

from __future__ import annotations

import math

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
    summary = {"final_mean_accuracy": final, "base_mean_accuracy": base}
    if eps is not None:
        summary |= {"epsilon": eps, "noise_multiplier": 2.0}
    rounds = [{"round": 1, "sampled": [1, 2], "privacy": {"clipped": 1}}] if eps is not None else [{"round": 1}]
    return {"seed": seed, "summary": summary, "rounds": rounds}


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
