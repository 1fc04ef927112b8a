"""Accuracy of the aggregation methods on a pre-trained DINOv2 (digit-shift), against centralised LoRA.

FedIT, LoRA-FAIR, FFA-LoRA, FLoRA, FlexLoRA and FedEx-LoRA federate one client per digit-shift domain with the
same rounds, local steps and LoRA (`dino_study_setup`: the top blocks of the built-in DINOv2, the frozen blocks
below computed once per image); centralised LoRA trains on the union of the clients' data with as many
optimizer steps. Both partitions (feature, feature-label), 3 seeds, uncompressed updates. Also:
- LoRA-FAIR with λ = 0 (the paper's ablation, ~4 points below λ = 0.01 there). λ = 0 is undefined for the
  cosine objective (scale-free; the solver refuses it), and as λ → 0 the exact cosine solution barely moves
  (random rank-8 clients: the same cosine to 1e-8, ‖B'‖ within 0.03 % from λ = 1e-2 to 1e-9), so the λ = 0 run
  is the unregularised least-squares correction, `objective = frobenius`, λ = 0: B' = ΔWĀᵀ(ĀĀᵀ)⁺;
- drift vs aggregation error: FedEx-LoRA aggregates exactly, so FedEx − FedIT is what aggregation error costs;
  the centralised large-batch reference (pooled data, `local_steps` steps of `batch_size × clients` per round:
  what a federation without client drift could match) minus FedEx-LoRA is what drift costs; and a replay of
  the first seed (`aggregation_bias.replay`) measures how much of each round's update each rule keeps.
Goal reported against: LoRA-FAIR ≥ FedIT + 1 point, and within 1 point of centralised (paired by seed).

    python -m fairedge.simulations.dino_aggregation_study [--seeds 0 1 2] [--partitions feature feature-label]
        [--methods fedit lora_fair ...] [--quick] [--out DIR] [--set KEY=VALUE ...] [--threads N] [--measure]

writes `<out>/dino_aggregation.json` (every run; resumable: rerun the same command), `dino_aggregation_bias.json`
(the replays), `dino_aggregation.md` and `.png` (default out: `simulations/results`). `--measure` measures this
machine's step times instead (whole model vs top blocks vs cached; `<out>/dino_step_time.json`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import RunConfig, config_hash, load_config, to_toml
from fairedge.common.models import frozen_cache
from fairedge.server.run_outputs import RunRecord, new_run_dir
from fairedge.simulations import dino_study_setup as setup
from fairedge.simulations.aggregation_bias import CANDIDATES, replay
from fairedge.simulations.aggregation_study import CENTRAL, PARTITIONS, centralised, paired_points, percent, plot, table
from fairedge.simulations.lm_study_setup import measured_hours, select
from fairedge.simulations.lora_fair_ablation import LARGE_BATCH
from fairedge.simulations.paths import RESULTS, display
from fairedge.simulations.report import mean_std
from fairedge.simulations.sweep import load_rows, run_sweep, save_rows, sweep_config

FILE = "dino_aggregation"
METHODS = ("fedit", "lora_fair", "ffa_lora", "flora", "flexlora", "fedex_lora")
QUICK_METHODS = ("fedit", "lora_fair", "flora")
LAMBDA0 = "lora_fair λ=0"
LAMBDA0_OVERRIDES = ["aggregation.method=lora_fair", "aggregation.objective=frobenius", "aggregation.lam=0"]
GOAL_POINTS = 1.0
QUICK_RESULTS = Path(tempfile.gettempdir()) / "fairedge-dino-study-quick"


def variants(partition: str, methods: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """The partition's runs by kind: federated (the methods and λ = 0), centralised, centralised large batch."""
    p = f"data.partition={partition}"
    federated = {f"{partition}/{m}": [p, f"aggregation.method={m}"] for m in methods}
    federated[f"{partition}/{LAMBDA0}"] = [p, *LAMBDA0_OVERRIDES]
    return {
        "federated": federated,
        "centralised": {f"{partition}/{CENTRAL}": [p]},
        "large batch": {f"{partition}/{LARGE_BATCH}": [p]},
    }


def simulate_inprocess(cfg: RunConfig) -> RunRecord:
    """A federated run with the in-process engine: clients one after another, sharing this process's cache."""
    from fairedge.simulations.simulate import simulate

    return simulate(cfg, new_run_dir(cfg), engine="inprocess")


RUNNERS = {
    "federated": simulate_inprocess,
    "centralised": lambda cfg: centralised(cfg)[0],
    "large batch": lambda cfg: centralised(cfg, large_batch=True)[0],
}


def run_replays(config: str, partitions: Sequence[str], seed: int, common: Sequence[str], out: Path) -> None:
    """Replay LoRA-FAIR's federation of `seed` per partition (aggregation error per round); skip finished ones."""
    rows = load_rows(out)
    for p in partitions:
        label = f"{p}/replay"
        cfg = sweep_config(config, label, [f"data.partition={p}", "aggregation.method=lora_fair"], seed, common)
        if any(r["variant"] == label and r["config_hash"] == config_hash(cfg) for r in rows):
            continue
        started = time.time()
        rounds = replay(cfg, "lora_fair")
        rows.append(
            {"variant": label, "seed": seed, "config_hash": config_hash(cfg), "rounds": rounds,
             "wall_seconds": time.time() - started}
        )  # fmt: skip
        save_rows(out, rows)


@dataclass(frozen=True)
class Invocation:
    """What one invocation runs: its results folder, the overrides of every run, seeds, methods, size."""

    results: Path
    common: list[str]
    seeds: list[int]
    methods: list[str]
    wanted: int
    estimate_hours: float


# --- the report ---------------------------------------------------------------------------------


def _pts(values: Sequence[float]) -> str:
    n = len(values)
    return f"{mean_std(values, '{:+.2f}', empty='–')} ({n} seed{'s' * (n != 1)})"


def goal_lines(by: dict[str, list[dict]]) -> list[str]:
    """The study's goal, paired by seed: LoRA-FAIR ≥ FedIT + 1 point; centralised − LoRA-FAIR ≤ 1 point."""
    out = []
    checks = (
        ("lora_fair", "fedit", "LoRA-FAIR − FedIT", lambda m: m >= GOAL_POINTS, f"≥ +{GOAL_POINTS:g}"),
        (CENTRAL, "lora_fair", "centralised − LoRA-FAIR", lambda m: m <= GOAL_POINTS, f"≤ {GOAL_POINTS:g}"),
    )
    for a, b, name, ok, want in checks:
        d = paired_points(by.get(a) or [], by.get(b) or [])
        if d:
            verdict = "met" if ok(statistics.mean(d)) else "not met"
            out.append(f"- Goal {name} {want} point: {_pts(d)} points of final mean accuracy — **{verdict}**.")
    return out


def drift_lines(by: dict[str, list[dict]]) -> list[str]:
    """What aggregation error and client drift cost, paired by seed, and LoRA-FAIR λ = 0 against λ = 0.01."""
    pairs = (
        ("fedex_lora", "fedit", "aggregation error (FedEx-LoRA, exact, − FedIT)"),
        (LARGE_BATCH, "fedex_lora", "client drift (centralised large batch − FedEx-LoRA)"),
        ("lora_fair", "fedit", "LoRA-FAIR's correction (LoRA-FAIR − FedIT)"),
        (LAMBDA0, "lora_fair", "λ = 0 (LoRA-FAIR Frobenius λ=0 − LoRA-FAIR cosine λ=0.01)"),
    )
    acc = [
        f"- {label}: final mean accuracy {percent([r['summary']['final_mean_accuracy'] for r in by[key]])} %"
        for key, label in (
            (LAMBDA0, "LoRA-FAIR λ=0 (Frobenius, unregularised)"),
            (LARGE_BATCH, "centralised, large batch"),
        )
        if by.get(key)
    ]
    return acc + [
        f"- {name}: {_pts(d)} points" for a, b, name in pairs if (d := paired_points(by.get(a) or [], by.get(b) or []))
    ]


def replay_table(rounds: Sequence[dict[str, float]]) -> str:
    """Per round: rank90 of the update and each candidate's relative error (`aggregation_bias`)."""
    lines = [
        "| round | rank90(U) | " + " | ".join(f"err {c}" for c in CANDIDATES) + " |",
        "|---|---|" + "---|" * len(CANDIDATES),
    ]
    for r in rounds:
        errs = " | ".join(f"{r[f'err/{c}']:.3f}" for c in CANDIDATES)
        lines.append(f"| {r['round']} | {r['rank90']:.1f} | {errs} |")
    return "\n".join(lines)


def report(args: argparse.Namespace, study: Invocation) -> str:
    """Write the markdown and the plot from the JSON's rows of this invocation; return the markdown."""
    out = study.results
    rows, replays = load_rows(out / f"{FILE}.json"), load_rows(out / f"{FILE}_bias.json")
    cfg = load_config(args.config, study.common)
    f = cfg.federation
    tables: dict[str, dict[str, list[dict]]] = {}
    for p in args.partitions:
        picked = {
            label.split("/", 1)[1]: select(rows, args.config, label, o, study.seeds, study.common)
            for kind in variants(p, study.methods).values()
            for label, o in kind.items()
        }
        tables[p] = picked
    wall, cpu = measured_hours([r for by in tables.values() for rs in by.values() for r in rs])
    md = [
        "# Aggregation methods vs centralised LoRA on a pre-trained DINOv2 (digit-shift)",
        "",
        *(["**QUICK SMOKE (`--quick`): a test of the pipeline, not a result.**", ""] if args.quick else []),
        f"Model: {cfg.model.path or 'the built-in DINOv2 ViT-S/14'} at {cfg.model.image_size} px; LoRA rank "
        f"{cfg.lora.rank} (alpha {cfg.lora.alpha}) on q/v of the **top {cfg.lora.top_layers} blocks only** "
        "(`lora.top_layers`, the study's cheaper mode); the frozen blocks below run once per image and process "
        "(`model.frozen_cache_mb`: the same logits as the whole model, a step runs only the top blocks). Data: "
        f"digit-shift domains {', '.join(cfg.data.domains or [])}, {cfg.data.samples_per_domain} samples each "
        f"(test fraction {cfg.data.test_fraction}), one client per domain ({f.num_clients} clients); {f.rounds} round{'s' * (f.rounds != 1)} "
        f"of {f.local_steps} local steps of batch {f.batch_size}, lr {f.lr} ({f.optimizer}), uncompressed updates. "
        f"Seeds {study.seeds}. Centralised: the pooled client data, `local_steps × num_clients` = "
        f"{f.local_steps * f.num_clients} steps of batch {f.batch_size} per round; centralised large batch: "
        f"`local_steps` = {f.local_steps} steps of batch {f.batch_size * f.num_clients} per round.",
        "",
        "Regenerate or resume (finished runs in the JSON are reused):",
        "",
        "```bash",
        command(args),
        "```",
        "",
        f"Runs: {sum(len(rs) for by in tables.values() for rs in by.values())} of {study.wanted} in "
        f"`{display(out / f'{FILE}.json')}`; they took {wall:.2f} wall-hours ({cpu:.2f} CPU-hours); "
        f"estimated beforehand: {study.estimate_hours:.2f} wall-hours, {study.estimate_hours * setup.CORES:.2f} "
        f"CPU-hours on {setup.CORES} cores. Accuracy in %, mean ± sample std over seeds; differences in points, "
        "paired by seed.",
        "",
        *step_time_lines(out),
    ]
    for p, by in tables.items():
        main = {m: by[m] for m in [*study.methods, CENTRAL]}
        md += [f"## {p} non-IID", "", table(main), "", *goal_lines(by), "", "λ = 0, drift vs aggregation:", ""]
        md += drift_lines(by)
        rep = [r for r in replays if r["variant"] == f"{p}/replay"]
        if rep:
            md += [
                "",
                f"Replay of LoRA-FAIR's federation, seed {rep[-1]['seed']}: relative error of each rule's next global "
                "product against the round's update `U` (0 = kept exactly, 1 = lost), mean over the adapted layers "
                "(`aggregation_bias`: best_B = the best correction of B alone, best_rank_r = the best rank-r product).",
                "",
                replay_table(rep[-1]["rounds"]),
            ]
        md.append("")
    md += [f"![mean accuracy per round]({FILE}.png)", "", "Config of every run (here `feature`/`lora_fair`, seed "
           f"{study.seeds[0]}; the others differ in `data.partition`, `aggregation.*`, `seed`, `name`):", "",
           "```toml", run_sections(sweep_config(args.config, "feature/lora_fair", variants("feature", ["lora_fair"])[
               "federated"]["feature/lora_fair"], study.seeds[0], study.common)), "```", ""]  # fmt: skip
    text = "\n".join(md)
    atomic_write_text(out / f"{FILE}.md", text)
    title = f"DINOv2 top-{cfg.lora.top_layers} LoRA on digit-shift: mean accuracy per round, seeds {study.seeds}"
    plot(tables, out / f"{FILE}.png", title + (" (QUICK SMOKE)" if args.quick else ""))
    return text


def run_sections(cfg: RunConfig) -> str:
    """The config as TOML without the sections a simulated training run does not read (edge, cloud, privacy off)."""
    text = to_toml(cfg)
    kept = [part for part in text.split("\n[") if not part.startswith(("edge]", "cloud]", "privacy", "tracking]"))]
    return "\n[".join(kept).strip()


def step_time_lines(out: Path) -> list[str]:
    path = out / "dino_step_time.json"
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    sec = m["cpu_seconds_per_step"]
    cells = ", ".join(f"{k} {v:.3f}" for k, v in sec.items())
    ratio = sec["whole model"] / sec["top blocks, cached"]
    return [
        f"Step time on the machine of `{m['command']}` (CPU-s per step): {cells}; whole / cached = {ratio:.1f}x.",
        "",
    ]


def command(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "fairedge.simulations.dino_aggregation_study"]
    parts += ["--quick"] if args.quick else []
    parts += ["--seeds", *map(str, args.seeds)] if args.seeds else []
    parts += ["--partitions", *args.partitions] if list(args.partitions) != list(PARTITIONS) else []
    parts += ["--methods", *args.methods] if args.methods else []
    for o in args.overrides:
        parts += ["--set", o]
    if Path(args.config).resolve() != setup.VISION_CONFIG.resolve():
        parts += ["--config", args.config]
    parts += ["--out", args.out] if args.out else []
    return shlex.join(parts)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--partitions", nargs="+", choices=PARTITIONS, default=list(PARTITIONS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: all six")
    parser.add_argument("--quick", action="store_true", help=f"a smoke, not a result (writes to {QUICK_RESULTS})")
    parser.add_argument("--out", default=None, help=f"results folder (default: {display(RESULTS)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", default=str(setup.VISION_CONFIG), help="base config (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--measure", action="store_true", help="only measure this machine's step times")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s = setup.QUICK if args.quick else setup.FULL
    out = Path(args.out) if args.out else QUICK_RESULTS if args.quick else RESULTS
    if args.quick and out.resolve() == RESULTS.resolve():
        raise SystemExit(f"--quick is a smoke, not a result: give --out a folder other than {display(RESULTS)}")
    common = [*s.overrides(), *([f"output_dir={out / 'runs'}"] if args.quick else []), *args.overrides]
    cfg = load_config(args.config, common)  # a bad --set fails before anything runs
    if args.measure:
        seconds = setup.measure_step_seconds(cfg)
        atomic_write_json(out / "dino_step_time.json", {"command": command(args) + " --measure",
                          "cpu_seconds_per_step": seconds, "config": cfg.model_dump(mode="json")})  # fmt: skip
        text = json.dumps(seconds, indent=1)
        print(text)
        return text
    seeds = list(args.seeds or s.seeds)
    methods = list(args.methods or (QUICK_METHODS if args.quick else METHODS))
    n_fed = len(args.partitions) * (len(methods) + 1) * len(seeds)
    n_central = len(args.partitions) * 2 * len(seeds)
    hours = setup.estimate_seconds(s, n_fed, n_central, len(args.partitions)) / 3600
    print(
        f"DINOv2 aggregation study: {n_fed} federated + {n_central} centralised runs + {len(args.partitions)} replays; "
        f"estimate {hours:.2f} wall-hours = {hours * setup.CORES:.2f} CPU-hours on {setup.CORES} cores "
        f"({s.run_seconds() / 60:.1f} min per federated run). Results: {display(out)}. Stop any time; rerun to resume.",
        flush=True,
    )
    study = Invocation(out, common, seeds, methods, n_fed + n_central, hours)
    for seed in seeds:  # seed-major; the references and replay with their seed
        frozen_cache.clear()  # another seed draws other images: the last seed's entries would never be met again
        for p in args.partitions:
            for kind, labelled in variants(p, methods).items():
                run_sweep(args.config, labelled, [seed], out / f"{FILE}.json", common, run=RUNNERS[kind])
        if seed == seeds[0]:
            run_replays(args.config, args.partitions, seed, common, out / f"{FILE}_bias.json")
    text = report(args, study)
    print(text)
    return text


if __name__ == "__main__":
    main()
