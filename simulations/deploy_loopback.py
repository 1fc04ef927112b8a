"""A real Flower deployment on this machine: one SuperLink, N SuperNodes, TLS and node authentication.

What `python -m fairedge.simulations.deploy_loopback` (or `fairedge-sim deploy`) does, top to bottom:

1. a deployment folder `runs/deploy-<timestamp>/` with a local CA, the SuperLink's TLS
   certificate and one authentication key pair per SuperNode (`fairedge.common.certificates`);
2. `FLWR_HOME` inside it, whose `config.toml` names the connection `fairedge-loopback`
   (address + CA certificate: Flower 1.41 keeps connections there, not in pyproject.toml);
3. `flower-superlink` with `--ssl-*` and `--enable-supernode-auth`;
4. `flwr supernode register <node-i.pub> fairedge-loopback` for every node;
5. N `flower-supernode`s, each with its own port, FLWR_HOME, private key and node config
   `partition-id=i num-partitions=N` (or `data-path=...`);
6. `flwr run . fairedge-loopback --stream --run-config <file>` (the ServerApp reads
   `config-file` and `overrides`), until the run ends; the run folder is written inside the
   deployment folder;
7. every process it started is stopped, also on errors and Ctrl-C (each runs in its own
   process group; Flower's SuperExec and app processes are found as descendants).

Logs of every process are in `<deployment>/logs/`. POSIX only (process groups).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fairedge.simulations.loopback_deployment import DEFAULT_CONFIG, PROJECT_ROOT, LoopbackDeployment, round_line
from fairedge.simulations.loopback_processes import DeploymentError, Log


def deploy(
    num_nodes: int,
    config_file: Path = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    *,
    folder: Path | None = None,
    data_paths: Sequence[str] = (),
    timeout: float = 3600,
    log: Log = print,
) -> Path:
    """The whole loopback deployment, start to stop; the run folder."""
    folder = folder or PROJECT_ROOT / "runs" / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    with LoopbackDeployment(Path(folder), num_nodes, data_paths=data_paths, log=log) as deployment:
        log(f"deployment folder {deployment.folder} (FLWR_HOME {deployment.flwr_home}, logs in logs/)")
        deployment.start()
        return deployment.run(config_file, [f"federation.num_clients={num_nodes}", *overrides], timeout=timeout)


def summary(run_dir: Path) -> str:
    """Base and final accuracy and participation, from the run's metrics.json."""
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    base, final = rounds[0], rounds[-1]
    return "\n".join(
        [
            *(round_line(r) for r in rounds[1:]),
            f"mean accuracy {base['mean_accuracy']:.4f} (base) -> "
            f"{final['mean_accuracy']:.4f} (final); outputs in {run_dir}",
        ]
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m fairedge.simulations.deploy_loopback",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (default: %(default)s)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML config (default: %(default)s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config value (repeatable); federation.num_clients is set to --nodes",
    )
    parser.add_argument(
        "--data-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a node's own data (node config data-path); give it once per node, in order",
    )
    parser.add_argument("--folder", default=None, help="deployment folder (default: runs/deploy-<timestamp>)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the run may take (default: %(default)s)")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Deploy, run, stop; exit code 0 when the run finished and wrote its folder."""
    from fairedge.common.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [*args.set, f"federation.num_clients={args.nodes}"])  # fail early
        if args.data_path and cfg.data.task not in ("text", "chat"):
            raise ConfigError(
                f"--data-path needs data.task 'text' or 'chat' (got {cfg.data.task!r}; the built-in ViT is "
                "pre-trained on the run's data): leave --data-path out to split the run's data over the nodes"
            )
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        run_dir = deploy(
            args.nodes,
            Path(args.config),
            args.set,
            data_paths=args.data_path,
            folder=Path(args.folder) if args.folder else None,
            timeout=args.timeout,
            log=lambda m: print(f"[deploy] {m}", flush=True),
        )
    except (DeploymentError, ValueError) as err:
        print(f"[deploy] failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[deploy] interrupted; every process was stopped", file=sys.stderr)
        return 130
    print(summary(run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
