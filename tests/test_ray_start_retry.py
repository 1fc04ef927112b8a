"""A simulation whose Ray runtime times out while starting (a busy machine) is started once more, from the run's
checkpoint; any other failure is raised at once."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import flwr.simulation
import pytest

from fairedge.common.config import build_config
from fairedge.simulations import simulate as simulate_module
from fairedge.simulations.simulate import AttemptGrid, SimulationAbandoned, ray_start_failure, simulate


def _chained(message: str) -> RuntimeError:
    """The error Flower's `run_simulation` raises when its backend failed with `message` (cause chain kept)."""
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as backend:
            raise RuntimeError("Simulation Runtime crashed.") from backend
    except RuntimeError as crashed:
        try:
            raise RuntimeError("An error was encountered. Ending simulation.") from crashed
        except RuntimeError as err:
            return err


def test_ray_start_failure_finds_a_start_up_timeout_anywhere_in_the_chain():
    err = _chained("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc")
    assert ray_start_failure(err) == "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_abc"
    assert ray_start_failure(_chained("The current node timed out during startup. This could ...")) is not None
    assert ray_start_failure(_chained("simulated client crash")) is None


@pytest.mark.parametrize("message, calls", [("Timed out waiting for file gcs_server_port", 2), ("boom", 1)])
def test_only_a_ray_start_up_timeout_is_retried_and_only_once(monkeypatch, tmp_path, message, calls):
    made = []

    def failing_run_simulation(**kwargs):
        made.append(kwargs["server_app"])
        raise _chained(message)

    monkeypatch.setattr(flwr.simulation, "run_simulation", failing_run_simulation)
    monkeypatch.setattr(simulate_module, "_shutdown_ray", lambda: None)
    with pytest.raises(RuntimeError, match="An error was encountered"):
        simulate(build_config({}), tmp_path / "run")
    assert len(made) == calls  # a start-up timeout twice in a row is raised, not retried forever


class _SilentGrid:
    """A grid whose clients answer after `answer_after` polls (never, if None)."""

    def __init__(self, answer_after: int | None) -> None:
        self.answer_after, self.polls = answer_after, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.polls += 1
        if self.answer_after is None or self.polls < self.answer_after:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]

    def get_node_ids(self):
        return [1000, 1001]


def test_a_server_thread_left_behind_by_a_failed_start_stops_instead_of_waiting_for_its_round_timeout(monkeypatch):
    monkeypatch.setattr(AttemptGrid, "POLL_S", 0.01)
    stop, outcome = threading.Event(), []
    grid = AttemptGrid(_SilentGrid(answer_after=None), stop)  # type: ignore[arg-type]

    def server_thread():
        try:
            grid.send_and_receive([object(), object()], timeout=600)
        except SimulationAbandoned as err:
            outcome.append(err)

    thread = threading.Thread(target=server_thread)
    thread.start()
    time.sleep(0.05)
    assert thread.is_alive()  # still waiting for replies
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and len(outcome) == 1
    assert grid.get_node_ids() == [1000, 1001]  # everything else is Flower's grid's


def test_the_attempt_grid_collects_every_reply_or_stops_at_the_timeout(monkeypatch):
    monkeypatch.setattr(AttemptGrid, "POLL_S", 0.01)
    replies = AttemptGrid(_SilentGrid(answer_after=3), threading.Event()).send_and_receive([1, 2], timeout=5)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    started = time.monotonic()
    assert AttemptGrid(_SilentGrid(answer_after=None), threading.Event()).send_and_receive([1], timeout=0.1) == []  # type: ignore[arg-type]
    assert 0.1 <= time.monotonic() - started < 1.0
