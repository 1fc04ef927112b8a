"""Run one federated job on Flower's simulation engine (Ray), in this process.

`simulate(cfg)` builds a ServerApp around `server.federation.run_federation`
and hands it, with fairedge's ClientApp, to `flwr.simulation.run_simulation`:
one virtual SuperNode per client, each with the configured CPU/GPU share.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from common.config import RunConfig


def flower_environment() -> None:
    """Keep Flower out of the user's home, quiet, and from installing packages."""
    os.environ.setdefault("FLWR_HOME", str(Path(tempfile.gettempdir()) / "fairedge-flwr-home"))
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(cfg: RunConfig, run_dir: Path, *, on_round=None, client_app=None, verbose: bool = False):
    """Run the federation described by `cfg`; return its `RunRecord` (outputs in `run_dir`)."""
    flower_environment()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as default_client_app
    from server.federation import run_federation

    records = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        records.append(run_federation(grid, cfg, run_dir, on_round=on_round))

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app,
        client_app=client_app or default_client_app,
        num_supernodes=cfg.federation.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
            "init_args": {"log_to_driver": verbose, "logging_level": "WARNING" if not verbose else "INFO"},
        },
        verbose_logging=verbose,
    )
    if not records:
        raise RuntimeError(f"the simulation ended without a result; see the log above (run folder {run_dir})")
    return records[0]
