"""Privacy in the loopback deployment: real SuperLink and SuperNodes (TLS, node auth), each message a fresh
ClientApp process. Secure aggregation keeps the protocol's keys and shares in the SuperNodes' node state;
central DP clips and noises on the ServerApp and records ε per round, as in simulation."""

import json

import pytest

from fairedge.simulations.loopback_deployment import DEFAULT_CONFIG, LoopbackDeployment
from tests.tiny_vit import TINY_VIT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = LoopbackDeployment(tmp_path_factory.mktemp("deployment"), num_nodes=3, log=lambda m: print(f"[deploy] {m}"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


def _overrides(tmp_path, name, *extra):
    return [
        f"name={name}",
        *TINY_VIT,
        "federation.num_clients=3",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.round_timeout=300",
        f"model.cache_dir='{tmp_path / 'cache'}'",
        "aggregation.method='lora_fair'",
        "aggregation.objective='frobenius'",
        *extra,
    ]


def _rounds(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def test_a_lora_fair_run_under_secure_aggregation_over_three_supernodes(deployment, tmp_path):
    overrides = _overrides(
        tmp_path,
        "secagg-deploy",
        "federation.rounds=1",  # one round: its six exchanges are the protocol; a second adds only time
        "privacy.secure_aggregation.enabled=true",
        "privacy.secure_aggregation.max_weight=100",
    )
    run_dir = deployment.run(DEFAULT_CONFIG, overrides, name="secagg", timeout=900)
    rounds = _rounds(run_dir)
    node_ids = {n.node_id for n in deployment.nodes}
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds[1:]:
        assert r["aggregated"] and set(r["replied"]) == node_ids and not r["rejected"], r
        assert r["aggregator_metrics"]["secagg/survivors"] == 3
        assert r["aggregator_metrics"]["secagg/phase1_dropped"] == 0
        assert sorted(r["partitions"].values()) == [0, 1, 2]


def test_a_central_dp_lora_fair_run_over_three_supernodes_records_epsilon(deployment, tmp_path):
    overrides = _overrides(
        tmp_path,
        "dp-deploy",
        "federation.rounds=2",
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        "privacy.clip_norm=0.01",  # below any update's norm after 2 steps: every client is clipped
        "privacy.noise_seed=0",
        "privacy.delta=1e-5",
    )
    run_dir = deployment.run(DEFAULT_CONFIG, overrides, name="dp", timeout=900)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    node_ids = {n.node_id for n in deployment.nodes}
    assert [r["round"] for r in rounds] == [0, 1, 2]
    eps = [r["privacy"]["epsilon"] for r in rounds[1:]]
    assert 0 < eps[0] < eps[1] and metrics["summary"]["epsilon"] == eps[-1]
    for r in rounds[1:]:
        assert r["aggregated"] and set(r["replied"]) == node_ids and not r["rejected"], r
        assert r["privacy"]["clipped"] == 3 and r["privacy"]["epsilon_round"] > 0
    report = (run_dir / "report.md").read_text()
    assert f"ε = {eps[-1]:.3g} at δ = 1e-05" in report
