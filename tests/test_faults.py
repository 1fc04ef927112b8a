"""Faults a federation survives: poisoned updates (rejected or clipped), crashed or silent clients,
rounds retried when too few replies came back, and a run that stops cleanly and resumes when retries run out."""

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fairedge.client.client_app import run_train
from fairedge.common.adapter_record import adapter_to_record, flatten, record_tensors
from fairedge.common.aggregation import Adapter, FedIT
from fairedge.common.config import build_config
from fairedge.server.checkpoint import load_checkpoint
from fairedge.server.federation import RoundFailed
from fairedge.server.strategy import LoraStrategy
from fairedge.simulations.simulate import InProcessGrid, simulate
from tests.tiny_vit import TINY_VIT

# --- the strategy on crafted replies --------------------------------------------------------------


@pytest.fixture
def _task_identity(monkeypatch):
    """Messages need a run id outside a running Flower app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


class _Nodes:
    def __init__(self, *ids: int) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return self.ids


def _start() -> Adapter:
    return Adapter({"q": (torch.zeros(2, 4), torch.zeros(4, 2))}, {"head.w": torch.zeros(3, 4)})


def _update(seed: int, scale: float = 1.0) -> Adapter:
    """A change of norm `scale` in a random direction (the start is all zeros)."""
    g = torch.Generator().manual_seed(seed)
    t = {k: torch.randn(v.shape, generator=g) for k, v in flatten(_start()).items()}
    norm = torch.sqrt(sum(v.square().sum() for v in t.values()))
    return Adapter(
        {"q": (t["lora/q/A"] * scale / norm, t["lora/q/B"] * scale / norm)}, {"head.w": t["head/head.w"] * scale / norm}
    )


def _round(strategy: LoraStrategy, updates: dict[int, Adapter], server_round: int = 1):
    """Configure a round on nodes 1..3, reply with `updates` (node → adapter), aggregate."""
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(server_round, adapter_to_record(_start()), ConfigRecord(), _Nodes(1, 2, 3))
    }
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": adapter_to_record(a),
                    "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": node - 1}),
                }
            ),
            reply_to=messages[node],
        )
        for node, a in updates.items()
    ]
    return strategy.aggregate_train(server_round, replies)


def _mean(*adapters: Adapter) -> dict[str, torch.Tensor]:
    flat = [flatten(a) for a in adapters]
    return {k: sum(f[k] for f in flat) / len(flat) for k in flat[0]}


@pytest.mark.usefixtures("_task_identity")
def test_error_reply_made_by_the_superlink_is_charged_to_the_node_it_was_sent_to():
    """A dead SuperNode's error reply comes from the SuperLink (sender id 1); the report names the dead node."""
    from flwr.app import Error

    s = LoraStrategy(FedIT(), min_train_nodes=2)
    messages = {
        m.metadata.dst_node_id: m
        for m in s.configure_train(1, adapter_to_record(_start()), ConfigRecord(), _Nodes(7, 8, 9))
    }
    for node, m in messages.items():  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"msg-{node}"
    ok = [
        Message(
            RecordDict(
                {
                    "arrays": adapter_to_record(_update(n)),
                    "metrics": MetricRecord({"num-examples": 10, "partition-id": n - 7}),
                }
            ),
            reply_to=messages[n],
        )
        for n in (7, 8)
    ]
    dead = Message(Error(0, "Node Unavailable"), reply_to=messages[9])
    dead.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answered for it
    arrays, _ = s.aggregate_train(1, [*ok, dead])
    entry = s.rounds[-1]
    assert arrays is not None and set(entry.rejected) == {9} and "no reply: Node Unavailable" in entry.rejected[9]
    assert sorted(entry.replied) == [7, 8] and entry.no_reply == []


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_poisoned_update_is_rejected_with_its_node_and_the_global_model_stays_finite(poison):
    s = LoraStrategy(FedIT(), min_train_nodes=2)
    bad = (
        _update(3, 1e6)
        if poison == "huge"
        else Adapter({"q": (torch.full((2, 4), float("nan")), torch.zeros(4, 2))}, {"head.w": torch.zeros(3, 4)})
    )
    arrays, _ = _round(s, {1: _update(1), 2: _update(2, 1.5), 3: bad})
    assert arrays is not None
    entry = s.rounds[-1]
    assert set(entry.rejected) == {3} and entry.replied == [1, 2, 3]
    why = entry.rejected[3]
    assert (
        ("non-finite" in why) if poison == "nan" else ("x the round's median update norm" in why and "limit 10x" in why)
    )
    got = record_tensors(arrays)
    assert all(torch.isfinite(t).all() for t in got.values())
    for k, want in _mean(_update(1), _update(2, 1.5)).items():
        torch.testing.assert_close(got[k], want)


@pytest.mark.usefixtures("_task_identity")
def test_clip_mode_scales_the_outlier_to_the_limit_and_keeps_its_direction():
    s = LoraStrategy(FedIT(), min_train_nodes=2, update_norm_rule="clip", update_norm_factor=4.0)
    arrays, _ = _round(s, {1: _update(1, 1.0), 2: _update(2, 2.0), 3: _update(3, 1e6)})
    entry = s.rounds[-1]
    assert arrays is not None and not entry.rejected and set(entry.clipped) == {3}
    assert entry.update_norms[3] == pytest.approx(1e6) and entry.update_norms[2] == pytest.approx(2.0)
    assert "scaled by" in entry.clipped[3] and "to norm 8" in entry.clipped[3]  # 4 × median 2
    clipped = _update(3, 8.0)  # same direction, norm 4 × the median
    for k, want in _mean(_update(1, 1.0), _update(2, 2.0), clipped).items():
        torch.testing.assert_close(record_tensors(arrays)[k], want)


@pytest.mark.usefixtures("_task_identity")
def test_two_updates_are_judged_against_the_smaller_and_off_mode_only_logs():
    s = LoraStrategy(FedIT(), min_train_nodes=1)
    _round(s, {1: _update(1, 1.0), 2: _update(2, 50.0)})
    assert set(s.rounds[-1].rejected) == {2} and "smaller update norm" in s.rounds[-1].rejected[2]
    off = LoraStrategy(FedIT(), min_train_nodes=2, update_norm_rule="off")
    arrays, _ = _round(off, {1: _update(1), 2: _update(2), 3: _update(3, 1e6)})
    assert arrays is not None and not off.rounds[-1].rejected and off.rounds[-1].update_norms[3] == pytest.approx(1e6)
    with pytest.raises(ValueError, match="update_norm_rule"):
        LoraStrategy(FedIT(), update_norm_rule="drop")  # type: ignore[arg-type]


@pytest.mark.usefixtures("_task_identity")
def test_too_few_replies_are_not_aggregated_and_the_silent_node_is_named():
    s = LoraStrategy(FedIT(), min_train_nodes=2)
    arrays, metrics = _round(s, {1: _update(1)})  # nodes 2 and 3 never answered
    entry = s.rounds[-1]
    assert arrays is None and metrics is None
    assert sorted(entry.no_reply) == [2, 3] and not entry.aggregated
    assert "1 valid updates from 3 sampled nodes, fewer than min_train_nodes=2" in entry.failure
    # the retry is a new attempt of the same round
    _round(s, {1: _update(1), 2: _update(2)})
    assert [(r.round, r.attempt, r.aggregated) for r in s.rounds] == [(1, 0, False), (1, 1, True)]
    # fewer connected nodes than min_train_nodes: nobody is sampled, the attempt fails at once
    lonely = LoraStrategy(FedIT(), min_train_nodes=2)
    assert list(lonely.configure_train(1, adapter_to_record(_start()), ConfigRecord(), _Nodes(7))) == []
    assert "1 nodes connected, fewer than min_train_nodes=2" in lonely.rounds[-1].failure


@pytest.mark.usefixtures("_task_identity")
def test_sampling_is_seeded_and_independent_of_node_order():
    picks = []
    for ids in ([5, 1, 9, 3, 7], [9, 7, 5, 3, 1]):
        s = LoraStrategy(FedIT(), fraction_train=0.4, min_train_nodes=2, seed=11)
        picks.append(
            [
                [
                    m.metadata.dst_node_id
                    for m in s.configure_train(r, adapter_to_record(_start()), ConfigRecord(), _Nodes(*ids))
                ]
                for r in (1, 2, 3)
            ]
        )
    assert picks[0] == picks[1] and all(len(p) == 2 for p in picks[0])


# --- whole runs in process, with faulty clients ----------------------------------------------------


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return build_config(
        {},
        [
            "name=faults",
            f"output_dir='{root / 'runs'}'",
            f"model.cache_dir='{root / 'cache'}'",
            *TINY_VIT,
            "federation.num_clients=3",
            "federation.rounds=3",
            "federation.min_train_nodes=2",
            "federation.local_steps=2",
            "federation.batch_size=8",
            "federation.device='cpu'",
            "federation.round_retries=1",
        ],
    )


def _crashing_app(crash) -> ClientApp:
    """fairedge's client, except that it raises when `crash(partition, round, call number)` is true."""
    app, calls = ClientApp(), {}

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        part, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        calls[(part, rnd)] = calls.get((part, rnd), 0) + 1
        if crash(part, rnd, calls[(part, rnd)]):
            raise RuntimeError(f"simulated crash of partition {part} in round {rnd}")
        return run_train(msg, context)

    return app


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_a_round_with_too_few_replies_is_retried_and_reported(cfg, tmp_path):
    flaky = _crashing_app(lambda part, rnd, call: rnd == 2 and part > 0 and call == 1)  # 2 of 3 crash once
    record = simulate(cfg, tmp_path / "run", client_app=flaky, engine="inprocess")
    r2 = record.rounds[2]
    assert r2["aggregated"] and r2["retries"] == 1 and not r2["rejected"]
    failed = r2["failed_attempts"][0]
    assert "1 valid updates from 3 sampled nodes" in failed["failure"]
    assert sorted(failed["partitions"][n] for n in failed["rejected"]) == [1, 2]
    assert all("simulated crash" in why for why in failed["rejected"].values())
    assert record.rounds[1]["retries"] == record.rounds[3]["retries"] == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "attempt 1 not aggregated" in report and "simulated crash of partition 2 in round 2" in report
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["summary"]["retries"] == 1 and metrics["summary"]["status"] == "complete"


def test_a_silent_node_is_left_out_and_the_round_completes(cfg, tmp_path):
    class LossyGrid(InProcessGrid):
        """Partition 0's replies never arrive (as after a timeout or a lost connection)."""

        def send_and_receive(self, messages, *, timeout=None):
            return [m for m in super().send_and_receive(messages, timeout=timeout) if m.metadata.src_node_id != 1000]

    from fairedge.client.client_app import app
    from fairedge.server.federation import run_federation

    record = run_federation(LossyGrid(app, 3), cfg, tmp_path / "run")
    for r in record.rounds[1:]:
        assert r["aggregated"] and r["no_reply"] == [1000] and len(r["replied"]) == 2
    assert "left out node 1000: no reply within 600 s" in (tmp_path / "run" / "report.md").read_text()


def test_retries_used_up_stop_the_run_with_a_resumable_checkpoint(cfg, tmp_path):
    reference = simulate(cfg, tmp_path / "reference", engine="inprocess")
    broken = _crashing_app(lambda part, rnd, call: rnd >= 2 and part > 0)  # from round 2 on, 2 of 3 crash
    run_dir = tmp_path / "run"
    with pytest.raises(RoundFailed, match=r"round 2 failed 2 attempts .*resume with: fairedge-sim run --resume"):
        simulate(cfg, run_dir, client_app=broken, engine="inprocess")
    _, state = load_checkpoint(run_dir)
    assert state["round"] == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"]["status"].startswith("round 2 failed 2 attempts")
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert "Run stopped early" in (run_dir / "report.md").read_text()
    # the clients are repaired: resume finishes the run as if nothing had happened
    resumed = simulate(cfg, run_dir, resume=True, engine="inprocess")
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3] and resumed.resumed_after == [1]
    assert resumed.earlier_stops[0].startswith("round 2 failed 2 attempts") and resumed.status == "complete"
    want, got = _adapter(tmp_path / "reference"), _adapter(run_dir)
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert [r["mean_accuracy"] for r in resumed.rounds] == [r["mean_accuracy"] for r in reference.rounds]
