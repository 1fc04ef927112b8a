"""Client-level DP: clipping, noise scale, the accountant, calibration, the central release, config errors."""

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fairedge.common.aggregation import Adapter, ClientUpdate, make_aggregator
from fairedge.common.aggregation.lora_fair import lora_fair
from fairedge.common.config import ConfigError, build_config
from fairedge.common.privacy import add_noise, clip_update, noise_generator, update_norm
from fairedge.common.privacy_config import PrivacyConfig
from fairedge.server.privacy.accountant import calibrate_noise_multiplier, epsilon_of, resolve_noise_multiplier
from fairedge.server.privacy.central import ClientLevelDP
from fairedge.server.round_log import RoundLog, SentRound


def test_clipping_bounds_every_update_and_leaves_small_ones_alone():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.5, 3.0, 100.0):
        update = {"a": torch.randn(4, 7, generator=gen) * scale, "b": torch.randn(9, generator=gen) * scale}
        clipped, norm, was_clipped = clip_update(update, 1.0)
        assert norm == pytest.approx(update_norm(update))
        assert update_norm(clipped) <= 1.0 + 1e-6
        assert was_clipped == (norm > 1.0)
        if not was_clipped:
            assert all(torch.equal(clipped[k], update[k]) for k in update)
        else:  # direction kept, norm exactly the bound
            assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
            assert torch.allclose(clipped["a"] * norm, update["a"], rtol=1e-5)


def _sample_std(noised: dict[str, torch.Tensor]) -> float:
    flat = torch.cat([t.flatten().double() for t in noised.values()])
    return float(flat.std())


def test_noise_has_the_configured_scale_and_a_wrong_scale_would_fail():
    # 400 000 coordinates: the sample std's relative error is about 1/sqrt(2n) = 0.11 %, so a 1 % tolerance is
    # ~9 standard errors from failing by chance, and a scale 5 % off is ~45 standard errors away
    z, clip = 1.3, 0.7
    zeros = {"a": torch.zeros(400, 500), "b": torch.zeros(200_000)}
    std = _sample_std(add_noise(zeros, z * clip, noise_generator(7, 1)))
    assert abs(std / (z * clip) - 1) < 0.01
    assert abs(std / (1.05 * z * clip) - 1) > 0.03


def _adapter(gen, m=30, n=20, r=4, head=10, scale=1.0) -> Adapter:
    return Adapter(
        {"l0": (torch.randn(r, n, generator=gen) * scale, torch.randn(m, r, generator=gen) * scale)},
        {"w": torch.randn(head, generator=gen) * scale},
    )


def _round(sent: Adapter, sampled: int) -> SentRound:
    return SentRound(RoundLog(round=1, sampled=list(range(sampled))), sent, sent, {}, [], population=sampled * 4)


def test_central_release_noise_on_the_mean_has_scale_z_c_over_k():
    gen = torch.Generator().manual_seed(1)
    sent = _adapter(gen, m=300, n=200, r=8, head=1000)
    k, z, clip = 5, 2.0, 0.5
    dp = ClientLevelDP(PrivacyConfig(enabled=True, noise_multiplier=z, clip_norm=clip, noise_seed=3), z, k)
    updates = [ClientUpdate(sent, 1, i) for i in range(k)]  # nobody moved: the output is sent + noise
    new, _, row = dp.release(updates, _round(sent, k), make_aggregator("fedit"), population=4 * k)
    noise = {"A": new.factors["l0"][0] - sent.factors["l0"][0], "B": new.factors["l0"][1] - sent.factors["l0"][1]}
    noise["head"] = new.head["w"] - sent.head["w"]
    assert abs(_sample_std(noise) / (z * clip / k) - 1) < 0.02  # 6 000 coordinates: standard error 0.9 %
    assert row["noise_std_mean"] == pytest.approx(z * clip / k) and row["clipped"] == 0
    assert row["sampling_rate"] == pytest.approx(0.25) and row["epsilon"] == row["epsilon_round"] > 0


@pytest.mark.parametrize("method", ["fedit", "lora_fair"])
def test_central_release_without_noise_or_clipping_is_the_rule_with_uniform_weights(method):
    gen = torch.Generator().manual_seed(2)
    sent = _adapter(gen)
    clients = [_adapter(gen, scale=0.3) for _ in range(3)]
    clients = [
        Adapter(
            {"l0": (sent.factors["l0"][0] + c.factors["l0"][0], sent.factors["l0"][1] + c.factors["l0"][1])}, c.head
        )
        for c in clients
    ]
    updates = [ClientUpdate(c, 10 * (i + 1), i) for i, c in enumerate(clients)]  # DP ignores num_examples
    cfg = PrivacyConfig(enabled=True, noise_multiplier=0.0, clip_norm=1e6, noise_seed=0)
    dp = ClientLevelDP(cfg, 0.0, 3, lam=0.01)
    agg = make_aggregator(method, **({"objective": "frobenius"} if method == "lora_fair" else {}))
    new, _, row = dp.release(updates, _round(sent, 3), agg, population=3)
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    A = [c.factors["l0"][0] for c in clients]
    B = [c.factors["l0"][1] for c in clients]
    if method == "fedit":
        want_a, want_b = sum(A) / 3, sum(B) / 3
    else:
        want_a, want_b = lora_fair(A, B, p, lam=0.01, objective="frobenius")
    assert torch.allclose(new.factors["l0"][0], want_a, atol=1e-5)
    assert torch.allclose(new.factors["l0"][1], want_b, atol=1e-4)
    assert torch.allclose(new.head["w"], sum(c.head["w"] for c in clients) / 3, atol=1e-5)
    assert row["epsilon"] == math.inf


def test_adaptive_clipping_raises_a_bound_that_clips_everyone():
    gen = torch.Generator().manual_seed(3)
    sent = _adapter(gen)
    far = [Adapter({"l0": (a + 5, b + 5)}, {"w": sent.head["w"] + 5}) for a, b in [sent.factors["l0"]] * 4]
    cfg = PrivacyConfig(
        enabled=True, noise_multiplier=0.5, clipping="adaptive", clip_norm=1.0, clipped_count_stddev=1.0, noise_seed=0
    )
    dp = ClientLevelDP(cfg, 0.5, 4)
    assert dp.update_multiplier > 0.5 and dp.count_std == 1.0
    _, _, row = dp.release(
        [ClientUpdate(f, 1, i) for i, f in enumerate(far)], _round(sent, 4), make_aggregator("fedit"), 16
    )
    assert row["clipped"] == 4 and row["clip_norm"] == 1.0
    assert dp.clip_norm > 1.0  # nobody under the bound: it grows towards the median norm


def test_accountant_matches_dp_accounting_directly():
    z, k, n, rounds, delta = 1.1, 10, 200, 30, 1e-5
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(n, k, dp_event.GaussianDpEvent(z / 2))
    acc.compose(event, rounds)
    assert epsilon_of([(z, k, n)] * rounds, delta, "central") == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    local = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    local.compose(dp_event.GaussianDpEvent(z / 2), rounds)
    assert epsilon_of([(z, k, n)] * rounds, delta, "local") == pytest.approx(local.get_epsilon(delta), rel=1e-12)
    # amplification: sampling 10 of 200 costs far less than everyone every round
    assert epsilon_of([(z, k, n)] * rounds, delta, "central") < 0.5 * epsilon_of([(z, n, n)] * rounds, delta, "central")


@pytest.mark.parametrize(("mode", "k", "n"), [("central", 8, 100), ("central", 6, 6), ("local", 6, 6)])
def test_calibrated_noise_meets_the_target_after_the_planned_rounds(mode, k, n):
    target, delta, rounds = 4.0, 1e-5, 20
    z = calibrate_noise_multiplier(target, delta, rounds, k, n, mode)
    eps = epsilon_of([(z, k, n)] * rounds, delta, mode)
    assert eps <= target and eps > 0.99 * target  # within budget, not needlessly noisy
    cfg = build_config(
        {},
        [
            "privacy.enabled=true",
            f"privacy.target_epsilon={target}",
            f"privacy.mode='{mode}'",
            f"federation.num_clients={n}",
            f"federation.fraction_train={k / n}",
            f"federation.rounds={rounds}",
        ],
    )
    assert resolve_noise_multiplier(cfg) == pytest.approx(z)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["aggregation.method='flexlora'"],
            "aggregation.method='flexlora' is not supported with privacy.mode='central'",
        ),
        (["aggregation.method='flora'"], "aggregation.method='flora'"),
        (["aggregation.method='fedex_lora'"], "aggregation.method='fedex_lora'"),
        (["aggregation.method='lora_fair'"], "aggregation.objective='cosine' with lora_fair"),
        (
            ["aggregation.method='lora_fair'", "aggregation.objective='frobenius'", "privacy.clipping='adaptive'"],
            "privacy.clipping='adaptive' is not supported with lora_fair",
        ),
        (
            ["compression.enabled=true", "federation.fraction_train=0.5"],
            "federation.fraction_train=0.5 with privacy.mode='central' and compression.error_feedback=true",
        ),
        (["aggregation.method='fedsa_lora'", "federation.fraction_train=0.5"], "fedsa_lora' (personal B)"),
        (["privacy.target_epsilon=2.0"], "set exactly one of privacy.noise_multiplier and privacy.target_epsilon"),
        (["privacy.mode='local'", "privacy.clipping='adaptive'"], "privacy.clipping='adaptive' needs privacy.mode"),
        (["privacy.clipping='adaptive'"], "needs privacy.clipped_count_stddev > 0.5 (got 0.3"),
    ],
)
def test_unsupported_combinations_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match="invalid config") as err:
        build_config({}, ["privacy.enabled=true", "privacy.noise_multiplier=1.0", *overrides])
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["aggregation.method='flexlora'", "privacy.mode='local'"],
        ["aggregation.method='lora_fair'", "aggregation.objective='frobenius'"],
        ["compression.enabled=true", "compression.error_feedback=false", "federation.fraction_train=0.5"],
        ["compression.enabled=true", "federation.fraction_train=0.5", "privacy.mode='local'"],
        ["aggregation.method='rolora'", "privacy.clipping='adaptive'", "privacy.clipped_count_stddev=2.0"],
    ],
)
def test_supported_combinations_validate(overrides):
    cfg = build_config({}, ["privacy.enabled=true", "privacy.noise_multiplier=1.0", *overrides])
    assert cfg.privacy.enabled


def test_the_ledger_and_adaptive_bound_survive_a_checkpoint():
    from fairedge.server.strategy import LoraStrategy

    cfg = PrivacyConfig(enabled=True, noise_multiplier=1.0, clipping="adaptive", clipped_count_stddev=1.0)
    dp = ClientLevelDP(cfg, 1.0, 4)
    dp.ledger.record(1.0, 4, 16)
    dp.clip_norm = 0.37
    strategy = LoraStrategy(make_aggregator("fedit"), privacy=dp)
    restored = LoraStrategy(make_aggregator("fedit"), privacy=ClientLevelDP(cfg, 1.0, 4))
    restored.load_state_dict(strategy.state_dict())
    assert restored.privacy is not None and restored.privacy.clip_norm == 0.37
    assert restored.privacy.ledger.events == [(1.0, 4, 16)]
    with pytest.raises(ValueError, match="no privacy ledger"):
        restored.load_state_dict(LoraStrategy(make_aggregator("fedit")).state_dict())
