"""The Flower ServerApp, for `flwr run .` and deployments.

Reads from the Flower run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`):
- `config-file` and `overrides` (`"section.field=value; ..."`): the run's config;
- `resume` (a run folder, empty by default): continue that run after its last
  complete checkpoint instead (its own `config.toml`; `overrides` may then only
  change `fairedge.server.checkpoint.RESUMABLE_CHANGES`, e.g. extend `federation.rounds`).
Then runs `fairedge.server.federation.run_federation`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fairedge.common.config import load_config
from fairedge.server.checkpoint import resume_config
from fairedge.server.federation import run_federation
from fairedge.server.run_outputs import new_run_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) one federated LoRA fine-tuning job as configured."""
    overrides = [o.strip() for o in str(context.run_config.get("overrides", "")).split(";") if o.strip()]
    resume = str(context.run_config.get("resume", "")).strip()
    if resume:
        cfg = resume_config(resume, overrides)  # run_federation warns about client state it cannot restore
        run_federation(grid, cfg, Path(resume), resume=True)
        return
    path = str(context.run_config.get("config-file", "")) or None
    cfg = load_config(path, overrides)
    run_federation(grid, cfg, new_run_dir(cfg))
