"""Secure aggregation in the loopback deployment: real SuperLink and SuperNodes (TLS, node auth), each
message a fresh ClientApp process, the protocol's keys and shares kept in the SuperNodes' node state."""

import json

import pytest

from fairedge.simulations.deploy_loopback import DEFAULT_CONFIG, LoopbackDeployment
from tests.tiny_vit import TINY_VIT

pytestmark = pytest.mark.slow


def test_a_lora_fair_run_under_secure_aggregation_over_three_supernodes(tmp_path):
    overrides = [
        "name=secagg-deploy",
        *TINY_VIT,
        "federation.num_clients=3",
        "federation.rounds=1",  # one round: its six exchanges are the protocol; a second adds only time
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.round_timeout=300",
        f"model.cache_dir='{tmp_path / 'cache'}'",
        "aggregation.method='lora_fair'",
        "aggregation.objective='frobenius'",
        "privacy.secure_aggregation.enabled=true",
        "privacy.secure_aggregation.max_weight=100",
    ]
    d = LoopbackDeployment(tmp_path / "deployment", num_nodes=3, log=lambda m: print(f"[deploy] {m}"))
    try:
        d.start()
        run_dir = d.run(DEFAULT_CONFIG, overrides, name="secagg", timeout=900)
    finally:
        d.stop()
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    node_ids = {n.node_id for n in d.nodes}
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds[1:]:
        assert r["aggregated"] and set(r["replied"]) == node_ids and not r["rejected"], r
        assert r["aggregator_metrics"]["secagg/survivors"] == 3
        assert r["aggregator_metrics"]["secagg/phase1_dropped"] == 0
        assert sorted(r["partitions"].values()) == [0, 1, 2]
