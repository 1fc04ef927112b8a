"""Secure aggregation: SecAgg+ rounds equal their plaintext result, dropouts are handled as SecAgg+
specifies, LoRA-FAIR's two-phase round equals plaintext frobenius LoRA-FAIR, bad combinations are refused."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fairedge.client.secagg import secagg_mod
from fairedge.common.adapter_record import adapter_from_record, adapter_to_record, record_tensors, tensors_to_record
from fairedge.common.aggregation import (
    Adapter,
    FedIT,
    FedSALoRA,
    FFALoRA,
    LoraFair,
    RoLoRA,
    frobenius_from_sums,
    lora_fair,
    reply_factors,
)
from fairedge.common.config import ConfigError, load_config
from fairedge.common.privacy_config import SecureAggregationConfig
from fairedge.common.secagg import SECAGG_KEY, FixedPoint, Stage
from fairedge.server.secagg import SecureAggregation
from fairedge.server.strategy import LoraStrategy
from fairedge.simulations.simulate import InProcessGrid

M_, N_, R_ = 6, 5, 2


def _start() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return Adapter(
        {"q": (torch.randn(R_, N_, generator=g) * 0.3, torch.randn(M_, R_, generator=g) * 0.3)},
        {"head.w": torch.randn(3, 4, generator=g) * 0.3},
    )


def _examples(partition: int) -> int:
    return 20 + 7 * partition


def _trained(received: dict[str, torch.Tensor], partition: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + partition)
    return {k: t + 0.05 * torch.randn(t.shape, generator=g) for k, t in received.items()}


def _client_app() -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        received = record_tensors(msg.content.array_records["arrays"])
        send = reply_factors(msg.content.config_records["config"])
        keep = {k for k in received if k.startswith("head/") or k.rsplit("/", 1)[-1] in send}
        trained = _trained({k: received[k] for k in keep}, partition)
        metrics = MetricRecord(
            {"num-examples": _examples(partition), "train-loss": 1.0 + partition, "partition-id": partition}
        )
        return Message(RecordDict({"arrays": tensors_to_record(trained), "metrics": metrics}), reply_to=msg)

    return app


class DroppingGrid(InProcessGrid):
    """Nodes in `drop[(stage, phase)]` never answer that stage (and, having left, nothing after it)."""

    def __init__(self, *args, drop=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = drop or {}
        self.gone: set[int] = set()

    def send_and_receive(self, messages, *, timeout=None):
        kept = []
        for m in messages:
            f = m.content.config_records[SECAGG_KEY]
            self.gone |= set(self.drop.get((str(f["stage"]), int(f.get("phase", 0))), ()))
            if m.metadata.dst_node_id not in self.gone:
                kept.append(m)
        return super().send_and_receive(kept, timeout=timeout)


def _plaintext(aggregator, survivors: list[int], server_round: int = 1) -> Adapter:
    """The rule on the clients' plaintext updates (what the server would compute without SecAgg)."""
    strategy = LoraStrategy(aggregator, min_train_nodes=2)
    start = adapter_to_record(_start())
    grid = InProcessGrid(_client_app(), 5)
    messages = [m for m in strategy.configure_train(server_round, start, ConfigRecord({}), grid)]
    replies = [r for r in grid.send_and_receive(messages) if r.metadata.src_node_id in survivors]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return adapter_from_record(arrays)


def _secure(aggregator, grid=None, server_round: int = 1, **cfg):
    strategy = LoraStrategy(aggregator, min_train_nodes=2, update_norm_rule="off")
    sa = SecureAggregation(SecureAggregationConfig(enabled=True, **cfg), lam=getattr(aggregator, "lam", 0.01))
    grid = grid or InProcessGrid(_client_app(), 5)
    arrays, metrics = sa.run_round(strategy, server_round, adapter_to_record(_start()), ConfigRecord({}), grid)
    return (adapter_from_record(arrays) if arrays is not None else None), metrics, strategy.rounds[-1]


def _close(a: Adapter, b: Adapter, atol: float) -> None:
    for layer, (x, y) in a.factors.items():
        torch.testing.assert_close(x, b.factors[layer][0], atol=atol, rtol=0)
        torch.testing.assert_close(y, b.factors[layer][1], atol=atol, rtol=0)
    for k, t in a.head.items():
        torch.testing.assert_close(t, b.head[k], atol=atol, rtol=0)


def test_fixed_point_sums_signed_values_in_the_ring():
    fp = FixedPoint(clip_range=1.0, bits=20, modulus_bits=32)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-0.9, 0.9, 50) for _ in range(6)]
    total = sum(fp.encode(x, 10 + i, 2.0, 0.5) for i, x in enumerate(xs))
    examples, clamped, loss, values = fp.decode(total.astype(fp.dtype))
    assert examples == sum(10 + i for i in range(6)) and clamped == 0 and loss == pytest.approx(6.0)
    assert np.abs(values - 0.5 * sum(xs)).max() <= 6 * fp.step / 2 + 1e-12
    _, clamped, _, _ = fp.decode(fp.encode(np.array([3.0, -0.1]), 1, 0.0, 1.0))
    assert clamped == 1


def test_frobenius_from_sums_is_plaintext_frobenius_lora_fair_exactly():
    g = torch.Generator().manual_seed(3)
    A = [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    B = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    p = torch.tensor([1.0, 2.0, 3.0, 1.5, 0.5], dtype=torch.float64)
    p = p / p.sum()
    a_bar = sum(pk * a for pk, a in zip(p, A, strict=True))
    b_bar = sum(pk * b for pk, b in zip(p, B, strict=True))
    m = sum(pk * b @ (a @ a_bar.T) for pk, a, b in zip(p, A, B, strict=True))
    for lam in (0.0, 0.01, 1.0):
        _, expected = lora_fair(A, B, p, lam=lam, objective="frobenius")
        torch.testing.assert_close(frobenius_from_sums(a_bar, b_bar, m, lam), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("modulus_bits, bits, atol", [(32, 24, 2e-6), (64, 48, 1e-7)])
def test_a_secure_fedit_round_equals_the_plaintext_one(modulus_bits, bits, atol):
    got, metrics, entry = _secure(FedIT(), modulus_bits=modulus_bits, quantization_bits=bits, max_weight=60)
    _close(got, _plaintext(FedIT(), [1000, 1001, 1002, 1003, 1004]), atol)
    assert entry.aggregated and sorted(entry.replied) == [1000, 1001, 1002, 1003, 1004]
    weights = [_examples(i) for i in range(5)]
    assert metrics["train-loss"] == pytest.approx(
        sum(w * (1 + i) for i, w in enumerate(weights)) / sum(weights), abs=1e-4
    )
    assert entry.partitions == {1000 + i: i for i in range(5)} and entry.bytes_up > 0


@pytest.mark.parametrize("rule", [RoLoRA, FFALoRA, FedSALoRA], ids=["rolora", "ffa_lora", "fedsa_lora"])
def test_rules_that_send_one_factor_equal_their_plaintext_round(rule):
    got, _, _ = _secure(rule(), server_round=2, max_weight=60)
    _close(got, _plaintext(rule(), [1000, 1001, 1002, 1003, 1004], server_round=2), 2e-6)


def test_the_server_only_ever_receives_masked_vectors():
    seen = []

    class Spy(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            seen.extend(replies)
            return replies

    _secure(FedIT(), grid=Spy(_client_app(), 5), max_weight=60)
    assert all(not r.content.array_records for r in seen)  # no tensors in the clear
    masked = [r for r in seen if "masked" in r.content.config_records[SECAGG_KEY]]
    assert len(masked) == 5
    assert all("train-loss" not in r.content.metric_records["metrics"] for r in masked)


def test_a_client_dropping_after_share_keys_is_unmasked_from_its_neighbours_shares():
    grid = DroppingGrid(_client_app(), 5, drop={(Stage.MASKED, 0): [1003], (Stage.UNMASK, 0): [1001]})
    got, metrics, entry = _secure(FedIT(), grid=grid, max_weight=60, num_shares=5, reconstruction_threshold=0.6)
    _close(got, _plaintext(FedIT(), [1000, 1001, 1002, 1004]), 2e-6)
    assert metrics["secagg/survivors"] == 4 and sorted(entry.no_reply) == [1001, 1003]
    assert entry.replied == [1000, 1001, 1002, 1004]  # 1001's vector is in the sum; its seed came from shares


def test_secagg_plus_sparse_neighbours_recover_a_dropped_client():
    grid = DroppingGrid(_client_app(), 5, drop={(Stage.MASKED, 0): [1003]})
    got, metrics, _ = _secure(FedIT(), grid=grid, max_weight=60, num_shares=3, reconstruction_threshold=0.6)
    _close(got, _plaintext(FedIT(), [1000, 1001, 1002, 1004]), 2e-6)
    assert metrics["secagg/threshold"] == 2


def test_too_few_survivors_fail_the_attempt_clearly():
    grid = DroppingGrid(_client_app(), 5, drop={(Stage.MASKED, 0): [1001, 1002, 1003]})
    got, metrics, entry = _secure(FedIT(), grid=grid, max_weight=60, reconstruction_threshold=0.6)
    assert got is None and metrics is None and not entry.aggregated
    assert "fewer than the threshold 3" in entry.failure


def test_lora_fair_two_phase_round_equals_plaintext_frobenius_lora_fair():
    rule = LoraFair(lam=0.01, objective="frobenius")
    got, metrics, _ = _secure(rule, modulus_bits=64, quantization_bits=48, max_weight=60)
    _close(got, _plaintext(LoraFair(lam=0.01, objective="frobenius"), [1000, 1001, 1002, 1003, 1004]), 1e-7)
    fedit = _plaintext(FedIT(), [1000, 1001, 1002, 1003, 1004])
    assert (got.factors["q"][1] - fedit.factors["q"][1]).abs().max() > 1e-4  # the correction is not a no-op
    assert metrics["secagg/phase1_dropped"] == 0


def test_lora_fair_survives_a_dropout_in_either_phase():
    grid = DroppingGrid(_client_app(), 5, drop={(Stage.MASKED, 0): [1002], (Stage.MASKED, 1): [1004]})
    got, metrics, _ = _secure(LoraFair(lam=0.01, objective="frobenius"), grid=grid, max_weight=60)
    assert got is not None and metrics["secagg/phase1_dropped"] == 1
    fedit = _plaintext(FedIT(), [1000, 1001, 1003, 1004])  # phase 0 (Ā) is over the phase-0 survivors
    torch.testing.assert_close(got.factors["q"][0], fedit.factors["q"][0], atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["aggregation.method='flexlora'"], "aggregation.method='flexlora' is not supported"),
        (["aggregation.method='lora_fair'"], "aggregation.objective='cosine'"),
        (["compression.enabled=true"], "compression.enabled=true"),
        (["privacy.enabled=true", "privacy.noise_multiplier=1.0"], "privacy.mode='central'"),
        (["privacy.secure_aggregation.quantization_bits=30"], "allowed: <= 28"),
    ],
)
def test_impossible_combinations_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match="allowed") as err:
        load_config(None, ["privacy.secure_aggregation.enabled=true", *overrides])
    assert needle in str(err.value)


def test_local_dp_composes_with_secure_aggregation():
    cfg = load_config(
        None,
        [
            "privacy.secure_aggregation.enabled=true",
            "privacy.enabled=true",
            "privacy.mode='local'",
            "privacy.noise_multiplier=1.0",
            "aggregation.method='lora_fair'",
            "aggregation.objective='frobenius'",
        ],
    )
    assert cfg.privacy.secure_aggregation.enabled and cfg.privacy.mode == "local"
