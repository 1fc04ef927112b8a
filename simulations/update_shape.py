"""Why top-k keeps little of a client's update: the shape of real LoRA updates, and what ComPEFT loses of them.

ComPEFT was designed for task vectors after long fine-tuning, whose entries are heavy-tailed: a few percent of
them carry most of the change, so keeping the top k % as sign × one scale loses little. A client's update in
a federated round is a handful of optimizer steps. With AdamW every entry moves by about `lr` per step
whatever its gradient's size, so the update is flat: bounded by `local_steps × lr`, with a kurtosis below a
Gaussian's 3 (a uniform distribution has 1.8). This measures it on one round of real client updates:

    python -m fairedge.simulations.update_shape --lm-study [--set federation.optimizer=sgd ...]
    python -m fairedge.simulations.update_shape [--config C] [--set KEY=VALUE ...]

Per client: max |Δ| against `local_steps × lr`, the kurtosis, the share of the update's energy (Σ Δ²) held by
its top k % entries (a Gaussian's share beside it), and the relative error ‖decode(encode(Δ)) − Δ‖ / ‖Δ‖ of
the codec at each density for alpha ∈ {1, 2, 3} and both scopes — what one round without error feedback
loses. Writes `simulations/results/update_shape-<lm or partition>-<optimizer>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.compression import Scope, compress, decompress
from fairedge.common.config import RunConfig, load_config
from fairedge.simulations import lm_study_setup
from fairedge.simulations.paths import CONFIG, RESULTS, display
from fairedge.simulations.real_deltas import collect_deltas

DENSITIES = (0.05, 0.1, 0.2)
ALPHAS = (1.0, 2.0, 3.0)
SCOPES: tuple[Scope, ...] = ("global", "tensor")
GAUSSIAN_SAMPLES = 1 << 20


def top_energy(values: torch.Tensor, density: float) -> float:
    """Share of Σ v² held by the `density` fraction of entries largest in magnitude."""
    kept = values.abs().topk(max(1, int(density * values.numel()))).values
    return float(kept.pow(2).sum() / values.pow(2).sum())


def kurtosis(values: torch.Tensor) -> float:
    """E[(v − mean)⁴] / var²: 3 for a Gaussian, 1.8 for a uniform distribution, larger for heavy tails."""
    centred = values.double() - values.double().mean()
    return float(centred.pow(4).mean() / centred.pow(2).mean().pow(2))


def codec_error(update: dict[str, torch.Tensor], density: float, alpha: float, scope: Scope) -> float:
    """‖decode(encode(update)) − update‖ / ‖update‖ over the whole adapter."""
    shapes = {name: tuple(t.shape) for name, t in update.items()}
    decoded = decompress(compress(update, density=density, alpha=alpha, scope=scope), expected=shapes)
    error = sum(float((decoded[n] - t).pow(2).sum()) for n, t in update.items())
    return (error / sum(float(t.pow(2).sum()) for t in update.values())) ** 0.5


def client_row(update: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The shape figures of one client's update."""
    flat = torch.cat([t.reshape(-1) for t in update.values()])
    return {
        "values": flat.numel(),
        "max_abs": float(flat.abs().max()),
        "kurtosis": kurtosis(flat),
        "energy": {f"{k:g}": top_energy(flat, k) for k in DENSITIES},
        "codec_error": {
            f"{k:g}/{scope}/{a:g}": codec_error(update, k, a, scope)
            for k in DENSITIES
            for scope in SCOPES
            for a in ALPHAS
        },
    }


def gaussian_energy(seed: int) -> dict[str, float]:
    """The top-k energy shares of a Gaussian vector: the heavy-tail-free reference."""
    g = torch.randn(GAUSSIAN_SAMPLES, generator=torch.Generator().manual_seed(seed))
    return {f"{k:g}": top_energy(g, k) for k in DENSITIES}


def measure(cfg: RunConfig) -> dict[str, Any]:
    """Collect one round of client updates under `cfg` and measure each."""
    deltas = collect_deltas(cfg)
    clients: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in deltas.items():
        client, name = key.split("/", 1)
        clients.setdefault(client, {})[name] = tensor
    rows = {client: client_row(update) for client, update in clients.items()}
    return {"clients": rows, "gaussian_energy": gaussian_energy(cfg.seed)}


def _median(rows: dict[str, dict[str, Any]], *path: str) -> float:
    values = []
    for row in rows.values():
        value: Any = row
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def summary(path: Path) -> dict[str, Any] | None:
    """Medians over clients of a saved measurement (for other reports to cite); None if `path` is missing."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    rows, f = saved["clients"], saved["config"]["federation"]
    return {
        "file": path.name,
        "command": saved["command"],
        "optimizer": f["optimizer"],
        "cap": f["local_steps"] * f["lr"],
        "max_abs": _median(rows, "max_abs"),
        "kurtosis": _median(rows, "kurtosis"),
        "energy": {k: _median(rows, "energy", f"{k:g}") for k in DENSITIES},
        "gaussian_energy": {k: saved["gaussian_energy"][f"{k:g}"] for k in DENSITIES},
        "codec_error": {k: {a: _median(rows, "codec_error", f"{k:g}/global/{a:g}") for a in ALPHAS} for k in DENSITIES},
    }


def report(result: dict[str, Any], cfg: RunConfig, config: Path, command: str) -> str:
    """Markdown: per-client shape, then the codec's error per density, scope and alpha (median over clients)."""
    f = cfg.federation
    rows, gauss = result["clients"], result["gaussian_energy"]
    cap = f.local_steps * f.lr
    lines = [
        "# The shape of real client updates, and what ComPEFT loses of them",
        "",
        f"Config `{display(config)}` (+ the overrides in the command), run name `{cfg.name}`, seed {cfg.seed}: "
        f"{f.num_clients} clients, round 1, {f.local_steps} local {f.optimizer} steps at lr {f.lr:g} "
        f"(batch {f.batch_size}), LoRA rank {cfg.lora.rank}. Δ = a client's change of its LoRA factors.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| client | values | max abs Δ | local_steps × lr | kurtosis (Gaussian 3) | "
        + " | ".join(f"energy in top {k:.0%} (Gaussian {gauss[f'{k:g}']:.3f})" for k in DENSITIES)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(DENSITIES),
    ]
    for client, row in rows.items():
        lines.append(
            f"| {client} | {row['values']:,} | {row['max_abs']:.4g} | {cap:.4g} | {row['kurtosis']:.2f} | "
            + " | ".join(f"{row['energy'][f'{k:g}']:.3f}" for k in DENSITIES)
            + " |"
        )
    lines += [
        "",
        "Relative error of one round's update through the codec, ‖decode(encode(Δ)) − Δ‖ / ‖Δ‖ (median over "
        "clients; 1.0 = nothing of the update survives; without error feedback this is lost for good):",
        "",
        "| density | scope | " + " | ".join(f"alpha {a:g}" for a in ALPHAS) + " |",
        "|---|---|" + "---|" * len(ALPHAS),
    ]
    for k in DENSITIES:
        for scope in SCOPES:
            errors = [_median(rows, "codec_error", f"{k:g}/{scope}/{a:g}") for a in ALPHAS]
            lines.append(f"| {k:.0%} | {scope} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")
    kurt = _median(rows, "kurtosis")
    top = max(DENSITIES)
    energy = _median(rows, "energy", f"{top:g}")
    shape = "flatter than" if kurt < 3 else "heavier-tailed than"
    lines += [
        "",
        f"Median kurtosis {kurt:.2f}: the updates are {shape} a Gaussian. Their top {top:.0%} entries hold "
        f"{energy:.1%} of the energy (a Gaussian's: {gauss[f'{top:g}']:.1%}), so even before the ternary "
        f"rounding a top-{top:.0%} code drops {1 - energy:.1%} of Σ Δ².",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--lm-study", action="store_true", help="the LM studies' 8 roles and training (SmolLM2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config, overrides = args.config, args.overrides
    if args.lm_study:
        config = lm_study_setup.LM_CONFIG
        overrides = [*lm_study_setup.FULL.overrides(lm_study_setup.pick_roles(8)), *args.overrides]
    cfg = load_config(config, overrides)
    result = measure(cfg)
    command = shlex.join(
        ["python", "-m", "fairedge.simulations.update_shape", *(sys.argv[1:] if argv is None else argv)]
    )
    tag = f"{'lm' if args.lm_study else cfg.data.partition}-{cfg.federation.optimizer}"
    atomic_write_json(
        args.results / f"update_shape-{tag}.json",
        {"config": cfg.model_dump(mode="json"), "command": command, **result},
        sort_keys=False,
    )
    md = report(result, cfg, config, command)
    atomic_write_text(args.results / f"update_shape-{tag}.md", md)
    print(md)


if __name__ == "__main__":
    main()
