"""Checkpoints: a server killed with SIGKILL mid-run resumes to the uninterrupted result; checkpoint
writes are atomic; every piece of state (RNGs, aggregators, strategy) survives a round trip; a damaged
checkpoint (flipped bit, incomplete state.json) is passed over, never resumed; resume refuses config changes."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fairedge.client.client_app import app as client_app
from fairedge.common.adapter_record import adapter_to_record, flatten
from fairedge.common.aggregation import AGGREGATORS, Adapter, FedIT, RoLoRA, make_aggregator
from fairedge.common.config import ConfigError, build_config, to_toml
from fairedge.server import checkpoint
from fairedge.server.checkpoint import (
    aggregator_state,
    client_state_warning,
    load_checkpoint,
    restore_run_state,
    resume_config,
    rng_state,
    save_checkpoint,
    save_run_state,
    set_aggregator_state,
    set_rng_state,
)
from fairedge.server.run_outputs import RunRecord, write_config
from fairedge.server.server_app import app as server_app
from fairedge.server.strategy import LoraStrategy
from fairedge.simulations import cli
from fairedge.simulations.simulate import InProcessGrid
from tests.tiny_vit import TINY_VIT

ROOT = Path(__file__).parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


def _wait_for(path_glob, root: Path, proc: subprocess.Popen, timeout: float = 240.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} did not appear under {root} within {timeout} s")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its process group; check nothing of it is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_server_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = build_config(
        {},
        [
            "name=killed",
            f"output_dir='{tmp_path / 'runs'}'",
            f"model.cache_dir='{tmp_path / 'cache'}'",
            *TINY_VIT,
            "federation.num_clients=3",
            "federation.rounds=5",
            "federation.local_steps=3",
            "federation.batch_size=8",
            "federation.device='cpu'",
            # FLoRA changes the base weights; compressed-update layouts depend on the adapter's tensor order
            "aggregation.method='flora'",
            "compression.enabled=true",
            "compression.density=0.5",
            "compression.error_feedback=false",  # stateless clients: resume is exact
        ],
    )
    assert client_state_warning(cfg) is None
    config = tmp_path / "tiny.toml"
    config.write_text(to_toml(cfg))
    proc = subprocess.Popen(
        # one thread in every part: the killed process, the resume and the reference compute alike
        [
            sys.executable,
            "-m",
            "fairedge.simulations.cli",
            "run",
            "--engine",
            "inprocess",
            "--threads",
            "1",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for("*/checkpoint/round-0002", tmp_path / "runs", proc)
    finally:
        _kill_group(proc)
    killed = next((tmp_path / "runs").iterdir())
    assert not (killed / "adapter").exists(), "the run finished before it was killed"

    threads = torch.get_num_threads()
    try:
        assert cli.main(["run", "--engine", "inprocess", "--threads", "1", "--resume", str(killed)]) == 0
        reference_dir = f"output_dir='{tmp_path / 'reference'}'"
        run = ["run", "--engine", "inprocess", "--threads", "1", "--config", str(config), "--set", reference_dir]
        assert cli.main(run) == 0
    finally:
        torch.set_num_threads(threads)
    reference = next((tmp_path / "reference").iterdir())
    for name in ("adapter/adapter_model.safetensors", "base_delta.safetensors"):
        assert _max_diff(load_file(str(killed / name)), load_file(str(reference / name))) <= 1e-6

    resumed, want = (json.loads((d / "metrics.json").read_text()) for d in (killed, reference))
    assert [r["round"] for r in resumed["rounds"]] == list(range(6))
    assert [r["mean_accuracy"] for r in resumed["rounds"]] == [r["mean_accuracy"] for r in want["rounds"]]
    assert all(r["aggregated"] and not r["rejected"] for r in resumed["rounds"][1:])
    (after,) = resumed["summary"]["resumed_after_rounds"]
    assert 2 <= after < 5
    assert f"Resumed from its checkpoint after round(s) {after}" in (killed / "report.md").read_text()

    # the config of a resumed run is the run folder's: changes are refused, more rounds are fine
    with pytest.raises(ConfigError, match=r"federation.lr \(0.005 -> 0.1\)"):
        resume_config(killed, ["federation.lr=0.1"])
    assert resume_config(killed, ["federation.rounds=8"]).federation.rounds == 8
    assert cli.main(["run", "--resume", str(killed), "--set", "lora.rank=4"]) == 2
    assert cli.main(["run", "--resume", str(killed), "--config", str(config)]) == 2
    # `flwr run`: the ServerApp takes the run folder from the run config's `resume` key
    server_app(
        InProcessGrid(client_app, 3),
        Context(
            run_id=1,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={"resume": str(killed), "overrides": "federation.rounds=6"},
        ),
    )
    extended = json.loads((killed / "metrics.json").read_text())
    assert [r["round"] for r in extended["rounds"]] == list(range(7))
    assert (
        extended["summary"]["resumed_after_rounds"] == [after, 5]
        and "rounds = 6" in (killed / "config.toml").read_text()
    )


_WRITER = textwrap.dedent("""
    import sys, torch
    from fairedge.server.checkpoint import save_checkpoint
    for r in range(1, 10_000):
        save_checkpoint(sys.argv[1], r, {"lora/l/A": torch.full((1000, 1000), float(r))}, {"note": "x" * 100_000})
""")


@pytest.mark.slow
def test_sigkill_while_writing_checkpoints_leaves_a_complete_one(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        cwd=ROOT,
        env=_env(tmp_path),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for("checkpoint/round-0003", tmp_path, proc, timeout=120)
        time.sleep(random.uniform(0.0, 0.3))  # somewhere inside a later write
    finally:
        _kill_group(proc)
    tensors, state = load_checkpoint(tmp_path)
    assert state["round"] >= 3 and state["note"] == "x" * 100_000
    assert torch.equal(tensors["lora/l/A"], torch.full((1000, 1000), float(state["round"])))
    # two are kept; a kill between the rename and the pruning of the oldest leaves one more until the next write
    assert len(list((tmp_path / "checkpoint").glob("round-*"))) <= 3


def test_a_failed_write_leaves_the_previous_checkpoint_and_a_torn_one_falls_back(tmp_path, monkeypatch):
    one = {"lora/l/A": torch.ones(2, 3)}
    save_checkpoint(tmp_path, 1, one, {"x": 1})
    real_write = checkpoint.atomic_write_bytes

    def disk_full_at_state(path: Path, data: bytes) -> None:
        if path.name == "state.json":
            path.write_bytes(data[: len(data) // 2])
            raise OSError("No space left on device (simulated)")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full_at_state)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"lora/l/A": torch.full((2, 3), 2.0)}, {"x": 2})
    tensors, state = load_checkpoint(tmp_path)
    assert state == {"round": 1, "x": 1} and torch.equal(tensors["lora/l/A"], one["lora/l/A"])
    monkeypatch.undo()

    save_checkpoint(tmp_path, 2, {"lora/l/A": torch.full((2, 3), 2.0)}, {"x": 2})
    assert load_checkpoint(tmp_path)[1]["round"] == 2
    assert not list((tmp_path / "checkpoint").glob(".*.tmp"))  # the leftover of the failed write is gone
    (tmp_path / "checkpoint" / "round-0002" / "tensors.safetensors").write_bytes(b"torn")
    assert load_checkpoint(tmp_path)[1]["round"] == 1  # the newest is unreadable: the one before it
    for r in (3, 4):
        save_checkpoint(tmp_path, r, one, {})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["round-0003", "round-0004"]
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_rng_aggregator_and_strategy_state_survive_a_round_trip(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Messages need a run id outside a running Flower app
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state, torch_state = rng_state()
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(json.loads(json.dumps(state)), torch_state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])

    class Memo(FedIT):
        def state_dict(self):
            return {"seen": {1, 2}}

    with pytest.raises(TypeError, match=r"Memo.state_dict\(\)\['seen'\] of type set"):
        aggregator_state(Memo())

    class Nodes:
        def get_node_ids(self):
            return list(range(10))

    start = adapter_to_record(Adapter({"q": (torch.zeros(2, 4), torch.zeros(4, 2))}))
    a, b = (LoraStrategy(FedIT(), fraction_train=0.3, seed=5) for _ in range(2))
    a.configure_train(1, start, ConfigRecord(), Nodes())
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.rounds == a.rounds
    picks = [[m.metadata.dst_node_id for m in s.configure_train(2, start, ConfigRecord(), Nodes())] for s in (a, b)]
    assert picks[0] == picks[1]


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_every_aggregators_state_survives_a_round_trip_through_the_checkpoint(method, tmp_path):
    """`state_dict` / `load_state_dict` through the checkpoint's files; RoLoRA, the one rule with state,
    in both of its phases."""
    for server_round in (1, 2):
        agg = make_aggregator(method, lora_scale=2.0)
        agg.client_config(server_round)
        values, tensors = aggregator_state(agg)
        save_checkpoint(tmp_path, server_round, tensors, {"values": values})
        tensors, state = load_checkpoint(tmp_path)
        fresh = make_aggregator(method, lora_scale=2.0)
        set_aggregator_state(fresh, state["values"], tensors)
        assert fresh.state_dict() == agg.state_dict()
    if method == "rolora":
        assert fresh.state_dict() == {"training": "A"}
        with pytest.raises(ValueError, match="RoLoRA state must be"):
            fresh.load_state_dict({"training": "C"})
    else:
        assert agg.state_dict() == {}
        with pytest.raises(ValueError, match=f"aggregation '{method}' keeps no state, got keys \\['training'\\]"):
            fresh.load_state_dict({"training": "A"})


# --- damaged checkpoints --------------------------------------------------------------------------


def _adapter(fill: float) -> Adapter:
    return Adapter({"q": (torch.full((2, 4), fill), torch.full((4, 2), fill))}, {"head.w": torch.full((3, 4), fill)})


def _save_run(run_dir: Path, cfg, server_round: int) -> None:
    """A run's checkpoint of round `server_round`, its global adapter all `server_round`."""
    strategy = LoraStrategy(RoLoRA())
    strategy.aggregator.client_config(server_round)
    record = RunRecord(cfg=cfg, run_dir=run_dir, domains=["a"], shifted_domains=[], rounds=[{"round": server_round}])
    save_run_state(run_dir, server_round, strategy, _adapter(float(server_round)), record, 1.0)


def _restore(run_dir: Path, cfg) -> tuple[int, Adapter, LoraStrategy]:
    strategy = LoraStrategy(RoLoRA())
    record = RunRecord(cfg=cfg, run_dir=run_dir, domains=["a"], shifted_domains=[])
    server_round, adapter = restore_run_state(run_dir, cfg, strategy, record, like=_adapter(0.0))
    assert record.rounds == [{"round": server_round}]
    return server_round, adapter, strategy


def test_a_flipped_bit_in_the_tensors_falls_back_to_the_previous_checkpoint_or_stops(tmp_path, caplog):
    cfg = build_config({}, [])
    for r in (1, 2):
        _save_run(tmp_path, cfg, r)
    for r in (2, 1):  # one flipped bit in the middle of the newest round's tensors file, then the other's
        path = tmp_path / "checkpoint" / f"round-{r:04d}" / "tensors.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        if r == 1:
            break
        with caplog.at_level("WARNING", logger="fairedge.server"):
            server_round, adapter, strategy = _restore(tmp_path, cfg)
        assert server_round == 1 and strategy.aggregator.state_dict() == {"training": "B"}
        assert all(torch.equal(t, torch.full_like(t, 1.0)) for t in flatten(adapter).values())
        assert "round-0002 is unreadable (ValueError: tensors.safetensors has sha256" in caplog.text
        assert "resuming from round-0001" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint.*round-0002: .*round-0001: .*sha256"):
        _restore(tmp_path, cfg)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["record"].pop("wall_seconds"),
        lambda s: s["strategy"].pop("sampler"),
        lambda s: s["strategy"]["rounds"][0].update(no_such_field=1),
        lambda s: s.pop("adapter_keys"),
        lambda s: s.update(schema=0),
    ],
    ids=["record", "strategy-sampler", "round-log", "adapter-keys", "schema"],
)
def test_an_incomplete_state_json_falls_back_to_the_previous_checkpoint(tmp_path, caplog, damage):
    cfg = build_config({}, [])
    for r in (1, 2):
        _save_run(tmp_path, cfg, r)
    path = tmp_path / "checkpoint" / "round-0002" / "state.json"
    state = json.loads(path.read_text())
    state["strategy"]["rounds"] = [{"round": 2}]
    damage(state)
    path.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="fairedge.server"):
        server_round, adapter, _ = _restore(tmp_path, cfg)
    assert server_round == 1 and "round-0002 is unreadable" in caplog.text
    assert float(flatten(adapter)["lora/q/A"][0, 0]) == 1.0
    write_config(tmp_path, cfg)
    assert resume_config(tmp_path, []).federation.rounds == cfg.federation.rounds  # reads round 1 quietly


def test_a_checkpoint_of_another_config_is_refused_not_passed_over(tmp_path):
    _save_run(tmp_path, build_config({}, []), 1)
    with pytest.raises(checkpoint.CheckpointError, match="written under another config"):
        _restore(tmp_path, build_config({}, ["federation.lr=0.1"]))


def test_resume_config_needs_a_run_folder_and_warns_about_client_state(tmp_path):
    with pytest.raises(ConfigError, match="no config.toml"):
        resume_config(tmp_path)
    cfg = build_config({}, ["federation.rounds=4"])
    write_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_config(tmp_path)
    save_checkpoint(tmp_path, 3, {}, {})
    with pytest.raises(ConfigError, match="no readable checkpoint.*round-0003: ValidationError"):
        resume_config(tmp_path)
    _save_run(tmp_path, cfg, 3)
    with pytest.raises(ConfigError, match="federation.rounds=2 is below the checkpoint's round 3"):
        resume_config(tmp_path, ["federation.rounds=2"])
    assert resume_config(tmp_path, ["federation.round_retries=5"]).federation.round_retries == 5
    assert client_state_warning(cfg) is None
    assert "error-feedback residuals" in client_state_warning(build_config({}, ["compression.enabled=true"]))
    assert "personal B" in client_state_warning(build_config({}, ["aggregation.method='fedsa_lora'"]))


def test_resumable_hash_ignores_defaults_and_resumable_fields() -> None:
    """A release that adds a setting with a default must still resume an older release's checkpoints."""
    base = build_config({})
    assert checkpoint.resumable_hash(base) == checkpoint.resumable_hash(build_config({"model": {"image_size": 112}}))
    assert checkpoint.resumable_hash(base) == checkpoint.resumable_hash(build_config({"federation": {"rounds": 99}}))
    assert checkpoint.resumable_hash(base) != checkpoint.resumable_hash(build_config({"federation": {"lr": 0.5}}))
