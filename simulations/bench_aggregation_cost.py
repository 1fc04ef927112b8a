"""What server aggregation costs: one layer (FedIT, LoRA-FAIR, the naive dense way,
FlexLoRA), LoRA-FAIR's switch between its two exact ways to `ΔW`, and a whole
SmolLM2-135M adapter per round.

    python -m fairedge.simulations.bench_aggregation_cost [--quick] [--parts layers,switch,smollm2]

Part `layers`: every (config, method) runs in a fresh subprocess on one torch thread:

1. build the clients' float32 factors (seeded), then reset the peak-RSS counter
   (`/proc/self/clear_refs`), run the method once and report `VmHWM − VmRSS
   before`: the extra resident memory the method needed at its peak, as the
   kernel saw it (torch's CPU allocator hands large blocks back, so this is live
   memory, not a cache);
2. time the method and FedIT alternately, a few times each, in that same
   process: the ratio to FedIT is taken between neighbouring measurements, so
   load from other processes on the machine hits both sides alike.

The dense LoRA-FAIR is the straightforward way to implement the paper: form
`ΔW` (float32), start `B'` from a small random matrix and run 500 Adam steps on
`1 − cos(ΔW, B'Ā) + λ‖B' − B̄‖²`. When a run would take more than a minute it is
timed for fewer steps and extrapolated linearly per step (said so in the table).

Part `switch`: LoRA-FAIR (cosine) with `ΔW` forced factored, forced dense, and
`auto`, on both sides of the point where the dense form gets cheaper
(`K·r ≈ mn/(m+n)` up to the constant of the flop count): one fresh process per
config, in which FedIT and the three take turns, so their ratios are side by side.

Part `smollm2`: a whole adapter of SmolLM2-135M's real LoRA layer shapes (30
decoder layers; attention: q/o 576×576, k/v 576→192; all-linear adds gate/up
576→1536 and down 1536→576), r = 16, K clients: `FedIT.aggregate` and
`LoraFair.aggregate` (auto, and both forms forced) alternately in one process,
so the ratios are side by side.

Writes `simulations/results/aggregation_cost.{md,json}` when all parts run;
`--parts` with fewer only prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from fairedge.common.aggregation.factored import gram_flops
from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.simulations.layer_aggregation_cost import (
    DENSE_BUDGET_S,
    DENSE_STEPS,
    LAM,
    SEED,
    SWITCH_FORMS,
    switch_worker,
    worker,
)
from fairedge.simulations.paths import RESULTS
from fairedge.simulations.smollm2_adapter_cost import (
    SMOLLM2_CLIENTS,
    SMOLLM2_LAYERS,
    SMOLLM2_RANK,
    SMOLLM2_SHAPES,
    SMOLLM2_TARGETS,
    adapter_worker,
)

SIZES = (768, 4096)
RANKS = (8, 16, 64)
CLIENTS = (10, 100)
METHODS = ("fedit", "lora_fair_cosine", "lora_fair_frobenius", "lora_fair_dense_adam", "flexlora")
HEADLINE = {"m": 4096, "r": 16, "K": 10}
HEADLINE_TARGET = 5.0
"""LoRA-FAIR (auto) within this many times FedIT's time at the headline config."""
HEADLINE_PROCESSES = 5
"""Fresh processes timing LoRA-FAIR (cosine) at the headline config (the table's row is the first); the
headline ratio is their median, since one process's ratio moves by ±5 % with the machine's load."""
SWITCH = ((768, 64, (2, 4, 6, 8, 10, 12, 16, 32, 100)), (4096, 16, (64, 128, 256)))
"""(m = n, r, clients): around the switch; `mn/(m+n)` is 384 and 2048."""
PARTS = ("layers", "switch", "smollm2")

# --- driver ---------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "torch_threads": 1,
        "load_average_at_start": os.getloadavg(),
    }


def _run(args: list[str], quick: bool) -> dict:
    cmd = [sys.executable, "-m", "fairedge.simulations.bench_aggregation_cost", *args]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_worker(m: int, r: int, K: int, method: str, quick: bool) -> dict:
    row = _run(["--worker", f"{m},{r},{K},{method}"], quick)
    print(
        f"m=n={m:5d} r={r:3d} K={K:4d} {method:26s} {_fmt_seconds(row['seconds_median']):>10s}"
        f"  ×FedIT {row['ratio_to_fedit']:9.3g}  peak +{row['peak_extra_bytes'] / 2**20:8.1f} MiB"
        + (f"  [{row['delta_form']}]" if "delta_form" in row else "")
        + ("  (extrapolated)" if row.get("extrapolated") else ""),
        flush=True,
    )
    return row


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _table(rows: list[dict]) -> str:
    head = (
        "| m=n | r | K | method | ΔW form | time/layer (median) | × FedIT | × FedIT (fastest runs) "
        "| peak extra memory | dense ΔW (fp32) | note |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        note = ""
        if row.get("extrapolated"):
            note = f"extrapolated from {row['steps_timed']} of {DENSE_STEPS} steps"
        elif row["method"] == "lora_fair_dense_adam":
            note = f"{DENSE_STEPS} steps"
        if "cos_fair" in row:
            note = f"cos {row['cos_fedit']:.4f} → {row['cos_fair']:.4f}"
        if "norm_seconds" in row:
            note += f"; ‖ΔW‖² Grams alone {_fmt_seconds(row['norm_seconds'])}"
        lines.append(
            f"| {row['m']} | {row['r']} | {row['K']} | {row['method']} | {row.get('delta_form', '')} "
            f"| {_fmt_seconds(row['seconds_median'])} "
            f"| {row['ratio_to_fedit']:.3g} | {row['ratio_to_fedit_of_minima']:.3g} "
            f"| {row['peak_extra_bytes'] / 2**20:.1f} MiB "
            f"| {row['m'] * row['n'] * 4 / 2**20:.0f} MiB | {note} |"
        )
    return "\n".join(lines)


def _switch_table(rows: list[dict]) -> str:
    lines = [
        "| m=n | r | K | K·r / (mn/(m+n)) | flops factored / dense | auto takes | faster forced "
        "| factored | dense | auto | auto / min(factored, dense) |",
        "|" + "---|" * 11,
    ]
    for s in rows:
        t, x = s["seconds_median"], s["ratio_to_fedit"]
        lines.append(
            f"| {s['m']} | {s['r']} | {s['K']} | {s['kr_over_threshold']:.2g} "
            f"| {s['flops']['factored'] / s['flops']['dense']:.2g} | {s['auto_form']} | {s['faster_forced_form']} "
            + "".join(f"| {_fmt_seconds(t[f])} ({x[f]:.3g}×) " for f in SWITCH_FORMS)
            + f"| {s['auto_over_best']:.2f} |"
        )
    return "\n".join(lines)


def _adapter_table(rows: list[dict]) -> str:
    lines = [
        "| targets | LoRA layers | K | method | server time/round (median) | × FedIT | × FedIT (fastest runs) "
        "| auto: layers factored / dense |",
        "|" + "---|" * 8,
    ]
    for row in rows:
        forms = f"{row['auto_forms']['factored']} / {row['auto_forms']['dense']}"
        for name, res in row["methods"].items():
            lines.append(
                f"| {row['targets']} | {row['layers']} | {row['K']} | {name} | {_fmt_seconds(res['seconds_median'])} "
                f"| {res['ratio_to_fedit']:.3g} | {res['ratio_to_fedit_of_minima']:.3g} "
                f"| {forms if name == 'lora_fair' else ''} |"
            )
    return "\n".join(lines)


def _headline(rows: list[dict], switch: list[dict], more_runs: list[dict] | None = None) -> dict:
    """The headline config's figures; `more_runs`: further fresh-process rows of LoRA-FAIR (cosine) there,
    whose times and ratios to FedIT join the table row's in one median each."""
    pick = {
        row["method"]: row
        for row in rows
        if (row["m"], row["r"], row["K"]) == (HEADLINE["m"], HEADLINE["r"], HEADLINE["K"])
    }
    if not {"lora_fair_cosine", "lora_fair_dense_adam"} <= pick.keys():
        return {}
    fair, dense = pick["lora_fair_cosine"], pick["lora_fair_dense_adam"]
    runs = [fair, *(more_runs or [])]
    ratios = [run["ratio_to_fedit"] for run in runs]
    minima = [run["ratio_to_fedit_of_minima"] for run in runs]
    seconds = statistics.median(run["seconds_median"] for run in runs)
    mn_bytes = fair["m"] * fair["n"] * 4
    auto_over_best = [s["auto_over_best"] for s in switch]
    out = {
        "config": HEADLINE,
        "lora_fair_seconds": seconds,
        "lora_fair_form": fair["delta_form"],
        "dense_adam_seconds": dense["seconds_median"],
        "speedup_vs_dense_adam": dense["seconds_median"] / seconds,
        "lora_fair_over_fedit": statistics.median(ratios),
        "lora_fair_over_fedit_per_process": ratios,
        "lora_fair_over_fedit_of_minima": statistics.median(minima),
        "norm_grams_over_fedit": fair["norm_seconds"] / fair["fedit_seconds_median"],
        "norm_grams_gflops": gram_flops(fair["K"] * fair["r"], fair["m"] + fair["n"]) / fair["norm_seconds"] / 1e9,
        "frobenius_over_fedit": pick["lora_fair_frobenius"]["ratio_to_fedit"]
        if "lora_fair_frobenius" in pick
        else None,
        "lora_fair_peak_extra_bytes": fair["peak_extra_bytes"],
        "dense_fp32_matrix_bytes": mn_bytes,
        "switch_auto_over_best_median": statistics.median(auto_over_best) if switch else None,
        "switch_auto_over_best_max": max(auto_over_best) if switch else None,
        "switch_auto_took_faster": sum(s["auto_form"] == s["faster_forced_form"] for s in switch),
        "switch_configs": len(switch),
        "targets_met": {
            "speedup_vs_dense_adam >= 1000": dense["seconds_median"] / seconds >= 1000,
            f"lora_fair_over_fedit <= {HEADLINE_TARGET:g}": statistics.median(ratios) <= HEADLINE_TARGET,
            "peak_extra < one m×n fp32 matrix": fair["peak_extra_bytes"] < mn_bytes,
        },
    }
    if switch:
        out["targets_met"]["auto takes the faster forced form in every switch row"] = out[
            "switch_auto_took_faster"
        ] == len(switch)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter dense budget, fewer configs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}; fewer only print")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-worker", help=argparse.SUPPRESS)
    parser.add_argument("--switch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        m, r, K, method = args.worker.split(",")
        print(json.dumps(worker(int(m), int(r), int(K), method, args.quick)))
        return
    if args.switch_worker:
        m, r, K = (int(x) for x in args.switch_worker.split(","))
        print(json.dumps(switch_worker(m, r, K, args.quick)))
        return
    if args.adapter_worker:
        targets, K = args.adapter_worker.split(",")
        print(json.dumps(adapter_worker(targets, int(K), args.quick)))
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"--parts: unknown part(s) {unknown}; allowed: {list(PARTS)}")

    started = time.time()
    machine = _machine()
    rows, switch, adapter_rows, headline_runs = [], [], [], []
    if "layers" in parts:
        for m in SIZES:
            for r in RANKS:
                for K in CLIENTS:
                    for method in METHODS:
                        rows.append(_run_worker(m, r, K, method, args.quick))
        headline_runs = [
            _run_worker(HEADLINE["m"], HEADLINE["r"], HEADLINE["K"], "lora_fair_cosine", args.quick)
            for _ in range(HEADLINE_PROCESSES - 1)
        ]
    if "switch" in parts:
        for m, r, clients in SWITCH[:1] if args.quick else SWITCH:
            for K in clients:
                row = _run(["--switch-worker", f"{m},{r},{K}"], args.quick)
                switch.append(row)
                print(
                    f"switch m=n={m:5d} r={r:3d} K={K:4d} auto→{row['auto_form']:8s} "
                    + "  ".join(f"{f} {_fmt_seconds(row['seconds_median'][f])}" for f in SWITCH_FORMS)
                    + f"  auto/best {row['auto_over_best']:.2f}",
                    flush=True,
                )
    if "smollm2" in parts:
        for targets in SMOLLM2_TARGETS:
            for K in SMOLLM2_CLIENTS:
                row = _run(["--adapter-worker", f"{targets},{K}"], args.quick)
                adapter_rows.append(row)
                print(
                    f"SmolLM2 {targets:10s} K={K:3d} "
                    + "  ".join(
                        f"{n} {_fmt_seconds(v['seconds_median'])} ({v['ratio_to_fedit']:.3g}×)"
                        for n, v in row["methods"].items()
                    ),
                    flush=True,
                )
    machine["load_average_at_end"] = os.getloadavg()
    headline = _headline(rows, switch, headline_runs)
    report = {
        "config": {
            "sizes": SIZES,
            "ranks": RANKS,
            "clients": CLIENTS,
            "switch": SWITCH,
            "smollm2": {
                "layers": SMOLLM2_LAYERS,
                "shapes": SMOLLM2_SHAPES,
                "targets": SMOLLM2_TARGETS,
                "rank": SMOLLM2_RANK,
                "clients": SMOLLM2_CLIENTS,
            },
            "lam": LAM,
            "dense_steps": DENSE_STEPS,
            "dense_budget_s": DENSE_BUDGET_S,
            "seed": SEED,
            "quick": args.quick,
            "dtype_inputs": "float32",
        },
        "machine": machine,
        "wall_seconds": time.time() - started,
        "headline": headline,
        "rows": rows,
        "headline_runs": headline_runs,
        "switch": switch,
        "smollm2": adapter_rows,
    }
    if set(parts) == set(PARTS):
        atomic_write_json(RESULTS / "aggregation_cost.json", report, indent=2, sort_keys=False)
        atomic_write_text(RESULTS / "aggregation_cost.md", _markdown(report))
    print()
    print(_markdown(report))


def _switch_misses(switch: list[dict]) -> str:
    """Where auto took the form that was slower when forced, and by how much the two forced forms differed."""
    misses = []
    for row in switch:
        if row["auto_form"] != row["faster_forced_form"]:
            t = row["seconds_median"]
            slower, faster = t[row["auto_form"]], t[row["faster_forced_form"]]
            misses.append(
                f"{row['m']}², r {row['r']}, K {row['K']}: {row['auto_form']} {_fmt_seconds(slower)} against "
                f"{row['faster_forced_form']} {_fmt_seconds(faster)} forced, {100 * (slower / faster - 1):.1f} % apart"
            )
    return f"; where it did not: {'; '.join(misses)}" if misses else ""


def _markdown(report: dict) -> str:
    h, mach, cfg = report["headline"], report["machine"], report["config"]
    lines = [
        "# Aggregation cost: per LoRA layer, LoRA-FAIR's dense/factored switch, a whole SmolLM2 adapter",
        "",
        "Generated by `python -m fairedge.simulations.bench_aggregation_cost`"
        + (" --quick" if cfg["quick"] else "")
        + f" in {report['wall_seconds'] / 60:.1f} min.",
        f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs, torch {mach['torch']} ({mach['blas']}), "
        f"1 torch thread; load average {mach['load_average_at_start'][0]:.1f} at start, "
        f"{mach['load_average_at_end'][0]:.1f} at end. Machines here are shared virtual "
        "machines: absolute times are noisy, so every ratio to FedIT is taken between FedIT and the "
        "method timed alternately in the same process, and medians are reported.",
        f"Inputs: float32 client factors, seed {cfg['seed']}, λ = {cfg['lam']}.",
        "",
        "- **time/layer**: median over repetitions in a fresh process; **× FedIT**: median method time over",
        "  median FedIT time, both measured alternately in that process; **fastest runs**: the same with the",
        "  minima, which other load on the machine inflates least.",
        "- **ΔW form**: how LoRA-FAIR got `M = ΔW Āᵀ` and `‖ΔW‖²`: *factored* (two `Kr×Kr` Grams, one BLAS",
        "  `syrk` each, `(Kr)²(m+n)` flops, never `m×n`) or *dense* (`ΔW` formed once, `2mn·Kr` flops).",
        "  `lora_fair_cosine` and `lora_fair_frobenius` are `auto`: per layer the form with fewer flops",
        "  (`delta_form_flops`), i.e. factored while `K·r ≲ 1.3·mn/(m+n)`. The frobenius variant without",
        "  metrics needs no `‖ΔW‖²` and stays factored. Both forms give the same `B'` (tested to 1e-9 in float64).",
        "- **peak extra memory**: peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`) minus the",
        "  resident set just before the call, inputs already built; **dense ΔW (fp32)** is one `m×n` float32 matrix.",
        "- **lora_fair_dense_adam**: dense ΔW, random start, 500 Adam steps (lr 1e-3), float32: the naive way.",
        "  Runs estimated over a minute are timed for fewer steps and extrapolated linearly per step.",
        "- FlexLoRA computes in float64; its QR + SVD of the `Kr×Kr` core is as costly as a dense SVD once",
        "  `K·r ≥ min(m, n)`.",
        "",
    ]
    if h:
        t = h["targets_met"]
        target = f"lora_fair_over_fedit <= {HEADLINE_TARGET:g}"
        per_process = h.get("lora_fair_over_fedit_per_process", [h["lora_fair_over_fedit"]])
        lines += [
            f"## Headline: m = n = {h['config']['m']}, r = {h['config']['r']}, K = {h['config']['K']}",
            "",
            f"- LoRA-FAIR (cosine, auto → {h['lora_fair_form']}): {_fmt_seconds(h['lora_fair_seconds'])} per layer, "
            f"{h['lora_fair_over_fedit']:.3g}× FedIT ({'met' if t[target] else 'MISSED'}: ≤ {HEADLINE_TARGET:g}×; "
            f"median of {len(per_process)} fresh processes: {' / '.join(f'{x:.2f}' for x in per_process)}; "
            f"{h['lora_fair_over_fedit_of_minima']:.3g}× comparing fastest runs). Its `‖ΔW‖²` Grams "
            f"(two float32 `Kr×Kr` products, the least any exact method needs here) alone take "
            f"{h['norm_grams_over_fedit']:.3g}× FedIT's time, at {h['norm_grams_gflops']:.0f} GFLOP/s on one core.",
            *(
                [
                    f"- LoRA-FAIR (frobenius, which needs no `‖ΔW‖²`): {h['frobenius_over_fedit']:.3g}× FedIT "
                    f"({'met' if h['frobenius_over_fedit'] <= HEADLINE_TARGET else 'MISSED'}: ≤ {HEADLINE_TARGET:g}×)."
                ]
                if h.get("frobenius_over_fedit") is not None
                else []
            ),
            f"- dense Adam way: {_fmt_seconds(h['dense_adam_seconds'])}: LoRA-FAIR is "
            f"{h['speedup_vs_dense_adam']:.0f}× faster "
            f"({'met' if t['speedup_vs_dense_adam >= 1000'] else 'MISSED'}: ≥ 1000×)",
            f"- peak extra memory {h['lora_fair_peak_extra_bytes'] / 2**20:.1f} MiB vs "
            f"{h['dense_fp32_matrix_bytes'] / 2**20:.0f} MiB for one dense fp32 ΔW "
            f"({'met' if t['peak_extra < one m×n fp32 matrix'] else 'MISSED'}: no m×n allocation)",
        ]
        if h["switch_configs"]:
            key = "auto takes the faster forced form in every switch row"
            lines.append(
                f"- switch: auto took the form that was faster when forced in {h['switch_auto_took_faster']} of "
                f"{h['switch_configs']} configurations ({'met' if t[key] else 'MISSED'}: all); auto's time over "
                f"min(factored, dense): median {h['switch_auto_over_best_median']:.2f}, largest "
                f"{h['switch_auto_over_best_max']:.2f} (the same computation as the form it takes, so what is "
                "left is timing noise)" + _switch_misses(report["switch"])
            )
        lines.append("")
    if report["switch"]:
        lines += [
            "## The switch: LoRA-FAIR (cosine) with ΔW forced factored, forced dense, and auto",
            "",
            "One process per configuration, in which FedIT and the three take turns; times are medians, `(…×)` the",
            "ratio to FedIT's median in that process.",
            "`mn/(m+n)` is where the two forms' leading flop counts would meet with full Grams; `sq_norm` forms one",
            "triangle of each (BLAS `syrk`, counted at 1.5× its flops for its lower rate: `gram_cost`; in slabs of",
            "the upper block triangle once `K·r > 2048`), which moves the switch to about 1.3 times that.",
            "",
            _switch_table(report["switch"]),
            "",
        ]
    if report["smollm2"]:
        lines += [
            f"## A whole SmolLM2-135M adapter per round ({cfg['smollm2']['layers']} layers, r = "
            f"{cfg['smollm2']['rank']})",
            "",
            "`FedIT.aggregate` and `LoraFair.aggregate` (cosine, with its per-layer metrics) on every LoRA layer of",
            "the adapter, taking turns in one process. Shapes (B is m×r, A is r×n): q_proj, o_proj 576×576;",
            "k_proj, v_proj 576→192 (B 192×r, A r×576); all-linear adds gate_proj, up_proj 576→1536 and",
            "down_proj 1536→576.",
            "",
            _adapter_table(report["smollm2"]),
            "",
        ]
    if report["rows"]:
        lines += ["## All per-layer configurations", "", _table(report["rows"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
