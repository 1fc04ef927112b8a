"""The ClientApp holds no process state: nothing kept between calls, no process-wide setting changed."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fairedge.client.client_app import CONFIG_KEY, run_evaluate, run_train
from fairedge.common.adapter_record import adapter_to_record, record_tensors
from fairedge.common.config import build_config
from fairedge.common.task import config_json, get_adapter, lora_model


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages need a run id outside a running Flower app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return build_config(
        {},
        [
            f"model.cache_dir='{tmp_path_factory.mktemp('vit')}'",
            "model.pretrain_epochs=1",
            "model.hidden_size=16",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.intermediate_size=16",
            "data.samples_per_domain=40",
            "lora.rank=2",
            "federation.num_clients=2",
            "federation.local_steps=3",
            "federation.batch_size=8",
            "federation.client_cpus=1",
            "federation.device='cpu'",
        ],
    )


def _message(cfg, kind: str) -> Message:
    glob = get_adapter(lora_model(cfg))
    config = ConfigRecord({CONFIG_KEY: config_json(cfg), "server-round": 1})
    return Message(RecordDict({"arrays": adapter_to_record(glob), "config": config}), dst_node_id=1, message_type=kind)


def _context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={}
    )


def test_client_calls_leave_the_process_thread_count_alone(cfg):
    """With `--engine inprocess` the server shares the process: a client must not set its thread count."""
    before = torch.get_num_threads()
    threads = int(cfg.federation.client_cpus) + 2  # anything but what the client may use
    torch.set_num_threads(threads)
    try:
        run_train(_message(cfg, MessageType.TRAIN), _context())
        assert torch.get_num_threads() == threads
        run_evaluate(_message(cfg, MessageType.EVALUATE), _context())
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_client_calls_carry_nothing_over(cfg):
    """Every call builds its model afresh: the same message gives the same reply, and the global RNG is untouched."""
    rng = torch.random.get_rng_state()
    replies = [record_tensors(run_train(_message(cfg, MessageType.TRAIN), _context()).content["arrays"]) for _ in "ab"]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert replies[0].keys() == replies[1].keys()
    assert all(torch.equal(replies[0][k], replies[1][k]) for k in replies[0])
    start = record_tensors(adapter_to_record(get_adapter(lora_model(cfg))))
    assert any(not torch.equal(replies[0][k], start[k]) for k in replies[0])  # it did train


def test_the_simulation_entry_point_sets_the_thread_count_once():
    from fairedge.simulations.cli import build_parser, set_threads

    assert build_parser().parse_args(["run", "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--threads", "0"])
    before = torch.get_num_threads()
    try:
        set_threads(3)
        assert torch.get_num_threads() == 3
        set_threads(None)  # unset: torch's default stays as it is
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
