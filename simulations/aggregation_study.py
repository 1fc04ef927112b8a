"""Accuracy of every aggregation method, plus centralised LoRA on pooled data (digits-domains).

Feature non-IID (one domain per client) and feature+label non-IID (plus Dirichlet
label skew), same rounds, local steps and LoRA rank for every method, several seeds:
mean ± std of the final average and worst-domain accuracy, and the round at which
each run first reaches 95 % of its own final mean accuracy.

    python -m fairedge.simulations.aggregation_study [--seeds 0 1 2] [--partitions feature feature-label]
        [--methods fedit lora_fair ...] [--set federation.rounds=2 ...] [--results DIR]

writes `<results>/aggregation_accuracy.json` (every run; resumable, seed-major),
`<results>/aggregation.md` (tables and the command that regenerates them) and
`<results>/aggregation.png` (mean accuracy per round). Default results folder:
`simulations/results`.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel

from fairedge.common.aggregation import AGGREGATORS
from fairedge.common.atomic_files import atomic_save_figure, atomic_write_text
from fairedge.common.config import RunConfig, config_hash, load_config
from fairedge.common.data import LabeledData
from fairedge.common.lora import set_trainable_factors
from fairedge.common.task import client_partition, load_task, lora_model
from fairedge.common.training import evaluate_per_domain, resolve_device, train_local
from fairedge.server.run_outputs import RunRecord
from fairedge.simulations.paths import CONFIG, RESULTS, display
from fairedge.simulations.report import mean_std
from fairedge.simulations.sweep import load_rows, run_sweep, sweep_config

PARTITIONS = ("feature", "feature-label")
METHODS = ("fedit", "lora_fair", "ffa_lora", "flora", "flexlora", "fedex_lora", "fedsa_lora", "rolora")
CENTRAL = "centralised"
NAMES = {
    "fedit": "FedIT",
    "lora_fair": "LoRA-FAIR",
    "ffa_lora": "FFA-LoRA",
    "flora": "FLoRA",
    "flexlora": "FlexLoRA",
    "fedex_lora": "FedEx-LoRA",
    "fedsa_lora": "FedSA-LoRA¹",
    "rolora": "RoLoRA",
    CENTRAL: "centralised LoRA (pooled data)",
}
FRACTION = 0.95


def variants(partitions: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """`<partition>/<method>` -> its overrides (for `run_sweep`)."""
    return {f"{p}/{m}": [f"data.partition={p}", f"aggregation.method={m}"] for p in partitions for m in methods}


# --- the reference: centralised LoRA on the pooled client data --------------------------------


def _pool(parts: Sequence[LabeledData]) -> LabeledData:
    xs = [p.x for p in parts]
    # the parts of one task: all images (tensors) or all texts, like the first
    x = torch.cat(cast(list[torch.Tensor], xs)) if isinstance(xs[0], torch.Tensor) else [t for p in xs for t in p]
    return LabeledData(x=x, y=torch.cat([p.y for p in parts]), domain=torch.cat([p.domain for p in parts]))


def centralised(
    cfg: RunConfig,
    *,
    large_batch: bool = False,
    curve: bool = True,
    augment: Callable[[LabeledData], LabeledData] | None = None,
) -> tuple[RunRecord, PeftModel]:
    """LoRA trained on the union of all clients' training data, no Flower.

    Same model, rank and seeded initial adapter as the federation; each "round" runs
    `local_steps × num_clients` optimizer steps (or `local_epochs` passes over the pooled data)
    of `batch_size` examples with a fresh optimizer, as the clients do, so the federation and
    this baseline take the same total number of optimizer steps. With `large_batch`, each round
    is instead `local_steps` steps of `batch_size × num_clients` examples: the same examples per
    round, but only as many sequential steps as one client takes (what a federation without
    client drift could match). Evaluated per domain after every round on the same test data as
    the server (round 0 = before training), or with `curve=False` only after the last round.
    `augment` maps the pooled training data to the data actually trained on (e.g. with augmented copies).
    Returns the record and the trained model.
    """
    task, f = load_task(cfg), cfg.federation
    parts = [client_partition(cfg, k) for k in range(f.num_clients)]
    labeled = [p for p in parts if isinstance(p, LabeledData)]
    if len(labeled) < len(parts):
        raise ValueError(f"centralised pools classification data; model.kind {cfg.model.kind!r} gives token data")
    pooled = _pool(labeled)
    if augment is not None:
        pooled = augment(pooled)
    model, device = lora_model(cfg), resolve_device(f.device)
    set_trainable_factors(model, "AB")
    record = RunRecord(
        cfg=cfg,
        run_dir=Path(),
        domains=task.domains,
        shifted_domains=[d for d in task.domains if d != task.source_domain],
    )
    started = time.time()
    if curve:
        record.add_round(0, evaluate_per_domain(model, task.test, task.domains, device=device), None, 0.0)
    for r in range(1, f.rounds + 1):
        t = time.time()
        steps, batch = (
            (f.local_steps, f.batch_size * f.num_clients)
            if large_batch
            else (f.local_steps * f.num_clients, f.batch_size)
        )
        loss = train_local(
            model,
            pooled,
            steps=steps,
            epochs=f.local_epochs,
            batch_size=batch,
            lr=f.lr,
            optimizer=f.optimizer,
            weight_decay=f.weight_decay,
            device=device,
            seed=cfg.seed * 100_003 + r * 1_009,
        )
        if curve or r == f.rounds:
            row = record.add_round(
                r, evaluate_per_domain(model, task.test, task.domains, device=device), None, time.time() - t
            )
            row["train_loss"] = loss
    record.wall_seconds = time.time() - started
    return record, model


def run_centralised(
    config: str | Path, partitions: Sequence[str], seeds: Sequence[int], results: Path, common: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Add `<partition>/centralised` rows to `results` (the sweep runner, runs without Flower); skip finished ones."""
    variants = {f"{p}/{CENTRAL}": [f"data.partition={p}"] for p in partitions}
    return run_sweep(config, variants, seeds, results, common, run=lambda cfg: centralised(cfg)[0])


# --- tables -----------------------------------------------------------------------------------


def round_reaching(rounds: Sequence[dict[str, Any]], fraction: float = FRACTION, key: str = "mean_accuracy") -> int:
    """The first round (0 = base model) whose `key` is at least `fraction` of the final round's."""
    target = fraction * rounds[-1][key]
    return next(r["round"] for r in rounds if r[key] >= target - 1e-12)


def percent(values: Sequence[float]) -> str:
    """Fractions as `mean ± std` in percent, two decimals."""
    return mean_std([100 * v for v in values], "{:.2f}")


def select(
    rows: list[dict], config: str | Path, partition: str, method: str, seeds: Sequence[int], common: Sequence[str] = ()
) -> list[dict]:
    """This study's rows of one partition/method (same config hash as this invocation would run), by seed."""
    label = f"{partition}/{method}"
    overrides = [f"data.partition={partition}"] + ([] if method == CENTRAL else [f"aggregation.method={method}"])
    want = {s: config_hash(sweep_config(config, label, overrides, s, common)) for s in seeds}
    return sorted(
        (r for r in rows if r["variant"] == label and want.get(r["seed"]) == r["config_hash"]), key=lambda r: r["seed"]
    )


def paired_points(a: list[dict], b: list[dict]) -> list[float]:
    """Per-seed differences a − b of the final mean accuracy, in points."""
    bs = {r["seed"]: r["summary"]["final_mean_accuracy"] for r in b}
    return [100 * (r["summary"]["final_mean_accuracy"] - bs[r["seed"]]) for r in a if r["seed"] in bs]


def table(by_method: dict[str, list[dict]]) -> str:
    """One partition's table; `by_method` maps method (or `centralised`) to its rows."""
    personal = "fedsa_lora" in by_method
    head = (
        [
            "method",
            "final mean acc (%)",
            "final worst-domain acc (%)",
            f"round reaching {FRACTION:.0%} of final",
            "uplink MB/run",
            "downlink MB/run",
        ]
        + (["personal acc (%)¹"] if personal else [])
        + ["seeds"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    final = {m: statistics.mean(r["summary"]["final_mean_accuracy"] for r in rs) for m, rs in by_method.items() if rs}
    fed = [final[m] for m in final if m != CENTRAL]
    best = max(fed) if fed else None
    for m, rs in by_method.items():
        if not rs:
            continue
        s = [r["summary"] for r in rs]
        bold = "**" if m != CENTRAL and best is not None and final[m] >= best - 1e-12 else ""
        comm = (
            ["—", "—"]
            if m == CENTRAL
            else [
                f"{statistics.mean(x['bytes_up'] for x in s) / 1e6:.2f}",
                f"{statistics.mean(x['bytes_down'] for x in s) / 1e6:.2f}",
            ]
        )
        cells = [
            f"{bold}{NAMES.get(m, m)}{bold}",
            f"{bold}{percent([x['final_mean_accuracy'] for x in s])}{bold}",
            percent([x["final_worst_accuracy"] for x in s]),
            f"{statistics.mean(round_reaching(r['rounds']) for r in rs):.1f}",
            *comm,
        ]
        if personal:
            pa = [x["final_personal_mean_accuracy"] for x in s if x.get("final_personal_mean_accuracy") is not None]
            cells.append(percent(pa) if pa else "—")
        cells.append(", ".join(str(r["seed"]) for r in rs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(by_method: dict[str, list[dict]]) -> list[str]:
    """LoRA-FAIR − FedIT and centralised − LoRA-FAIR (paired over seeds), and the paper's claims checked."""
    out = []
    fair = by_method.get("lora_fair") or []
    for a, b, name in (("lora_fair", "fedit", "LoRA-FAIR − FedIT"), (CENTRAL, "lora_fair", "centralised − LoRA-FAIR")):
        d = paired_points(by_method.get(a) or [], by_method.get(b) or [])
        if d:
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            out.append(
                f"- {name}: {statistics.mean(d):+.2f} ± {sd:.2f} points of final mean accuracy "
                f"(paired over {len(d)} seed{'s' * (len(d) > 1)})"
            )
    final = {
        m: statistics.mean(r["summary"]["final_mean_accuracy"] for r in rs)
        for m, rs in by_method.items()
        if rs and m != CENTRAL
    }
    if fair and len(final) > 1:
        beaten = [NAMES[m] for m, v in final.items() if v > final["lora_fair"] + 1e-12]
        out.append(
            "- Paper: LoRA-FAIR ≥ all baselines. Here: "
            + ("holds (mean over seeds)." if not beaten else f"does not hold; higher mean: {', '.join(beaten)}.")
        )
    d = paired_points(by_method.get(CENTRAL) or [], fair)
    if d:
        gap = statistics.mean(d)
        verdict = "LoRA-FAIR is above centralised" if gap < 0 else "holds" if gap <= 0.7 else "does not hold"
        out.append(
            f"- Paper: LoRA-FAIR within ~0.7 points below centralised. Here: centralised − LoRA-FAIR "
            f"= {gap:+.2f} points ({verdict})."
        )
    return out


def plot(tables: dict[str, dict[str, list[dict]]], path: Path, title: str) -> None:
    """Mean accuracy per round (mean over seeds), one subplot per partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.6), squeeze=False, sharey=True)
    for ax, (partition, by_method) in zip(axes[0], tables.items()):
        for m, rs in by_method.items():
            if not rs:
                continue
            n = min(len(r["rounds"]) for r in rs)
            xs = [rs[0]["rounds"][i]["round"] for i in range(n)]
            ys = [100 * statistics.mean(r["rounds"][i]["mean_accuracy"] for r in rs) for i in range(n)]
            ax.plot(
                xs,
                ys,
                "k--" if m == CENTRAL else "-",
                marker="o",
                markersize=3,
                linewidth=2 if m in (CENTRAL, "lora_fair") else 1.2,
                label=NAMES.get(m, m).rstrip("¹"),
            )
        ax.set_title(f"{partition} non-IID")
        ax.set_xlabel("round (0 = pre-trained base)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("mean test accuracy over domains (%)")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(textwrap.fill(title, 75 * len(tables)), fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)


def command(args: argparse.Namespace) -> str:
    """The exact command line that regenerates these results."""
    parts = [
        "python",
        "-m",
        "fairedge.simulations.aggregation_study",
        "--seeds",
        *map(str, args.seeds),
        "--partitions",
        *args.partitions,
        "--methods",
        *args.methods,
    ]
    for o in args.overrides:
        parts += ["--set", o]
    if Path(args.config).resolve() != CONFIG.resolve():
        parts += ["--config", args.config]
    if Path(args.results).resolve() != RESULTS.resolve():
        parts += ["--results", args.results]
    return shlex.join(parts)


def report(rows: list[dict], args: argparse.Namespace) -> tuple[str, dict[str, dict[str, list[dict]]]]:
    """The markdown report and the rows behind each table."""
    cfg = load_config(args.config, list(args.overrides))
    f = cfg.federation
    methods = [*args.methods, CENTRAL]
    tables = {
        p: {m: select(rows, args.config, p, m, args.seeds, args.overrides) for m in methods} for p in args.partitions
    }
    sets = ", ".join(f"`{o}`" for o in args.overrides) or "none"
    md = [
        "# Aggregation methods vs centralised LoRA: accuracy (digits-domains)",
        "",
        f"Config `{display(args.config)}`; overrides per run `data.partition=<partition>`, "
        f"`aggregation.method=<method>`, `seed=<seed>`, `name=sweep-<partition>-<method>`; "
        f"extra overrides for every run: {sets}. Seeds {list(args.seeds)}.",
        f"Task {cfg.data.task}, {f.num_clients} clients, {f.rounds} round{'s' * (f.rounds > 1)}, "
        + (f"{f.local_epochs} local epochs" if f.local_epochs else f"{f.local_steps} local steps")
        + f" of batch {f.batch_size}, lr {f.lr} ({f.optimizer}), LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha}), "
        f"feature-label Dirichlet alpha {cfg.data.dirichlet_alpha}.",
        "",
        "Regenerate (finished runs in the JSON are reused):",
        "",
        "```bash",
        command(args),
        "```",
        "",
        f"Every run: `{display(Path(args.results) / 'aggregation_accuracy.json')}`. Accuracy in %, mean ± sample std "
        f"over seeds; worst-domain = lowest per-domain accuracy of the final round; "
        f"'round reaching {FRACTION:.0%}' = first round (0 = pre-trained base) whose mean accuracy is at least "
        f"{FRACTION:.0%} of that run's final mean accuracy, averaged over seeds; MB = 10⁶ bytes, summed over all "
        "rounds and clients. Bold: best federated method of the partition (centralised excluded).",
        "",
        "Centralised LoRA: no Flower; the same model, rank and seeded initial adapter, trained on the union of "
        "all clients' training examples (for feature-label the same label-skewed subsets the clients hold), "
        f"with `local_steps × num_clients` = {f.local_steps * f.num_clients} optimizer steps per round "
        "(the same total optimizer steps, and examples seen, as the federation), fresh optimizer each round "
        "as on the clients, evaluated per domain after every round on the same test data.",
        "",
    ]
    for p, by_method in tables.items():
        md += [f"## {p} non-IID", "", table(by_method), "", *comparisons(by_method), ""]
    if "fedsa_lora" in args.methods:
        md += [
            "¹ FedSA-LoRA shares only A; each client keeps its own B. Its server-side accuracy (the main "
            "columns) is the global A with the initial B, so it is not comparable to the others; "
            "'personal acc' is the mean over clients of each client's own model (global A, its own B) on "
            "its own domains' test data, final round.",
            "",
        ]
    md += [
        "![mean accuracy per round](aggregation.png)",
        "",
        "Why LoRA-FAIR does not win here (aggregation-bias diagnostic, λ / objective / local-steps ablation, "
        "drift vs aggregation): [lora_fair_investigation.md](lora_fair_investigation.md).",
        "",
    ]
    return "\n".join(md), tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=list(PARTITIONS))
    parser.add_argument("--methods", nargs="+", choices=sorted(AGGREGATORS), default=list(METHODS))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (repeatable)",
    )
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--results", default=str(RESULTS), help="output folder (default: %(default)s)")
    args = parser.parse_args()
    results = Path(args.results)
    out = results / "aggregation_accuracy.json"
    load_config(args.config, list(args.overrides))  # a bad --set fails before anything runs
    for seed in args.seeds:  # seed-major, the centralised reference included
        run_sweep(args.config, variants(args.partitions, args.methods), [seed], out, common_overrides=args.overrides)
        run_centralised(args.config, args.partitions, [seed], out, args.overrides)
    md, tables = report(load_rows(out), args)
    atomic_write_text(results / "aggregation.md", md)
    title = (
        f"{display(args.config)} {' '.join(args.overrides)}: mean accuracy per round, "
        f"mean over seeds {list(args.seeds)}"
    )
    plot(tables, results / "aggregation.png", title)
    print(md)


if __name__ == "__main__":
    main()
