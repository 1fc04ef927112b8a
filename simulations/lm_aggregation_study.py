"""Held-out perplexity of the aggregation methods, and of centralised LoRA, on federated Shakespeare (SmolLM2).

FedIT, LoRA-FAIR, FlexLoRA, FedEx-LoRA and FFA-LoRA federate the same 8 Shakespeare roles (one client
each, see `lm_study_setup`) with the same rounds, local steps and LoRA; centralised LoRA trains on the
union of their training text with the same number of optimizer steps. Uncompressed updates (compression
is `lm_compression_study`'s question). Every run is scored on each client's held-out lines after every
round; the report gives mean ± std over seeds of the final mean and worst-client perplexity, the
perplexity of each client, and LoRA-FAIR − FedIT paired by seed.

    python -m fairedge.simulations.lm_aggregation_study [--seeds 0 1 2] [--methods fedit lora_fair ...]
        [--quick] [--out DIR] [--set KEY=VALUE ...]

writes `<out>/lm_aggregation.json` (every run, resumable: rerun the same command after a stop),
`<out>/lm_aggregation.md` and `<out>/lm_aggregation.png` (default out: `simulations/results`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fairedge.common.atomic_files import atomic_save_figure
from fairedge.common.config import RunConfig, load_config
from fairedge.common.data import partition_clients
from fairedge.common.lora import set_trainable_factors
from fairedge.common.task import load_task, lora_model
from fairedge.common.training import evaluate_groups, resolve_device, train_local
from fairedge.server.run_outputs import RunRecord
from fairedge.simulations import lm_study_setup as setup
from fairedge.simulations.aggregation_study import CENTRAL, NAMES
from fairedge.simulations.paths import display
from fairedge.simulations.report import mean_std, write_report
from fairedge.simulations.sweep import load_rows, run_sweep

METHODS = ("fedit", "lora_fair", "flexlora", "fedex_lora", "ffa_lora")
QUICK_METHODS = ("fedit", "lora_fair")
STUDY_OVERRIDES = ("compression.enabled=false",)
"""every run sends uncompressed fp32 updates: this study compares aggregation, not codecs."""
FILE = "lm_aggregation"


def variants(methods: Sequence[str]) -> dict[str, list[str]]:
    """Label -> overrides: one per federated method, then the centralised reference (no Flower)."""
    return {m: [f"aggregation.method={m}"] for m in methods}


# --- the reference: centralised LoRA on the pooled client text ---------------------------------


def centralised_lm(cfg: RunConfig) -> RunRecord:
    """LoRA trained on the union of the clients' training text, no Flower (the causal-LM reference).

    As the digits reference (`aggregation_study.centralised`): the same model, LoRA layers and seeded
    initial adapter as the federation; each round runs `local_steps × num_clients` optimizer steps
    (or `local_epochs` passes over the pooled text) of `batch_size` rows with a fresh optimizer, so
    it takes as many optimizer steps, on as many tokens, as the federation. After every round (round 0
    = the base model) each client's held-out text is scored as the server scores it: next-token
    accuracy and loss, hence perplexity, per client.
    """
    task, f = load_task(cfg), cfg.federation
    parts = partition_clients(
        task.train, f.num_clients, mode=cfg.data.partition, dirichlet_alpha=cfg.data.dirichlet_alpha, seed=cfg.seed
    )
    pooled = task.train.subset(np.concatenate(parts))
    model, device = lora_model(cfg, task=task), resolve_device(f.device)
    set_trainable_factors(model, "AB")
    record = RunRecord(
        cfg=cfg,
        run_dir=Path(),
        domains=task.domains,
        shifted_domains=[d for d in task.domains if d != task.source_domain],
    )

    def evaluate(server_round: int, seconds: float) -> dict[str, Any]:
        groups = evaluate_groups(model, task.test, task.domains, device=device)
        acc = {g: m["accuracy"] for g, m in groups.items()}
        return record.add_round(server_round, acc, None, seconds, loss={g: m["loss"] for g, m in groups.items()})

    started = time.time()
    evaluate(0, 0.0)
    for r in range(1, f.rounds + 1):
        t = time.time()
        loss = train_local(
            model,
            pooled,
            steps=f.local_steps * f.num_clients,
            epochs=f.local_epochs,
            batch_size=f.batch_size,
            lr=f.lr,
            optimizer=f.optimizer,
            weight_decay=f.weight_decay,
            device=device,
            seed=cfg.seed * 100_003 + r * 1_009,
        )
        evaluate(r, time.time() - t)["train_loss"] = loss
    record.wall_seconds = time.time() - started
    setup.print_perplexity(cfg, record)
    return record


# --- the report ---------------------------------------------------------------------------------


def _final(rows: Sequence[dict], key: str) -> list[float]:
    return [r["summary"][key] for r in rows]


def _paired(a: Sequence[dict], b: Sequence[dict], key: str) -> dict[int, float]:
    """seed -> a − b of a summary value, over the seeds both have."""
    bs = {r["seed"]: r["summary"][key] for r in b}
    return {r["seed"]: r["summary"][key] - bs[r["seed"]] for r in a if r["seed"] in bs}


def main_table(by_method: dict[str, list[dict]]) -> str:
    """Method | final mean and worst-client perplexity (mean ± std over seeds) | change vs base | uplink | seeds."""
    lines = [
        "| method | final mean perplexity | final worst-client perplexity | mean change vs base | "
        "final mean next-token acc (%) | uplink MB/run | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    fed = {
        m: statistics.mean(_final(rs, "final_mean_perplexity")) for m, rs in by_method.items() if rs and m != CENTRAL
    }
    best = min(fed.values()) if fed else None
    for m, rs in by_method.items():
        if not rs:
            continue
        bold = "**" if m in fed and fed[m] <= (best or math.inf) + 1e-12 else ""
        uplink = "—" if m == CENTRAL else f"{statistics.mean(_final(rs, 'bytes_up')) / 1e6:.1f}"
        lines.append(
            f"| {bold}{NAMES.get(m, m)}{bold} | {bold}{mean_std(_final(rs, 'final_mean_perplexity'), '{:.3f}')}{bold} "
            f"| {mean_std(_final(rs, 'final_worst_perplexity'), '{:.3f}')} "
            f"| {mean_std([100 * x for x in _final(rs, 'perplexity_change')], '{:+.2f}')} % "
            f"| {mean_std([100 * x for x in _final(rs, 'final_mean_accuracy')], '{:.2f}')} "
            f"| {uplink} | {', '.join(str(r['seed']) for r in rs)} |"
        )
    return "\n".join(lines)


def client_table(by_method: dict[str, list[dict]], roles: Sequence[str]) -> str:
    """Each client's base and final held-out perplexity per method (mean over seeds)."""
    methods = [m for m, rs in by_method.items() if rs]
    if not methods:
        return "(no runs yet)"
    any_rows = next(rs for rs in by_method.values() if rs)
    lines = [
        "| client | base | " + " | ".join(NAMES.get(m, m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for role in roles:
        base = statistics.mean(r["rounds"][0]["perplexity"][role] for r in any_rows)
        cells = [f"{statistics.mean(r['rounds'][-1]['perplexity'][role] for r in by_method[m]):.2f}" for m in methods]
        lines.append(f"| {role} | {base:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference(a: Sequence[dict], b: Sequence[dict], name: str) -> dict[str, Any] | None:
    """`name` = a − b paired by seed, of the final mean and worst-client perplexity; None without common seeds."""
    mean_d = _paired(a, b, "final_mean_perplexity")
    if not mean_d:
        return None
    worst_d = _paired(a, b, "final_worst_perplexity")
    values = list(mean_d.values())
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = statistics.mean(values)
    # a paired difference within two standard errors of zero is not told apart from seed-to-seed noise
    noise = abs(mean) <= 2 * sd / math.sqrt(len(values))
    first, second = name.split(" − ")
    if len(values) < 2:
        verdict = "one seed only: no noise estimate"
    elif noise:
        verdict = "within seed noise (|mean| ≤ 2 standard errors of the paired differences)"
    else:
        verdict = f"{first if mean < 0 else second} lower, beyond 2 standard errors of the paired differences"
    return {
        "name": name,
        "per_seed": [{"seed": s, "mean": d, "worst": worst_d[s]} for s, d in sorted(mean_d.items())],
        "mean": mean_std(values, "{:+.3f}"),
        "worst": mean_std(list(worst_d.values()), "{:+.3f}"),
        "verdict": verdict,
    }


def plot(by_method: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean and worst-client held-out perplexity per round, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in zip(axes, ("mean_perplexity", "worst_perplexity"), ("mean", "worst-client")):
        for m, rs in by_method.items():
            if not rs:
                continue
            n = min(len(r["rounds"]) for r in rs)
            xs = [rs[0]["rounds"][i]["round"] for i in range(n)]
            ys = [statistics.mean(r["rounds"][i][key] for r in rs) for i in range(n)]
            ax.plot(
                xs,
                ys,
                "k--" if m == CENTRAL else "-",
                marker="o",
                markersize=3,
                linewidth=2 if m in (CENTRAL, "lora_fair") else 1.2,
                label=NAMES.get(m, m),
            )
        ax.set_xlabel("round (0 = base model)")
        ax.set_ylabel(f"{label} held-out perplexity")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)


def report(study: setup.Study, methods: Sequence[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Write `lm_aggregation.md` and `.png` from the JSON's rows of this invocation; return them by method."""
    rows = load_rows(study.results / f"{FILE}.json")
    labelled = {**variants(methods), CENTRAL: []}
    by_method = {m: setup.select(rows, study.config, m, o, study.seeds, study.common) for m, o in labelled.items()}
    cfg = load_config(study.config, study.common)
    wall, cpu = setup.measured_hours([r for rs in by_method.values() for r in rs])
    diffs = [
        d
        for d in (
            difference(by_method.get("lora_fair", []), by_method.get("fedit", []), "LoRA-FAIR − FedIT"),
            difference(by_method[CENTRAL], by_method.get("lora_fair", []), "centralised − LoRA-FAIR"),
        )
        if d is not None
    ]
    extra = ["--methods", *args.methods] if args.methods else []
    write_report(
        study.results / f"{FILE}.md",
        f"{FILE}.md.j2",
        quick=args.quick,
        command=setup.command("lm_aggregation_study", args, extra),
        config=display(study.config),
        model=cfg.model.path or "SmolLM2-135M-Instruct (built in)",
        cfg=cfg,
        setting=study.setting,
        seeds=study.seeds,
        roles=role_list(study.roles),
        role_table=setup.role_table(study.roles),
        overrides=study.common,
        min_lines=setup.MIN_LINES,
        role_seed=setup.ROLE_SEED,
        steps_per_round=cfg.federation.local_steps * cfg.federation.num_clients,
        tokens_per_run=study.setting.run_tokens(),
        estimate_hours=len(labelled) * len(study.seeds) * study.setting.run_seconds() / 3600,
        cores=setup.CORES,
        main_table=main_table(by_method),
        base=mean_std([r["summary"]["base_mean_perplexity"] for rs in by_method.values() for r in rs], "{:.3f}"),
        client_table=client_table(by_method, study.roles),
        differences=diffs,
        runs=sum(len(rs) for rs in by_method.values()),
        wanted=len(labelled) * len(study.seeds),
        wall_hours=wall,
        cpu_hours=cpu,
        json_name=f"{FILE}.json",
        plot_name=f"{FILE}.png",
        kept=update_kept(study.results),
        central=central_curve(by_method[CENTRAL]),
    )
    plot(
        by_method,
        study.results / f"{FILE}.png",
        f"SmolLM2-135M on {len(study.roles)} Shakespeare roles: held-out perplexity per round, "
        f"mean over seeds {study.seeds}" + (" (QUICK SMOKE, not a result)" if args.quick else ""),
    )
    return by_method


def update_kept(results: Path) -> dict[str, Any] | None:
    """The replay of `aggregation_bias --lm-study` (if run): the relative error of each candidate's next
    global product against the round's mean client update, per round and averaged over rounds."""
    path = results / "aggregation_bias-lm-lora_fair.json"
    if not path.is_file():
        return None
    rounds = json.loads(path.read_text())["rounds"]
    names = ("fedit", "lora_fair", "best_B", "best_rank_r")
    mean = {n: statistics.mean(r[f"err/{n}"] for r in rounds) for n in names}
    return {"file": path.name, "rounds": rounds, "mean": mean, "count": len(rounds)}


def central_curve(rows: Sequence[dict]) -> dict[str, Any] | None:
    """The centralised reference's mean held-out perplexity and training loss per round (mean over seeds),
    and its best round; None without runs, or when it is best at its last round (no overfitting to explain)."""
    if not rows:
        return None
    n = min(len(r["rounds"]) for r in rows)
    ppl = [statistics.mean(r["rounds"][i]["mean_perplexity"] for r in rows) for i in range(n)]
    best = min(range(n), key=ppl.__getitem__)
    if best == n - 1:
        return None
    loss = [statistics.mean(r["rounds"][i]["train_loss"] for r in rows) for i in range(1, n)]
    return {
        "perplexity": [f"{v:.2f}" for v in ppl],
        "train_loss": [f"{v:.3f}" for v in loss],
        "best": f"{ppl[best]:.2f}",
        "best_round": best,
    }


def role_list(roles: Sequence[str]) -> str:
    return ", ".join(f"`{r}`" for r in roles)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup.add_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: all five")
    args = parser.parse_args(argv)
    study = setup.resolve(args, STUDY_OVERRIDES)
    methods = list(args.methods or (QUICK_METHODS if args.quick else METHODS))
    out = study.results / f"{FILE}.json"
    federated = variants(methods)
    central: dict[str, list[str]] = {CENTRAL: []}
    setup.announce(
        "LM aggregation study", study.config, {**federated, **central}, study.seeds, out, study.common, study.setting
    )
    print(f"roles: {', '.join(study.roles)}", flush=True)
    for seed in study.seeds:  # seed-major, the centralised reference included
        run_sweep(study.config, federated, [seed], out, study.common, run=setup.simulate_inprocess)
        run_sweep(study.config, central, [seed], out, study.common, run=centralised_lm)
    report(study, methods, args)
    print((study.results / f"{FILE}.md").read_text())


if __name__ == "__main__":
    main()
