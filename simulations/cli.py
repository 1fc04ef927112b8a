"""`fairedge-sim`: run federated simulations and write their reports."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fairedge.common.config import ConfigError, config_hash, load_config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "shakespeare.toml"
console = Console()


def _row(r: dict[str, Any]) -> str:
    """One line per round: causal LMs show held-out perplexity, classifiers accuracy (mean, worst, shifted)."""
    if "mean_perplexity" in r:
        scores = (
            f"ppl mean {r['mean_perplexity']:.2f}  worst {r['worst_perplexity']:.2f}  next-token acc "
            f"{r['mean_accuracy']:.4f}"
        )
    else:
        scores = f"mean acc {r['mean_accuracy']:.4f}  worst {r['worst_accuracy']:.4f}  shifted {r['shifted_mean_accuracy']:.4f}"
    if r["round"] == 0:
        return f"round  0 (base)                 {scores}"
    loss = r.get("train_loss")
    left_out = len(r.get("rejected", {})) + len(r.get("no_reply", []))
    ratio = f" ({r['uplink_ratio_vs_fp32']:.3g}x < fp32)" if r.get("uplink_ratio_vs_fp32") else ""
    return (
        f"round {r['round']:2d}  loss {loss if loss is not None else float('nan'):.4f}  {scores}  "
        f"up {r.get('bytes_up', 0) / 1e6:.3f} MB{ratio}  down {r.get('bytes_down', 0) / 1e6:.2f} MB  {r['seconds']:.1f}s"
        + (f"  personal {r['personal_mean_accuracy']:.4f}" if "personal_mean_accuracy" in r else "")
        + (f"  [red]{left_out} left out[/red]" if left_out else "")
        + (f"  [yellow]{r['retries']} retries[/yellow]" if r.get("retries") else "")
    )


def _summary(s: dict[str, Any], samples: list[dict[str, str]], run_dir: Path) -> str:
    """The closing lines: base -> final, bytes, one sample generation, where the outputs are."""
    if "base_mean_perplexity" in s:
        line = (
            f"held-out perplexity {s['base_mean_perplexity']:.2f} (base) -> {s['final_mean_perplexity']:.2f} "
            f"(final), {100 * s['perplexity_change']:+.1f} %; worst client {s['base_worst_perplexity']:.2f} -> "
            f"{s['final_worst_perplexity']:.2f}"
        )
        files = "config.toml, metrics.json, report.md, perplexity.png, adapter/"
    else:
        line = (
            f"shifted-domain accuracy {s['base_shifted_mean_accuracy']:.4f} (base) -> "
            f"{s['final_shifted_mean_accuracy']:.4f} (final); mean {s['base_mean_accuracy']:.4f} -> "
            f"{s['final_mean_accuracy']:.4f}"
        )
        files = "config.toml, metrics.json, report.md, accuracy.png, adapter/"
    ratio = f" ({s['uplink_ratio_vs_fp32']:.3g}x fewer than fp32)" if s.get("uplink_ratio_vs_fp32") else ""
    out = [f"done in {s['wall_seconds']:.1f} s: {line}", f"uplink {s['bytes_up'] / 1e6:.3f} MB{ratio}"]
    if samples:
        out += [
            f"sample, prompt {samples[0]['prompt']!r}:",
            f"  base:  {samples[0]['base']!r}",
            f"  final: {samples[0]['final']!r}",
        ]
    return "\n".join([*out, f"outputs: {run_dir}/ ({files})"])


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
    from fairedge.server.checkpoint import resume_config
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
    console.print(_summary(record.summary(), record.samples, run_dir), highlight=False, markup=False)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy replies of a finished causal-LM run's global model (or its base, `--base`) to prompts."""
    set_threads(args.threads)
    from transformers import AutoTokenizer

    from fairedge.common.data.lm_task import prompt_input
    from fairedge.common.models.causal_lm import generate_greedy
    from fairedge.common.run_model import load_run_model
    from fairedge.common.task import base_model, causal_lm_dir

    run_dir = Path(args.run)
    try:
        cfg = load_config(run_dir / "config.toml")
    except (ConfigError, FileNotFoundError) as err:
        console.print(f"[red]{run_dir}: {err}[/red]")
        return 2
    if cfg.model.kind != "hf-causal-lm":
        console.print(f"[red]{run_dir} tuned model.kind={cfg.model.kind!r}; generate needs a causal LM run[/red]")
        return 2
    model = base_model(cfg) if args.base else load_run_model(run_dir)[1]
    tokenizer = AutoTokenizer.from_pretrained(causal_lm_dir(cfg), local_files_only=True)
    as_chat = args.chat or cfg.data.task == "chat"
    for prompt in args.prompt:
        given = prompt_input("chat" if as_chat else "plain", prompt)
        reply = generate_greedy(model, tokenizer, given, max_new_tokens=args.max_new_tokens)
        console.print(f"[bold]> {prompt}[/bold]", highlight=False)
        console.print(reply, highlight=False, markup=False)
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
    gen = sub.add_parser("generate", help="greedy replies of a finished causal-LM run's model to prompts")
    gen.add_argument("run", metavar="RUN_DIR", help="a finished run folder (config.toml, adapter/)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user turn through the chat template "
        "(the default for chat runs; Shakespeare runs continue plain text)",
    )
    gen.add_argument("--base", action="store_true", help="the base model, without the run's adapter (to compare)")
    gen.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    gen.set_defaults(func=cmd_generate)
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load weight bars would drown the per-round lines
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
