"""Uniform vs heterogeneous LoRA ranks (digits-domains): does a mix of ranks 4/8/16 cost or gain accuracy?

Every client at rank 8 (`uniform-r8`) against clients at ranks 4, 8 and 16 by partition, cyclically
(`mixed-4-8-16`: `lora.rank = 16`, `lora.client_ranks = [4, 8, 16]`), for FedIT (HetLoRA's zero-padding),
FlexLoRA and LoRA-FAIR with its cosine (the paper's) and frobenius objectives, several seeds; LoRA-FAIR's
per-round correction (cosines, `‖B'Ā‖ / ‖ΔW‖`) is tabled too. Both settings keep the same LoRA scale `alpha / r_max = 2`
(`alpha` 16 at rank 8, 32 at r_max 16), so a rank-8 client trains the same way in both.

    python -m fairedge.simulations.rank_study [--seeds 0 1 2] [--methods fedit flexlora lora_fair lora_fair_frobenius]
        [--engine inprocess|ray] [--set KEY=VALUE ...] [--results DIR] [--quick]

writes `<results>/rank_study.json` (every run, resumable: rows are keyed by config hash, seed-major) and
`<results>/rank_study.md` (`simulations/templates/rank_study.md.j2`). Default results folder:
`simulations/results`; `--quick` runs a tiny model for one round into a temporary folder (a smoke test,
not a result).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fairedge.common.config import config_hash, load_config
from fairedge.common.lora_ranks import assigned_rank
from fairedge.server.run_outputs import RunRecord, new_run_dir
from fairedge.simulations.paths import CONFIG, RESULTS, display
from fairedge.simulations.report import mean_std, write_report
from fairedge.simulations.sweep import QUICK_VIT, load_rows, run_sweep, save_rows, sweep_config

METHODS = (
    "fedit",
    "flexlora",
    "lora_fair",
    "lora_fair_frobenius",
    "fedit_global",
    "lora_fair_global",
    "lora_fair_frobenius_global",
)
NAMES = {
    "fedit": "FedIT (HetLoRA padding)",
    "flexlora": "FlexLoRA",
    "lora_fair": "LoRA-FAIR",
    "lora_fair_frobenius": "LoRA-FAIR (frobenius)",
    "fedit_global": "FedIT, global padding",
    "lora_fair_global": "LoRA-FAIR, global padding",
    "lora_fair_frobenius_global": "LoRA-FAIR (frobenius), global padding",
}
FROBENIUS = ["aggregation.method=lora_fair", "aggregation.objective=frobenius"]
GLOBAL = ["aggregation.rank_padding=global"]
METHOD_OVERRIDES = {
    "lora_fair_frobenius": FROBENIUS,
    "fedit_global": ["aggregation.method=fedit", *GLOBAL],
    "lora_fair_global": ["aggregation.method=lora_fair", *GLOBAL],
    "lora_fair_frobenius_global": [*FROBENIUS, *GLOBAL],
}
"""Study methods that are a rule plus options; any other is `aggregation.method=<name>`."""
GLOBAL_SUFFIX = "_global"
"""Global padding pads nothing when every client has r_max: its uniform-rank run is the zero-padded method's."""
SETTINGS = {
    "uniform-r8": ["lora.rank=8", "lora.alpha=16"],
    "mixed-4-8-16": ["lora.rank=16", "lora.alpha=32", "lora.client_ranks=[4, 8, 16]"],
}
QUICK = [  # a tiny ViT, one short round: minutes become seconds
    *QUICK_VIT,
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=8",
]


def variants(methods: Sequence[str]) -> dict[str, list[str]]:
    """`<setting>/<method>` -> its overrides (for `run_sweep`); no uniform-rank run of a global-padding method."""
    return {
        f"{s}/{m}": [*o, *METHOD_OVERRIDES.get(m, [f"aggregation.method={m}"])]
        for s, o in SETTINGS.items()
        for m in methods
        if not (s == "uniform-r8" and m.endswith(GLOBAL_SUFFIX))
    }


def percent(values: Sequence[float]) -> str:
    return mean_std([100 * v for v in values], "{:.2f}")


def select(rows: list[dict], config: str, label: str, seeds: Sequence[int], common: Sequence[str]) -> list[dict]:
    """The rows of one variant that this invocation's configs would produce (same config hash), by seed."""
    overrides = variants(METHODS)[label]
    want = {s: config_hash(sweep_config(config, label, overrides, s, common)) for s in seeds}
    return sorted((r for r in rows if r["variant"] == label and want.get(r["seed"]) == r["config_hash"]),
                  key=lambda r: r["seed"])  # fmt: skip


def main_table(by_variant: dict[str, list[dict]]) -> str:
    """Final mean / worst-domain accuracy and bytes per method and setting."""
    head = ["method", "ranks", "final mean acc (%)", "final worst-domain acc (%)", "uplink MB/run",
            "downlink MB/run", "seeds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in by_variant.items():
        if not rs:
            continue
        setting, method = label.split("/")
        s = [r["summary"] for r in rs]
        lines.append(
            "| "
            + " | ".join(
                [
                    NAMES.get(method, method),
                    setting,
                    percent([x["final_mean_accuracy"] for x in s]),
                    percent([x["final_worst_accuracy"] for x in s]),
                    f"{statistics.mean(x['bytes_up'] for x in s) / 1e6:.2f}",
                    f"{statistics.mean(x['bytes_down'] for x in s) / 1e6:.2f}",
                    ", ".join(str(r["seed"]) for r in rs),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def differences(by_variant: dict[str, list[dict]], methods: Sequence[str]) -> list[str]:
    """Per method, mixed − uniform final mean accuracy, paired by seed (points)."""
    out = []
    for m in methods:
        reference = f"uniform-r8/{m.removesuffix(GLOBAL_SUFFIX)}"
        uniform = {r["seed"]: r["summary"]["final_mean_accuracy"] for r in by_variant.get(reference, [])}
        d = [
            100 * (r["summary"]["final_mean_accuracy"] - uniform[r["seed"]])
            for r in by_variant.get(f"mixed-4-8-16/{m}", [])
            if r["seed"] in uniform
        ]
        if d:
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            per_seed = ", ".join(f"{x:+.2f}" for x in d)
            out.append(
                f"- {NAMES.get(m, m)}: mixed − uniform = {statistics.mean(d):+.2f} ± {sd:.2f} points "
                f"(paired over {len(d)} seed{'s' * (len(d) > 1)}: {per_seed})"
            )
    return out


CORRECTION = {
    "cos_fedit": "cos(ΔW, B̄Ā)",
    "cos_fair": "cos(ΔW, B'Ā)",
    "rel_correction": "‖B' − B̄‖ / ‖B̄‖",
    "norm_ratio_fedit": "‖B̄Ā‖ / ‖ΔW‖",
    "norm_ratio": "‖B'Ā‖ / ‖ΔW‖",
}


def correction_table(by_variant: dict[str, list[dict]]) -> str:
    """LoRA-FAIR's correction per variant: each metric's mean over rounds, then mean ± std over seeds."""
    head = ["method", "ranks", *CORRECTION.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in by_variant.items():
        setting, method = label.split("/")
        if not rs or not method.startswith("lora_fair"):
            continue
        cells = []
        for key in CORRECTION:
            per_seed = []
            for r in rs:
                vals = [x["aggregator_metrics"].get(f"lora_fair/{key}") for x in r["rounds"] if x["round"] > 0]
                per_seed.append(statistics.mean(vals) if vals and None not in vals else float("nan"))
            cells.append(mean_std(per_seed, "{:.3f}"))
        lines.append("| " + " | ".join([NAMES[method], setting, *cells]) + " |")
    return "\n".join(lines)


def domain_table(by_variant: dict[str, list[dict]], ranks: dict[str, int]) -> str:
    """Final accuracy per domain (mean over seeds), with the rank of the domain's client under the mix."""
    domains = list(ranks)
    head = ["method", "ranks", *[f"{d} (r{ranks[d]})" for d in domains]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in by_variant.items():
        if not rs:
            continue
        setting, method = label.split("/")
        cells = [f"{100 * statistics.mean(r['rounds'][-1]['accuracy'][d] for r in rs):.1f}" for d in domains]
        lines.append("| " + " | ".join([NAMES.get(method, method), setting, *cells]) + " |")
    return "\n".join(lines)


def domain_ranks(config: str, common: Sequence[str]) -> dict[str, int]:
    """Domain of each partition (feature partition: client i holds domain i) -> its rank in the mixed setting."""
    from fairedge.common.task import load_task

    cfg = load_config(config, [*common, *SETTINGS["mixed-4-8-16"]])
    domains = load_task(cfg).domains
    return {domains[i % len(domains)]: assigned_rank(cfg.lora, cfg.seed, i) for i in range(cfg.federation.num_clients)}


def run_one(engine: Literal["ray", "inprocess"], cpu: dict[str, float]):
    """A sweep runner that simulates on `engine` and notes each run's process CPU seconds (inprocess: all of it)."""
    from fairedge.simulations.simulate import simulate

    def run(cfg: Any) -> RunRecord:
        started = time.process_time()
        record = simulate(cfg, new_run_dir(cfg), engine=engine)
        cpu[config_hash(cfg)] = time.process_time() - started
        return record

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--engine", choices=["inprocess", "ray"], default="inprocess")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--results", default=None, help=f"output folder (default: {display(RESULTS)})")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run into a temporary folder")
    args = parser.parse_args(argv)
    common = [*(QUICK if args.quick else []), *args.overrides]
    results = Path(args.results or (tempfile.mkdtemp(prefix="rank-study-") if args.quick else RESULTS))
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.quick:  # its run folders go with its results, not into ./runs
        common.append(f"output_dir={str(results / 'runs')!r}")
    load_config(args.config, common)  # a bad --set fails before anything runs
    for overrides in variants(args.methods).values():
        load_config(args.config, [*common, *overrides])  # and so does a setting a rule refuses
    out = results / "rank_study.json"
    cpu: dict[str, float] = {}
    started = time.time()
    for seed in seeds:  # seed-major; each run's CPU seconds are added to its row
        run_sweep(args.config, variants(args.methods), [seed], out, common, run=run_one(args.engine, cpu))
        rows = load_rows(out)
        for r in rows:
            if r["config_hash"] in cpu and "cpu_seconds" not in r:
                r["cpu_seconds"] = cpu[r["config_hash"]]
        save_rows(out, rows)
    rows = load_rows(out)
    by_variant = {label: select(rows, args.config, label, seeds, common) for label in variants(args.methods)}
    used = [r for rs in by_variant.values() for r in rs]
    cfg = load_config(args.config, common)
    ranks = domain_ranks(args.config, common)
    text = write_report(
        results / "rank_study.md",
        "rank_study.md.j2",
        quick=args.quick,
        command=" ".join(["python -m fairedge.simulations.rank_study", *map(shlex.quote, sys.argv[1:])]),
        json_name=out.name,
        cfg=cfg,
        config=display(args.config),
        overrides=[o for o in common if not o.startswith("output_dir=")],
        seeds=seeds,
        methods=[NAMES[m] for m in args.methods],
        ranks=ranks,
        main_table=main_table(by_variant),
        differences=differences(by_variant, args.methods),
        domain_table=domain_table(by_variant, ranks),
        correction_table=correction_table(by_variant),
        runs=len(used),
        wall_seconds=sum(r["summary"]["wall_seconds"] for r in used),
        cpu_seconds=sum(r.get("cpu_seconds", float("nan")) for r in used),
        engine=args.engine,
    )
    print(text)
    print(f"study: {len(used)} runs in {time.time() - started:.0f} s this invocation; results in {results}")


if __name__ == "__main__":
    main()
