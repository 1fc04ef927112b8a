"""Utility vs ε of client-level DP for FedIT and LoRA-FAIR (issue 17, part 2).

Central DP (clip each client's update, Gaussian noise on the sum, dp-accounting's RDP accountant),
the noise calibrated with `privacy.target_epsilon` so that ε ≤ 1, 4, 8 at δ = 1e-5 after the planned
rounds, against no DP (ε = ∞); many clients, a fraction sampled each round (the amplification that
makes DP affordable). LoRA-FAIR runs its frobenius objective at every ε (the cosine one is refused
under DP), so ε = ∞ is its noiseless twin. Digits by default; `--lm` runs the causal-LM config
(SmolLM2 on Shakespeare, one client per speaking role) sized for 2 CPU cores: 1000 role clients, 20 sampled
per round, one local step each (a sampled client costs about 1.5 CPU-s, most of it the 30-block forward).

DP needs the noise on the mean, `z·clip_norm·√d / n` for d adapter entries and n clients per round, to be
small against the clipped updates, so the digits setting keeps d small (rank-2 LoRA on q/v, about 2.7 k
entries) and samples 40 of 400 clients per round.

    python -m fairedge.simulations.dp_study [--lm] [--seeds 0 1 2] [--quick] [--out DIR] [--set KEY=VALUE ...]

writes `<out>/dp_study.json` (every run, resumable: rerun the same command after a stop) and
`<out>/dp_study.md` (`dp_study_lm.*` with `--lm`; default out: `simulations/results`). The noise is drawn from `privacy.noise_seed =
seed`, so every row reproduces; a real deployment leaves `noise_seed` unset (fresh OS randomness).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from fairedge.common.atomic_files import atomic_save_figure
from fairedge.common.config import RunConfig, config_hash, load_config
from fairedge.server.run_outputs import RunRecord, new_run_dir
from fairedge.simulations.paths import display
from fairedge.simulations.report import mean_std, write_report
from fairedge.simulations.sweep import QUICK_VIT, load_rows, run_sweep, sweep_config

FILE = "dp_study"
CONFIGS = Path(__file__).parent / "configs"
EPSILONS = (1.0, 4.0, 8.0, math.inf)
METHODS = {"fedit": "FedIT", "lora_fair": "LoRA-FAIR (frobenius)"}
DELTA = 1e-5
COMMON = {
    "digits": [
        "federation.num_clients=400",
        "federation.fraction_train=0.1",
        "federation.rounds=25",
        "federation.local_steps=4",
        "federation.batch_size=16",
        "federation.lr=0.01",
        "data.partition=feature-label",
        "lora.rank=2",
        "lora.alpha=4",
        "lora.target_modules=['q_proj','v_proj']",
        "privacy.clip_norm=1.0",
    ],
    "lm": [
        "federation.num_clients=1000",  # one client per role with >= 5 lines (1061 roles)
        "data.min_lines=5",
        "federation.fraction_train=0.02",  # 20 per round
        "federation.rounds=10",
        "federation.local_steps=1",
        "federation.batch_size=4",
        "federation.lr=0.01",
        "data.seq_len=32",
        "federation.eval_clients=16",  # the server scores the same 16 roles every round
        "data.max_eval_tokens=64",
        "lora.rank=2",
        "lora.alpha=4",
        "lora.top_layers=4",
        "lora.target_modules=['q_proj','v_proj']",  # about 15.4 k entries
        "compression.enabled=false",  # error feedback is client state the sampled accountant does not cover
        "privacy.clip_norm=0.5",
    ],
}
QUICK = [
    *QUICK_VIT,
    "lora.target_modules=['q_proj','fc1']",
    "federation.num_clients=8",
    "federation.fraction_train=0.5",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
]


def variants(seed: int, quick: bool = False) -> dict[str, list[str]]:
    """Label -> overrides: each method at each ε (∞ = no DP), the DP noise seeded by the run's seed."""
    out = {}
    for method, name in METHODS.items():
        extra = ["aggregation.objective=frobenius"] if method == "lora_fair" else []
        for eps in (4.0, math.inf) if quick else EPSILONS:
            dp = (
                [
                    "privacy.enabled=true",
                    f"privacy.target_epsilon={eps}",
                    f"privacy.delta={DELTA}",
                    f"privacy.noise_seed={seed}",
                ]
                if math.isfinite(eps)
                else []
            )
            out[f"{name} ε={'∞' if math.isinf(eps) else f'{eps:g}'}"] = [f"aggregation.method={method}", *extra, *dp]
    return out


def simulate_inprocess(cfg: RunConfig) -> RunRecord:
    """One run with the in-process engine (clients one after another; no Ray start-up)."""
    from fairedge.simulations.simulate import simulate

    return simulate(cfg, new_run_dir(cfg), engine="inprocess")


def _clipped_fraction(row: dict) -> float:
    private = [r for r in row["rounds"] if "privacy" in r]
    return statistics.mean(r["privacy"]["clipped"] / len(r["sampled"]) for r in private) if private else math.nan


def utility(round_row: dict, lm: bool) -> float:
    """A round's held-out utility: mean accuracy over clients, or for the LM the geometric mean of the clients'
    perplexities, exp(mean held-out loss). Not their arithmetic mean: one role's few held-out tokens can score a
    perplexity of 10^5 and outweigh every other client (seed 1 of the LM study)."""
    if lm:
        return math.exp(statistics.mean(round_row["loss"].values()))
    return float(round_row["mean_accuracy"])


UTILITY_NAME = {False: "final mean accuracy", True: "final perplexity (geometric mean over clients)"}


def table(rows_by: dict[str, list[dict]], lm: bool) -> str:
    """One line per (method, ε): utility (mean ± std over seeds), paired change vs no DP, ε reached, noise."""
    fmt, dfmt = ("{:.1f}", "{:+.1f}") if lm else ("{:.4f}", "{:+.4f}")
    lines = [
        f"| setting | {UTILITY_NAME[lm]} | Δ vs ε=∞ (paired) | ε reached (δ = {DELTA:g}) "
        "| noise multiplier | clipped fraction | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rs in rows_by.items():
        if not rs:
            continue
        final = {r["seed"]: utility(r["rounds"][-1], lm) for r in rs}
        ref = {r["seed"]: utility(r["rounds"][-1], lm) for r in rows_by.get(label.split(" ε=")[0] + " ε=∞", [])}
        diffs = [final[seed] - ref[seed] for seed in final if seed in ref]
        s = [r["summary"] for r in rs]
        eps = [x.get("epsilon", math.inf) for x in s]
        lines.append(
            f"| {label} | {mean_std(list(final.values()), fmt)} | {mean_std(diffs, dfmt)} "
            f"| {'∞' if math.isinf(max(eps)) else f'{max(eps):.3g}'} "
            f"| {mean_std([x.get('noise_multiplier', 0.0) for x in s], '{:.3f}')} "
            f"| {mean_std([_clipped_fraction(r) for r in rs], '{:.2f}')} | {', '.join(str(r['seed']) for r in rs)} |"
        )
    base = {r["seed"]: utility(r["rounds"][0], lm) for rs in rows_by.values() for r in rs}
    if base:  # one value per seed: every setting of a seed starts from the same model
        lines.append(f"| before training (the pre-trained model) | {mean_std(list(base.values()), fmt)} | | | | | |")
    return "\n".join(lines)


def plot(rows_by: dict[str, list[dict]], lm: bool, path: Path, title: str) -> None:
    """Per method, the held-out metric per round at each ε (mean over seeds), as a PNG titled with the setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(METHODS), figsize=(12, 4.6), sharey=True)
    for ax, name in zip(axes, METHODS.values()):
        for label, rs in rows_by.items():
            if not rs or not label.startswith(f"{name} ε="):
                continue
            n = min(len(r["rounds"]) for r in rs)
            xs = [rs[0]["rounds"][i]["round"] for i in range(n)]
            ys = [statistics.mean(utility(r["rounds"][i], lm) for r in rs) for i in range(n)]
            eps = label.split(" ε=")[1]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"ε = {eps} ({len(rs)} seeds)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round (0 = pre-trained model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(
        "held-out perplexity (geometric mean over clients)" if lm else "held-out accuracy (mean over clients)"
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", action="store_true", help="the causal-LM config (shakespeare.toml) instead of digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 2 rounds, 1 seed, ε ∈ {4, ∞}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    config = CONFIGS / ("shakespeare.toml" if args.lm else "digits.toml")
    seeds = args.seeds[:1] if args.quick else args.seeds
    common = [*COMMON["lm" if args.lm else "digits"], *(QUICK if args.quick and not args.lm else []), *args.overrides]
    labelled = {seed: variants(seed, args.quick) for seed in seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{FILE}_lm" if args.lm else FILE
    out = args.out / f"{name}.json"
    print(f"DP study: {len(labelled[seeds[0]])} settings × seeds {seeds} on {display(config)} -> {out}", flush=True)
    for seed in seeds:  # seed-major, as run_sweep orders them
        run_sweep(config, labelled[seed], [seed], out, common, run=simulate_inprocess)
    rows = load_rows(out)
    want = {
        (label, s): config_hash(sweep_config(config, label, overrides, s, common))
        for s in seeds
        for label, overrides in labelled[s].items()
    }
    rows_by = {
        label: sorted(
            (r for r in rows if r["variant"] == label and want.get((label, r["seed"])) == r["config_hash"]),
            key=lambda r: r["seed"],
        )
        for label in labelled[seeds[0]]
    }
    cfg = load_config(config, common)
    command = (
        "python -m fairedge.simulations.dp_study" + (" --lm" if args.lm else "") + (" --quick" if args.quick else "")
    )
    command += f" --seeds {' '.join(map(str, seeds))}" + "".join(f" --set {o}" for o in args.overrides)
    plot(
        rows_by, args.lm, args.out / f"{name}.png", f"{command}\n{display(config)} ({config_hash(cfg)}), δ = {DELTA:g}"
    )
    print(
        write_report(
            args.out / f"{name}.md",
            f"{FILE}.md.j2",
            quick=args.quick,
            lm=args.lm,
            command=command,
            config=display(config),
            cfg=cfg,
            overrides=common,
            delta=DELTA,
            table=table(rows_by, lm=args.lm),
            runs=sum(len(rs) for rs in rows_by.values()),
            wanted=len(want),
            json_name=f"{name}.json",
            png_name=f"{name}.png",
        )
    )


if __name__ == "__main__":
    main()
