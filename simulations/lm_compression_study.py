"""Uplink bytes vs held-out perplexity of ComPEFT-compressed rounds on federated Shakespeare (SmolLM2).

The same 8 roles, rounds, local training and LoRA as `lm_aggregation_study` (see `lm_study_setup`),
aggregated with one method (LoRA-FAIR by default, the mission's pipeline); each client's update is
sent ComPEFT-compressed at density k ∈ {5, 10, 20} %, with and without error feedback, or dense fp32
(k = 100 %: exact values, the reference; error feedback has nothing to carry there). Goal: at least
25× fewer uplink bytes than fp32 within 1 % of the reference's final mean perplexity.

    python -m fairedge.simulations.lm_compression_study [--seeds 0 1 2] [--method lora_fair]
        [--quick] [--out DIR] [--set KEY=VALUE ...]

writes `<out>/lm_compression.json` (every run, resumable: rerun the same command after a stop) and
`<out>/lm_compression.md` (default out: `simulations/results`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from fairedge.common.aggregation import AGGREGATORS
from fairedge.common.config import load_config
from fairedge.simulations import lm_study_setup as setup
from fairedge.simulations import update_shape
from fairedge.simulations.aggregation_study import NAMES
from fairedge.simulations.paths import display
from fairedge.simulations.report import mean_std, write_report
from fairedge.simulations.sweep import load_rows, run_sweep

REFERENCE = "k=100% (dense fp32)"
DENSITIES = (0.2, 0.1, 0.05)
GOAL_RATIO = 25.0
"""fp32 bytes / sent bytes the goal asks for ..."""
GOAL_PERPLEXITY = 0.01
"""... within this relative increase of the reference's final mean perplexity."""
FILE = "lm_compression"


def variants(quick: bool = False) -> dict[str, list[str]]:
    """Label -> compression overrides: the dense reference, then each density with and without error feedback."""
    out = {REFERENCE: ["compression.enabled=true", "compression.density=1.0", "compression.error_feedback=false"]}
    for k in (0.1,) if quick else DENSITIES:
        for ef in (True,) if quick else (True, False):
            out[f"k={k:.0%} {'+EF' if ef else 'no EF'}"] = [
                "compression.enabled=true",
                f"compression.density={k}",
                f"compression.error_feedback={'true' if ef else 'false'}",
            ]
    return out


def table(by_variant: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """The results table, and the settings that meet the goal (mean over seeds)."""
    lines = [
        "| setting | final mean perplexity | Δ vs dense (%, paired) | final worst-client perplexity "
        "| uplink MB / run | fp32 bytes / sent bytes | goal met | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["seed"]: r["summary"]["final_mean_perplexity"] for r in by_variant.get(REFERENCE, [])}
    meeting = []
    for label, rs in by_variant.items():
        if not rs:
            continue
        s = [r["summary"] for r in rs]
        ratio = statistics.mean(x["uplink_ratio_vs_fp32"] for x in s)
        diffs = [100 * (r["summary"]["final_mean_perplexity"] / ref[r["seed"]] - 1) for r in rs if r["seed"] in ref]
        met = bool(diffs) and ratio >= GOAL_RATIO and statistics.mean(diffs) <= 100 * GOAL_PERPLEXITY
        if met:
            meeting.append(label)
        lines.append(
            f"| {label} | {mean_std([x['final_mean_perplexity'] for x in s], '{:.3f}')} "
            f"| {mean_std(diffs, '{:+.2f}')} "
            f"| {mean_std([x['final_worst_perplexity'] for x in s], '{:.3f}')} "
            f"| {statistics.mean(x['bytes_up'] for x in s) / 1e6:.2f} | {ratio:.1f}× "
            f"| {'reference' if label == REFERENCE else 'yes' if met else 'no' if diffs else '—'} "
            f"| {', '.join(str(r['seed']) for r in rs)} |"
        )
    return "\n".join(lines), meeting


def report(study: setup.Study, labelled: dict[str, list[str]], method: str, args: argparse.Namespace) -> str:
    """Write `lm_compression.md` from the JSON's rows of this invocation; return its text."""
    rows = load_rows(study.results / f"{FILE}.json")
    by_variant = {v: setup.select(rows, study.config, v, o, study.seeds, study.common) for v, o in labelled.items()}
    cfg = load_config(study.config, study.common)
    text, meeting = table(by_variant)
    wall, cpu = setup.measured_hours([r for rs in by_variant.values() for r in rs])
    extra = ["--method", args.method] if args.method != "lora_fair" else []
    return write_report(
        study.results / f"{FILE}.md",
        f"{FILE}.md.j2",
        quick=args.quick,
        command=setup.command("lm_compression_study", args, extra),
        config=display(study.config),
        model=cfg.model.path or "SmolLM2-135M-Instruct (built in)",
        cfg=cfg,
        method=NAMES.get(method, method),
        setting=study.setting,
        seeds=study.seeds,
        roles=", ".join(f"`{r}`" for r in study.roles),
        overrides=study.common,
        min_lines=setup.MIN_LINES,
        role_seed=setup.ROLE_SEED,
        tokens_per_run=study.setting.run_tokens(),
        estimate_hours=len(labelled) * len(study.seeds) * study.setting.run_seconds() / 3600,
        cores=setup.CORES,
        table=text,
        meeting=meeting,
        goal_ratio=GOAL_RATIO,
        goal_perplexity=GOAL_PERPLEXITY,
        runs=sum(len(rs) for rs in by_variant.values()),
        wanted=len(labelled) * len(study.seeds),
        wall_hours=wall,
        cpu_hours=cpu,
        json_name=f"{FILE}.json",
        shape=update_shape.summary(study.results / "update_shape-lm-adamw.json"),
        shape_sgd=update_shape.summary(study.results / "update_shape-lm-sgd.json"),
        densities=sorted(update_shape.DENSITIES),
        alphas=update_shape.ALPHAS,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    setup.add_arguments(parser)
    parser.add_argument(
        "--method", default="lora_fair", choices=sorted(AGGREGATORS), help="aggregation method (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    study = setup.resolve(args, [f"aggregation.method={args.method}"])
    labelled = variants(args.quick)
    out = study.results / f"{FILE}.json"
    setup.announce("LM compression study", study.config, labelled, study.seeds, out, study.common, study.setting)
    print(f"roles: {', '.join(study.roles)}", flush=True)
    run_sweep(study.config, labelled, study.seeds, out, study.common, run=setup.simulate_inprocess)  # seed-major
    print(report(study, labelled, args.method, args))


if __name__ == "__main__":
    main()
