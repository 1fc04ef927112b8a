"""The strategy follows Flower's Strategy contract (the global adapter is the `arrays` it is handed), leaves
out error and malformed replies and keeps aggregating the rest."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fairedge.common.adapter_record import adapter_from_record, adapter_to_record, record_tensors, tensors_to_record
from fairedge.common.aggregation import TRAIN_FACTORS, Adapter, FedIT, RoLoRA
from fairedge.server.strategy import LoraStrategy
from fairedge.simulations.simulate import InProcessGrid


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


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4, 5]


def _strategy(min_nodes=2):
    s = LoraStrategy(FedIT(), min_train_nodes=min_nodes)
    s.configure_train(1, adapter_to_record(_adapter(0.0)), ConfigRecord(), _Nodes())
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


def test_too_few_valid_replies_give_no_new_global_adapter():
    s = _strategy(min_nodes=2)
    arrays, metrics = s.aggregate_train(1, [_reply(1, _adapter(1.0)), _reply(2, _adapter(float("inf")))])
    assert arrays is None and metrics is None and not s.rounds[-1].aggregated


def test_the_handed_arrays_are_sent_and_aggregated_onto():
    """RoLoRA's round 1 trains B only: A of the next global adapter is A of the `arrays` handed in."""
    s = LoraStrategy(RoLoRA(), min_train_nodes=2, downlink="fp16")
    handed = Adapter({"q": (torch.full((2, 4), 1 / 3), torch.zeros(4, 2))}, {"head.w": torch.zeros(3, 4)})
    messages = list(s.configure_train(1, adapter_to_record(handed), ConfigRecord({"x": 1}), _Nodes()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3, 4, 5]
    sent = adapter_from_record(messages[0].content["arrays"])
    assert sent.factors["q"][0][0, 0].item() == float(torch.tensor(1 / 3).half())  # fp16 downlink
    config = messages[0].content["config"]
    assert config[TRAIN_FACTORS] == "B" and config["x"] == 1 and config["server-round"] == 1
    replies = []
    for m in messages[:2]:
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: v for k, v in adapter_to_record(_adapter(2.0)).items() if "/A" not in k}),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            }
        )
        replies.append(Message(content, reply_to=m))
    arrays, _ = s.aggregate_train(1, replies)
    new = adapter_from_record(arrays)
    torch.testing.assert_close(new.factors["q"][0], handed.factors["q"][0])  # kept at full precision
    torch.testing.assert_close(new.factors["q"][1], torch.full((4, 2), 2.0))


def test_the_contract_is_enforced():
    s = LoraStrategy(FedIT(), min_train_nodes=2)
    with pytest.raises(ValueError, match="must hold the global adapter"):
        s.configure_train(1, ArrayRecord(), ConfigRecord(), _Nodes())
    with pytest.raises(RuntimeError, match=r"aggregate_train\(1\) without configure_train\(1\)"):
        s.aggregate_train(1, [])
    s.configure_train(1, adapter_to_record(_adapter(0.0)), ConfigRecord(), _Nodes())
    with pytest.raises(RuntimeError, match=r"aggregate_train\(2\)"):
        s.aggregate_train(2, [])


def test_runs_under_flowers_own_strategy_start():
    """The contract in action: Flower's `Strategy.start` holds the global arrays and hands them round to round."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context) -> Message:  # every client adds 1 to what it received
        arrays = tensors_to_record({k: t + 1.0 for k, t in record_tensors(msg.content["arrays"]).items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    result = LoraStrategy(FedIT(), min_train_nodes=2).start(
        InProcessGrid(app, 3), adapter_to_record(_adapter(0.0)), num_rounds=3, timeout=10
    )
    final = record_tensors(result.arrays)
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in final.values())
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
