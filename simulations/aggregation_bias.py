"""How much of each round's client update survives aggregation? FedIT, LoRA-FAIR and two ceilings.

The federation's own metric, `cos(ΔW, B'Ā)` with `ΔW = Σ p_k B_k A_k`, compares whole products; after
round 1 it is ~0.99 for every rule because the product clients started from, `W_g = B_g A_g`, dominates
both sides. What training loses is the part of the round's update `U = ΔW − W_g` that the next global
product misses. This script replays the federation in one process (no Flower: same clients, seeds,
local steps and rule as a run of the config) and, every round and layer, measures for each candidate
next product `P` the relative error `‖U − (P − W_g)‖ / ‖U‖` (0 = the update kept exactly, 1 = as if
the round had not happened) and `cos(U, P − W_g)`:

    fedit          P = B̄Ā
    lora_fair      P = B'Ā, the configured λ and objective
    best_B         P = B*Ā, B* = ΔW Āᵀ(ĀĀᵀ)⁻¹: the best any correction of B alone can do (λ → 0)
    best_rank_r    P = the best rank-r approximation of ΔW (truncated SVD): the best any r-rank (A, B) can do

plus `rank90(U)`, the number of singular values holding 90 % of `‖U‖²` (clients' updates span up to K·r).
Dense matrices are fine here: the built-in ViT's layers are 64×64 / 64×128.

    python -m fairedge.simulations.aggregation_bias [--set data.partition=feature-label] [--method lora_fair]
    python -m fairedge.simulations.aggregation_bias --lm-study   # SmolLM2 on the LM studies' 8 roles

writes `simulations/results/aggregation_bias-<partition or lm>-<method>.json` and `.md`. With `--lm-study` the
replay is a run of `lm_aggregation_study` (its config, roles, rounds, local training and top-layer LoRA).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from fairedge.common.aggregation import ClientUpdate, lora_fair
from fairedge.common.aggregation.lora_fair import Objective
from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import load_config
from fairedge.common.task import client_partition, get_adapter, lora_model, set_adapter
from fairedge.common.training import client_round_seed, train_client_round
from fairedge.server.federation import configured_aggregator as make_aggregator
from fairedge.simulations import lm_study_setup
from fairedge.simulations.paths import CONFIG, RESULTS, display

CANDIDATES = ("fedit", "lora_fair", "best_B", "best_rank_r")


def _rel_err_cos(U: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    err = float((U - V).norm() / U.norm())
    cos = float((U * V).sum() / (U.norm() * V.norm()).clamp_min(1e-300))
    return err, cos


def layer_diagnostics(
    A: list[torch.Tensor], B: list[torch.Tensor], p: torch.Tensor, W_g: torch.Tensor, lam: float, objective: Objective
) -> dict[str, float]:
    """Update-preservation figures of one layer for every candidate (float64, dense)."""
    A = [a.double() for a in A]
    B = [b.double() for b in B]
    p = p.double()
    r = A[0].shape[0]
    dW = sum(pk * b @ a for pk, a, b in zip(p, A, B))
    A_bar = sum(pk * a for pk, a in zip(p, A))
    B_bar = sum(pk * b for pk, b in zip(p, B))
    _, B_fair = lora_fair(A, B, p, lam=lam, objective=objective)
    B_best = dW @ A_bar.T @ torch.linalg.pinv(A_bar @ A_bar.T)
    u, s, vh = torch.linalg.svd(dW, full_matrices=False)
    products = {
        "fedit": B_bar @ A_bar,
        "lora_fair": B_fair.double() @ A_bar,
        "best_B": B_best @ A_bar,
        "best_rank_r": (u[:, :r] * s[:r]) @ vh[:r],
    }
    U = dW - W_g.double()
    out: dict[str, float] = {}
    for name, P in products.items():
        out[f"err/{name}"], out[f"cos/{name}"] = _rel_err_cos(U, P - W_g.double())
    sv = torch.linalg.svdvals(U) ** 2
    out["rank90"] = float(int((torch.cumsum(sv, 0) / sv.sum() < 0.9).sum()) + 1)
    return out


def replay(cfg, method: str) -> list[dict[str, float]]:
    """Run the federation in-process with `method`; per round, the layer-mean diagnostics."""
    cfg = cfg.model_copy(update={"aggregation": cfg.aggregation.model_copy(update={"method": method})})
    aggregator = make_aggregator(cfg)
    model = lora_model(cfg)
    global_adapter = get_adapter(model)
    f = cfg.federation
    parts = [client_partition(cfg, k) for k in range(f.num_clients)]
    rows = []
    for rnd in range(1, f.rounds + 1):
        updates = []
        for k, data in enumerate(parts):
            set_adapter(model, global_adapter)
            train_client_round(model, data, f, seed=client_round_seed(cfg.seed, rnd, k))
            updates.append(ClientUpdate(get_adapter(model), len(data), k))
        p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        p = p / p.sum()
        per_layer = []
        for layer, (A_g, B_g) in global_adapter.factors.items():
            per_layer.append(
                layer_diagnostics(
                    [u.adapter.factors[layer][0] for u in updates],
                    [u.adapter.factors[layer][1] for u in updates],
                    p,
                    B_g.double() @ A_g.double(),
                    cfg.aggregation.lam,
                    cfg.aggregation.objective,
                )
            )
        row = {"round": rnd, **{k: statistics.mean(d[k] for d in per_layer) for k in per_layer[0]}}
        rows.append(row)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "round"), flush=True)
        global_adapter, _ = aggregator.aggregate(updates, global_adapter)
    return rows


def report(rows: list[dict[str, float]], cfg, method: str, command: str, config: Path = CONFIG) -> str:
    lines = [
        "# How much of each round's update survives aggregation",
        "",
        f"Config `{display(config)}` (+ the overrides in the command), run name `{cfg.name}`, seed {cfg.seed}, "
        f"partition {cfg.data.partition}, rule driving the federation: {method} (λ = {cfg.aggregation.lam}, "
        f"{cfg.aggregation.objective}); {cfg.federation.num_clients} clients × {cfg.federation.local_steps} local "
        f"steps, LoRA rank {cfg.lora.rank}. Mean over the adapted layers; "
        "err = ‖U − (P − W_g)‖/‖U‖ (lower is better), cos = cos(U, P − W_g).",
        "",
        "```bash",
        command,
        "```",
        "",
        "| round | rank90(U) | "
        + " | ".join(f"err {c}" for c in CANDIDATES)
        + " | "
        + " | ".join(f"cos {c}" for c in CANDIDATES)
        + " |",
        "|---|---|" + "---|" * (2 * len(CANDIDATES)),
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['rank90']:.1f} | "
            + " | ".join(f"{r[f'err/{c}']:.3f}" for c in CANDIDATES)
            + " | "
            + " | ".join(f"{r[f'cos/{c}']:.3f}" for c in CANDIDATES)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--method", default="lora_fair", help="the rule that drives the replayed federation")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--lm-study", action="store_true", help="replay a run of the LM aggregation study instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, overrides = CONFIG, args.overrides
    if args.lm_study:
        config = lm_study_setup.LM_CONFIG
        overrides = [*lm_study_setup.FULL.overrides(lm_study_setup.pick_roles(8)), *args.overrides]
    cfg = load_config(config, overrides)
    rows = replay(cfg, args.method)
    command = shlex.join(["python", "-m", "fairedge.simulations.aggregation_bias", *sys.argv[1:]])
    out = Path(args.results)
    tag = f"{'lm' if args.lm_study else cfg.data.partition}-{args.method}"
    atomic_write_json(
        out / f"aggregation_bias-{tag}.json",
        {"config": cfg.model_dump(mode="json"), "method": args.method, "command": command, "rounds": rows},
        sort_keys=False,
    )
    md = report(rows, cfg, args.method, command, config)
    atomic_write_text(out / f"aggregation_bias-{tag}.md", md)
    print(md)


if __name__ == "__main__":
    main()
