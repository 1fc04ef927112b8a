"""`fairedge-sim`: run federated simulations and write their reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fairedge.common.config import ConfigError, config_hash, load_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"
console = Console()


def _row(r: dict[str, Any]) -> str:
    if r["round"] == 0:
        return (
            f"round  0 (base)                 mean acc {r['mean_accuracy']:.4f}  "
            f"worst {r['worst_accuracy']:.4f}  shifted {r['shifted_mean_accuracy']:.4f}"
        )
    loss = r.get("train_loss")
    left_out = len(r.get("rejected", {})) + len(r.get("no_reply", []))
    return (
        f"round {r['round']:2d}  loss {loss if loss is not None else float('nan'):.4f}  "
        f"mean acc {r['mean_accuracy']:.4f}  worst {r['worst_accuracy']:.4f}  "
        f"shifted {r['shifted_mean_accuracy']:.4f}  up {r.get('bytes_up', 0) / 1e6:.2f} MB  "
        f"down {r.get('bytes_down', 0) / 1e6:.2f} MB  {r['seconds']:.1f}s"
        + (f"  personal {r['personal_mean_accuracy']:.4f}" if "personal_mean_accuracy" in r else "")
        + (f"  [red]{left_out} left out[/red]" if left_out else "")
        + (f"  [yellow]{r['retries']} retries[/yellow]" if r.get("retries") else "")
    )


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count for this whole process, once, at the entry point (None: torch's default).

    Library code (the ClientApp included) never changes it: with `--engine inprocess` the
    clients share this process, and so this setting, with the server.
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def cmd_run(args: argparse.Namespace) -> int:
    """Validate the config, run the simulation with a live display, print where outputs went.

    With `--resume DIR` the config is the one in DIR (plus `--set` overrides that
    only extend it: see `fairedge.server.checkpoint.RESUMABLE_CHANGES`) and the run continues there.
    """
    set_threads(args.threads)
    from fairedge.server.checkpoint import client_state_warning, resume_config
    from fairedge.server.federation import RoundFailed
    from fairedge.server.run_outputs import new_run_dir
    from fairedge.simulations.simulate import simulate

    try:
        if args.resume and args.config:
            raise ConfigError("--resume takes the config from the run folder; leave out --config")
        cfg = (
            resume_config(args.resume, args.set)
            if args.resume
            else load_config(args.config or DEFAULT_CONFIG, args.set)
        )
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    run_dir = Path(args.resume) if args.resume else new_run_dir(cfg)
    action = "resuming" if args.resume else "run"
    console.print(f"fairedge-sim {action}: config [bold]{cfg.name}[/bold] (hash {config_hash(cfg)}) -> {run_dir}")
    if args.resume and (why := client_state_warning(cfg)):
        console.print(f"[yellow]warning: {why}[/yellow]")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("pre-training base model / starting Flower", total=cfg.federation.rounds)

        def on_round(row: dict[str, Any]) -> None:
            progress.console.print(_row(row))
            progress.update(task, completed=row["round"], description="federated rounds")

        try:
            record = simulate(
                cfg, run_dir, on_round=on_round, verbose=args.verbose, resume=bool(args.resume), engine=args.engine
            )
        except RoundFailed as err:
            console.print(f"[red]run stopped: {err}[/red]")
            return 1
    s = record.summary()
    console.print(
        f"done in {s['wall_seconds']:.1f} s: shifted-domain accuracy {s['base_shifted_mean_accuracy']:.4f} (base) -> "
        f"{s['final_shifted_mean_accuracy']:.4f} (final); mean {s['base_mean_accuracy']:.4f} -> "
        f"{s['final_mean_accuracy']:.4f}\noutputs: {run_dir}/ (config.toml, metrics.json, report.md, accuracy.png, adapter/)"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairedge-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated simulation (Flower simulation engine)")
    run.add_argument("--config", default=None, help=f"TOML config (default: {DEFAULT_CONFIG})")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config value, e.g. --set federation.rounds=5 (repeatable)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR after its last complete round (its config.toml; "
        "--set may only extend federation.rounds, round_timeout, round_retries)",
    )
    run.add_argument(
        "--engine",
        choices=["ray", "inprocess"],
        default="ray",
        help="ray: Flower's simulation engine (default); inprocess: clients called one after "
        "another in this process, no Ray (same results, quicker start)",
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads of this process: the server, and with --engine inprocess the clients too "
        "(default: torch's, one per core). With --engine ray each client process gets "
        "floor(federation.client_cpus) threads from Ray",
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    run.set_defaults(func=cmd_run)
    from fairedge.simulations import deploy_loopback

    deploy = sub.add_parser(
        "deploy",
        help="run one job on a real Flower deployment on this machine: a SuperLink "
        "and N SuperNodes with TLS and node authentication (simulations/deploy_loopback.py)",
    )
    deploy_loopback.build_parser(deploy)
    deploy.set_defaults(func=deploy_loopback.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
