"""Why LoRA-FAIR does not beat FedIT on digits-domains: λ, objective and local steps, side by side.

Each variant changes one thing against the aggregation study's setting (same config, feature+label
non-IID by default, same seeds), and is compared per seed with FedIT and default LoRA-FAIR from the
study's own runs (`aggregation_accuracy.json`), so every difference is paired.

    python -m fairedge.simulations.lora_fair_ablation [--seeds 0 1 2] [--partition feature-label]

writes `simulations/results/lora_fair_ablation.json` (every run; resumable) and
`simulations/results/lora_fair_ablation.md`.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

from fairedge.common.atomic_files import atomic_write_text
from fairedge.simulations.aggregation_study import CENTRAL, PARTITIONS, centralised, percent, select
from fairedge.simulations.paths import CONFIG, RESULTS, display
from fairedge.simulations.report import mean_std
from fairedge.simulations.sweep import load_rows, run_sweep

VARIANTS: dict[str, list[str]] = {
    "lora_fair λ=0.0001": ["aggregation.method=lora_fair", "aggregation.lam=0.0001"],
    "lora_fair λ=0.001": ["aggregation.method=lora_fair", "aggregation.lam=0.001"],
    "lora_fair λ=0.1": ["aggregation.method=lora_fair", "aggregation.lam=0.1"],
    "lora_fair frobenius λ=0.01": ["aggregation.method=lora_fair", "aggregation.objective=frobenius"],
    "fedit 10 local steps": ["aggregation.method=fedit", "federation.local_steps=10"],
    "lora_fair 10 local steps": ["aggregation.method=lora_fair", "federation.local_steps=10"],
}
LARGE_BATCH = "centralised, large batch"
"""Pooled data, `local_steps` steps of `batch_size × num_clients` per round: a drift-free federation's match."""


def run_large_batch(partition: str, seeds: list[int], out: Path) -> None:
    """Add the `LARGE_BATCH` reference runs (no Flower) to `out`; skip finished ones."""
    variants = {f"{partition}/{LARGE_BATCH}": [f"data.partition={partition}"]}
    run_sweep(CONFIG, variants, seeds, out, run=lambda cfg: centralised(cfg, large_batch=True)[0])


def _final(rows: list[dict]) -> dict[int, float]:
    return {r["seed"]: r["summary"]["final_mean_accuracy"] for r in rows}


def _round1(rows: list[dict], key: str) -> str:
    values = [r["rounds"][1].get("aggregator_metrics", {}).get(key) for r in rows]
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.4f}" if values else "–"


def report(rows: list[dict], partition: str, seeds: list[int], study: list[dict], command: str) -> str:
    """Markdown table: each variant's accuracy and its paired difference to FedIT / default LoRA-FAIR."""
    fedit = _final(select(study, CONFIG, partition, "fedit", seeds))
    fair = _final(select(study, CONFIG, partition, "lora_fair", seeds))
    lines = [
        f"# LoRA-FAIR ablation ({partition} non-IID, digits-domains)",
        "",
        f"Config `{display(CONFIG)}` with `data.partition={partition}`, seeds {seeds}; each variant changes the "
        "overrides shown. Δ = paired per-seed difference in points (mean ± std) against the aggregation "
        "study's FedIT and default LoRA-FAIR (λ = 0.01, cosine) runs of the same seeds. Round-1 columns: the "
        "server's `lora_fair/*` metrics in round 1, mean over seeds. Centralised (study): pooled data, "
        "`local_steps × num_clients` steps of `batch_size` per round; centralised, large batch: pooled data, "
        "`local_steps` steps of `batch_size × num_clients` per round (same examples, as many sequential steps "
        "as one client).",
        "",
        "Regenerate:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| variant | overrides | final mean acc (%) | Δ vs FedIT | Δ vs LoRA-FAIR λ=0.01 | round-1 cos FedIT | "
        "round-1 cos LoRA-FAIR | round-1 ‖B'−B̄‖/‖B̄‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    own = [*VARIANTS, LARGE_BATCH]
    for name, label_rows in [
        ("FedIT (study)", select(study, CONFIG, partition, "fedit", seeds)),
        ("LoRA-FAIR λ=0.01 (study)", select(study, CONFIG, partition, "lora_fair", seeds)),
        ("centralised (study)", select(study, CONFIG, partition, CENTRAL, seeds)),
    ] + [
        (
            v,
            sorted(
                (r for r in rows if r["variant"] == f"{partition}/{v}" and r["seed"] in seeds), key=lambda r: r["seed"]
            ),
        )
        for v in own
    ]:
        if not label_rows:
            continue
        acc = _final(label_rows)
        d_fedit = [100 * (acc[s] - fedit[s]) for s in acc if s in fedit]
        d_fair = [100 * (acc[s] - fair[s]) for s in acc if s in fair]
        overrides = ", ".join(f"`{o}`" for o in VARIANTS.get(name, [])) or "–"
        lines.append(
            f"| {name} | {overrides} | {percent(list(acc.values()))} | {_pts(d_fedit)} | {_pts(d_fair)} | "
            f"{_round1(label_rows, 'lora_fair/cos_fedit')} | {_round1(label_rows, 'lora_fair/cos_fair')} | "
            f"{_round1(label_rows, 'lora_fair/rel_correction')} |"
        )
    return "\n".join(lines) + "\n"


def _pts(values: list[float]) -> str:
    return mean_std(values, "{:+.2f}", empty="–")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partition", choices=PARTITIONS, default="feature-label")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.results) / "lora_fair_ablation.json"
    variants = {f"{args.partition}/{v}": [f"data.partition={args.partition}", *VARIANTS[v]] for v in args.variants}
    for seed in args.seeds:
        run_sweep(CONFIG, variants, [seed], out)
    run_large_batch(args.partition, args.seeds, out)
    study = load_rows(Path(args.results) / "aggregation_accuracy.json")
    command = shlex.join(
        [
            "python",
            "-m",
            "fairedge.simulations.lora_fair_ablation",
            "--seeds",
            *map(str, args.seeds),
            "--partition",
            args.partition,
        ]
    )
    md = report(load_rows(out), args.partition, args.seeds, study, command)
    atomic_write_text(Path(args.results) / "lora_fair_ablation.md", md)
    print(md)


if __name__ == "__main__":
    main()
