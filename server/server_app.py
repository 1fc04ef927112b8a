"""The Flower ServerApp, for `flwr run .` and deployments.

Reads `config-file` and `overrides` (`"section.field=value; ..."`) from the
Flower run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`) and runs `server.federation.run_federation`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from server.federation import run_federation
from server.run_outputs import new_run_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated LoRA fine-tuning job as configured."""
    path = str(context.run_config.get("config-file", "")) or None
    overrides = [o.strip() for o in str(context.run_config.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(path, overrides)
    run_federation(grid, cfg, new_run_dir(cfg))
