"""The strategy leaves out error and malformed replies and keeps aggregating the rest."""

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fairedge.common.adapter_record import adapter_from_record, adapter_to_record
from fairedge.common.aggregation import Adapter, FedIT
from fairedge.server.strategy import LoraStrategy, RoundLog


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages need a run id outside a running Flower app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _adapter(fill: float) -> Adapter:
    return Adapter({"q": (torch.full((2, 4), fill), torch.full((4, 2), fill))}, {"head.w": torch.full((3, 4), fill)})


def _request(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(node: int, adapter: Adapter | None, n: int = 10) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    if adapter is not None:
        content["arrays"] = adapter_to_record(adapter)
    return Message(content, reply_to=_request(node))


def _strategy(min_nodes=2):
    s = LoraStrategy(FedIT(), _adapter(0.0), min_train_nodes=min_nodes)
    s.rounds.append(RoundLog(round=1, sampled=[1, 2, 3, 4, 5]))
    return s


def test_error_and_malformed_replies_are_left_out_and_logged():
    s = _strategy()
    bad_shape = Adapter({"q": (torch.ones(3, 4), torch.ones(4, 2))}, {"head.w": torch.ones(3, 4)})
    nan = _adapter(float("nan"))
    replies = [
        _reply(1, _adapter(1.0), n=10),
        _reply(2, _adapter(3.0), n=30),
        Message(Error(code=0, reason="Traceback...\nRuntimeError: CUDA out of memory"), reply_to=_request(3)),
        _reply(4, bad_shape),
        _reply(5, nan),
        _reply(6, None),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None
    torch.testing.assert_close(adapter_from_record(arrays).factors["q"][0], torch.full((2, 4), 2.5))
    rejected = s.rounds[-1].rejected
    assert set(rejected) == {3, 4, 5, 6}
    assert "CUDA out of memory" in rejected[3]
    assert "shape (3, 4), expected (2, 4)" in rejected[4]
    assert "non-finite" in rejected[5]
    assert "lacks 'arrays'" in rejected[6]
    assert metrics["train-loss"] == pytest.approx(0.5)


def test_too_few_valid_replies_keep_the_global_adapter():
    s = _strategy(min_nodes=2)
    before = s.global_adapter
    arrays, metrics = s.aggregate_train(1, [_reply(1, _adapter(1.0)), _reply(2, _adapter(float("inf")))])
    assert arrays is None and metrics is None
    assert s.global_adapter is before and not s.rounds[-1].aggregated
