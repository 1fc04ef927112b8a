"""Client-side compressed updates with error feedback, and their decoding in the strategy."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fairedge.client.update_compression import RESIDUAL_KEY, compress_update
from fairedge.common.adapter_record import adapter_from_record, adapter_to_record, flatten, shapes
from fairedge.common.aggregation import Adapter, FedIT
from fairedge.common.compression import decompress
from fairedge.common.config import CompressionConfig
from fairedge.server.strategy import LoraStrategy


def _adapter(seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {"l0": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g))},
        {"classifier.weight": torch.randn(3, 32, generator=g)},
    )


def test_error_feedback_carries_what_compression_dropped():
    cfg = CompressionConfig(enabled=True, density=0.1)
    state = RecordDict()
    start = flatten(_adapter(0))
    true_total = {k: torch.zeros_like(v) for k, v in start.items()}
    sent_total = {k: torch.zeros_like(v) for k, v in start.items()}
    for rnd in range(1, 4):
        trained = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
        payload = compress_update(trained, start, cfg, state, server_round=rnd, num_examples=5)
        sent = decompress(payload, expected={k: tuple(v.shape) for k, v in start.items()})
        for k in start:
            true_total[k] += trained[k] - start[k]
            sent_total[k] += sent[k]
        assert sum(int((s != 0).sum()) for s in sent.values()) == round(0.1 * sum(v.numel() for v in start.values()))
    residual = {k: torch.from_numpy(v.numpy()) for k, v in state[RESIDUAL_KEY].items()}
    for k in start:  # telescoping: everything changed = everything sent + what is still owed
        torch.testing.assert_close(sent_total[k] + residual[k], true_total[k], atol=1e-5, rtol=0)


def test_without_error_feedback_nothing_is_stored():
    state = RecordDict()
    start = flatten(_adapter(0))
    trained = {k: v + 1 for k, v in start.items()}
    compress_update(
        trained, start, CompressionConfig(enabled=True, error_feedback=False), state, server_round=1, num_examples=5
    )
    assert RESIDUAL_KEY not in state


def test_residual_of_a_tensor_not_sent_this_round_waits_for_the_next_round_that_sends_it():
    """RoLoRA sends A and B in alternate rounds: B's residual must survive an A-round."""
    cfg = CompressionConfig(enabled=True, density=0.1)
    state = RecordDict()
    start = flatten(_adapter(0))
    only_b = {k: v for k, v in start.items() if not k.endswith("/A")}
    only_a = {k: v for k, v in start.items() if not k.endswith("/B")}
    compress_update({k: v + 1 for k, v in only_b.items()}, only_b, cfg, state, server_round=1, num_examples=5)
    b_residual = torch.from_numpy(state[RESIDUAL_KEY]["lora/l0/B"].numpy().copy())
    assert b_residual.abs().sum() > 0
    compress_update({k: v + 1 for k, v in only_a.items()}, only_a, cfg, state, server_round=2, num_examples=5)
    assert set(state[RESIDUAL_KEY]) == set(start)
    assert torch.equal(torch.from_numpy(state[RESIDUAL_KEY]["lora/l0/B"].numpy()), b_residual)


@pytest.fixture
def _task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class _Grid:
    """The one Grid call the strategy's sampling makes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _reply(req: Message, payload) -> Message:
    return Message(
        RecordDict(
            {
                "compressed": ConfigRecord({"payload": payload}),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0}),
            }
        ),
        reply_to=req,
    )


@pytest.mark.usefixtures("_task_identity")
def test_strategy_rebuilds_client_adapters_from_compressed_changes_and_rejects_bad_payloads():
    start = _adapter(0)
    s = LoraStrategy(FedIT(), min_train_nodes=2)
    requests = list(s.configure_train(1, adapter_to_record(start), ConfigRecord({}), _Grid()))
    assert sorted(m.metadata.dst_node_id for m in requests) == [1, 2, 3]
    deltas = [flatten(_adapter(1)), flatten(_adapter(2))]
    cfg = CompressionConfig(enabled=True, density=1.0)  # lossless: the average is exact
    payloads = [
        compress_update(
            {k: flatten(start)[k] + d[k] for k in d}, flatten(start), cfg, RecordDict(), server_round=1, num_examples=10
        )
        for d in deltas
    ]
    corrupt = bytearray(payloads[0])
    corrupt[len(corrupt) // 2] ^= 0xFF
    arrays, _ = s.aggregate_train(1, [_reply(m, p) for m, p in zip(requests, [*payloads, bytes(corrupt)])])
    assert arrays is not None
    expected = {k: flatten(start)[k] + (deltas[0][k] + deltas[1][k]) / 2 for k in deltas[0]}
    got = flatten(adapter_from_record(arrays))
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=0)
    assert "bad compressed payload" in s.rounds[-1].rejected[requests[2].metadata.dst_node_id]
    assert s.rounds[-1].bytes_up > 0 and s.rounds[-1].fp32_bytes_up == 3 * 4 * sum(
        torch.Size(v).numel() for v in shapes(start).values()
    )
