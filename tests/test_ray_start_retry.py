"""A simulation whose Ray runtime times out while starting (a busy machine) is started once more, from the run's
checkpoint; any other failure is raised at once."""

from __future__ import annotations

import flwr.simulation
import pytest

from fairedge.common.config import build_config
from fairedge.simulations import simulate as simulate_module
from fairedge.simulations.simulate import ray_start_failure, simulate


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
