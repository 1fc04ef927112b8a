"""What the causal-LM studies share: their Shakespeare roles, their cheaper mode, their budget and command line.

`lm_aggregation_study` and `lm_compression_study` fine-tune SmolLM2-135M-Instruct on the same federated
Shakespeare roles with the same local training, so their numbers can be read side by side. The roles are
drawn once with a fixed seed (not the run's seed) among the roles with at least `MIN_LINES` lines, so every
seed and every session federates the same clients.

The cheaper study mode, used by every run of both studies (the centralised reference too), is
`lora.top_layers`: LoRA on the q, k, v, o projections of the top N of SmolLM2's 30 blocks only. The blocks
below have no trainable parameter, so backward stops at the lowest adapted block.

A study's runs are rows of its JSON, keyed by config hash (`fairedge.simulations.sweep`): a stopped study
resumes where it stopped, and `--quick` runs (another config, so other hashes) never mix with the study's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairedge.common.config import RunConfig, config_hash, load_config
from fairedge.common.data.lm_task import choose_clients
from fairedge.common.data.shakespeare import load_shakespeare
from fairedge.server.run_outputs import RunRecord, new_run_dir
from fairedge.simulations.paths import RESULTS, ROOT, display
from fairedge.simulations.sweep import load_rows, sweep_config

LM_CONFIG = ROOT / "simulations" / "configs" / "shakespeare.toml"
MIN_LINES = 200
"""roles with at least this many lines are eligible (161 of the 1 359 roles)."""
ROLE_SEED = 2024
"""the seed of the one draw of the studies' roles (fixed: the run seeds vary the training, not the clients)."""
QUICK_RESULTS = Path(tempfile.gettempdir()) / "fairedge-lm-studies-quick"
"""where `--quick` writes unless `--out` says otherwise: never the committed results."""

# Throughput assumed by the estimate (wall-clock on 2 uncontended CPU cores, fp32, top_layers 8, sequence 64,
# batch 4): a smoke measured ~250 training tokens/s and ~200 evaluated tokens/s uncontended and 45 / 30 with the
# other core busy; the estimate takes a cautious 100 / 100.
TRAIN_TOKENS_PER_S = 100.0
EVAL_TOKENS_PER_S = 100.0
CLIENT_ROUND_OVERHEAD_S = 2.0
"""a client's message: load the task (parse its plays, tokenize) and a fresh model, serialise its update."""
RUN_OVERHEAD_S = 30.0
"""a run: the process's first-step warm-up (~10 s), the server's model, greedy replies, the run folder."""
CORES = 2


@dataclass(frozen=True)
class Setting:
    """The local training and evaluation every run of a study shares (and how many roles it federates)."""

    num_roles: int
    rounds: int
    local_steps: int
    batch_size: int
    seq_len: int
    eval_tokens: int
    """held-out tokens scored per client and round (its first ones; the same tokens for every method)."""
    reply_tokens: int
    top_layers: int
    rank: int = 16
    alpha: int = 32
    lr: float = 0.004
    seeds: tuple[int, ...] = (0, 1, 2)

    def overrides(self, roles: Sequence[str]) -> list[str]:
        """The `--set` overrides of every run: everything the results depend on is pinned here, not left to
        the demo config (which may be retuned) — a changed value changes the hashes, so rows never mix."""
        n = len(roles)
        return [
            f"data.clients={json.dumps(list(roles))}",
            f"data.min_lines={MIN_LINES}",
            f"data.seq_len={self.seq_len}",
            f"data.max_eval_tokens={self.eval_tokens}",
            f"data.reply_tokens={self.reply_tokens}",
            f"lora.rank={self.rank}",
            f"lora.alpha={self.alpha}",
            f"lora.top_layers={self.top_layers}",
            f"federation.num_clients={n}",
            f"federation.min_train_nodes={n}",  # every client in every round: a failed client fails the run
            "federation.fraction_train=1.0",
            f"federation.rounds={self.rounds}",
            f"federation.local_steps={self.local_steps}",
            f"federation.batch_size={self.batch_size}",
            f"federation.lr={self.lr}",
        ]

    def run_tokens(self) -> int:
        """Training tokens of one run (all clients and rounds; the centralised reference trains as many)."""
        return self.rounds * self.num_roles * self.local_steps * self.batch_size * self.seq_len

    def run_seconds(self) -> float:
        """Estimated wall-clock seconds of one run (federated or centralised: the same optimizer steps)."""
        client_rounds = self.rounds * self.num_roles
        train = self.run_tokens() / TRAIN_TOKENS_PER_S
        evaluation = (self.rounds + 1) * self.num_roles * self.eval_tokens / EVAL_TOKENS_PER_S
        return train + evaluation + client_rounds * CLIENT_ROUND_OVERHEAD_S + RUN_OVERHEAD_S


FULL = Setting(
    num_roles=8, rounds=5, local_steps=8, batch_size=4, seq_len=64, eval_tokens=256, reply_tokens=16, top_layers=8
)
"""The studies: 8 roles, 5 rounds of 8 local steps of 4 × 64 tokens (81 920 training tokens per run)."""
QUICK = Setting(
    num_roles=2, rounds=1, local_steps=2, batch_size=2, seq_len=32, eval_tokens=32, reply_tokens=2, top_layers=2,
    seeds=(0,),
)  # fmt: skip
"""A smoke of the whole pipeline (a few minutes on 2 cores), not a result. Two local steps, not one: after a
single step from B = 0 every client still has the initial A, so LoRA-FAIR's correction would be exactly zero."""


def pick_roles(count: int, seed: int = ROLE_SEED) -> list[str]:
    """`count` Shakespeare roles with at least `MIN_LINES` lines, drawn with `seed` (in id order)."""
    roles = load_shakespeare(min_lines=MIN_LINES)
    return choose_clients(list(roles), None, count, seed, "Shakespeare roles")


def role_table(roles: Sequence[str]) -> str:
    """Markdown: each role with its train and held-out line counts (LEAF's split by position)."""
    parsed = load_shakespeare(min_lines=MIN_LINES, plays={r.split("/", 1)[0] for r in roles})
    lines = ["| client | play | role | train lines | held-out lines |", "|---|---|---|---|---|"]
    for i, r in enumerate(roles):
        p = parsed[r]
        lines.append(f"| {i} | {p.play} | {p.role} | {len(p.train)} | {len(p.test)} |")
    return "\n".join(lines)


def simulate_inprocess(cfg: RunConfig) -> RunRecord:
    """A federated run of `cfg` with the in-process engine (clients one after another: one model in memory at a
    time, no Ray start-up), in a fresh run folder; prints its perplexity."""
    from fairedge.simulations.simulate import simulate

    record = simulate(cfg, new_run_dir(cfg), engine="inprocess")
    print_perplexity(cfg, record)
    return record


def print_perplexity(cfg: RunConfig, record: RunRecord) -> None:
    s = record.summary()
    print(
        f"  {cfg.name} seed {cfg.seed}: mean perplexity {s['base_mean_perplexity']:.2f} -> "
        f"{s['final_mean_perplexity']:.2f}, worst client {s['final_worst_perplexity']:.2f} "
        f"({record.wall_seconds:.0f} s)",
        flush=True,
    )


def select(
    rows: Sequence[dict[str, Any]],
    config: str | Path,
    label: str,
    overrides: Sequence[str],
    seeds: Sequence[int],
    common: Sequence[str],
) -> list[dict[str, Any]]:
    """The rows of one variant that this invocation would run (same config hash), by seed."""
    want = {s: config_hash(sweep_config(config, label, overrides, s, common)) for s in seeds}
    return sorted(
        (r for r in rows if r["variant"] == label and want.get(r["seed"]) == r["config_hash"]), key=lambda r: r["seed"]
    )


def announce(
    what: str,
    config: str | Path,
    variants: dict[str, list[str]],
    seeds: Sequence[int],
    results: Path,
    common: Sequence[str],
    setting: Setting,
) -> None:
    """Print the study's size and its estimated CPU-hours, in all and for the runs not in `results` yet."""
    rows = load_rows(results)
    total = len(variants) * len(seeds)
    done = sum(len(select(rows, config, label, o, seeds, common)) for label, o in variants.items())
    per_run = setting.run_seconds()
    print(
        f"{what}: {total} runs ({len(variants)} variants x {len(seeds)} seeds), {done} already in "
        f"{display(results)}. Estimate: {per_run / 60:.1f} min per run; the whole study "
        f"{total * per_run / 3600:.2f} wall-hours = {total * per_run * CORES / 3600:.2f} CPU-hours on {CORES} cores; "
        f"left: {(total - done) * per_run / 3600:.2f} wall-hours. Stop it any time: rerun the same command to resume.",
        flush=True,
    )


def measured_hours(rows: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(wall-hours, CPU-hours at this machine's cores) the rows' runs took."""
    wall = sum(r["summary"]["wall_seconds"] for r in rows) / 3600
    return wall, wall * (os.cpu_count() or 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both LM studies take."""
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke of the pipeline ({QUICK.num_roles} roles, {QUICK.rounds} round of {QUICK.local_steps} steps, "
        f"sequence {QUICK.seq_len}): not a result; writes to {QUICK_RESULTS} unless --out is given",
    )
    parser.add_argument("--out", default=None, help=f"results folder (default: {display(RESULTS)})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (repeatable; changes the rows' hashes)",
    )
    parser.add_argument("--config", default=str(LM_CONFIG), help="base config (default: %(default)s)")


@dataclass(frozen=True)
class Study:
    """An invocation resolved: its setting, seeds, roles, results folder and the overrides of every run."""

    setting: Setting
    seeds: list[int]
    roles: list[str]
    results: Path
    common: list[str]
    config: str


def resolve(args: argparse.Namespace, study_overrides: Sequence[str] = ()) -> Study:
    """The study an invocation runs; a bad `--set` fails here, before anything runs."""
    setting = QUICK if args.quick else FULL
    results = Path(args.out) if args.out else QUICK_RESULTS if args.quick else RESULTS
    if args.quick and results.resolve() == RESULTS.resolve():
        raise SystemExit(f"--quick is a smoke, not a result: give --out a folder other than {display(RESULTS)}")
    roles = pick_roles(setting.num_roles)
    # quick runs keep their run folders next to their results; the study's go to runs/ as every run's do
    where = [f"output_dir={results / 'runs'}"] if args.quick else []
    common = [*setting.overrides(roles), *study_overrides, *where, *args.overrides]
    load_config(args.config, common)
    return Study(setting, list(args.seeds or setting.seeds), roles, results, common, args.config)


def command(module: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> str:
    """The command line that regenerates (or resumes) a study."""
    parts = ["python", "-m", f"fairedge.simulations.{module}", *extra]
    if args.quick:
        parts.append("--quick")
    if args.seeds:
        parts += ["--seeds", *map(str, args.seeds)]
    for o in args.overrides:
        parts += ["--set", o]
    if Path(args.config).resolve() != LM_CONFIG.resolve():
        parts += ["--config", args.config]
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)
