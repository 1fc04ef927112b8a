"""Benchmark the ComPEFT codec: bits per parameter vs the entropy bound, and single-core speed.

    python -m fairedge.simulations.bench_compression [--deltas deltas.pt] [--out simulations/results/compression_codec.md]

(1) For each density k, the wire size in bits per parameter against `H(k) + k`, the fewest
bits any code can spend on a ternary vector of density k (H the binary entropy). "total"
counts the whole message (default: nameless, scope "global"); "body" only the position and
sign bits, without the fixed header.
(2) The whole message for a realistic small ViT adapter (4 layers x 6 linears x LoRA A/B at
rank 8, hidden 64, MLP 128, plus a 10-class head: 50 tensors, 29 k parameters), where
per-tensor overhead used to dominate: bytes per parameter and ratio vs fp32, nameless (the
default), self-describing (`include_names=True`) and nameless per-tensor scope.
(3) Compress and decompress throughput in MB/s of float32 input, one thread, on a
LoRA-shaped adapter of ~10 M parameters at density 0.1, median over repeats, by wall
clock and by process CPU time.
Writes a Markdown table and a JSON file (same path, `.md` / `.json`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.compression import Scope, compress, decompress, read_header
from fairedge.common.wire import adapter_update_pb2 as pb

DEFAULT_OUT = Path("simulations/results/compression_codec.md")


def lora_adapter(params: int, rank: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Gaussian (rank x dim, dim x rank) pairs, like the LoRA factors of a BERT-base-sized model."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(max(1, round(params / (2 * rank * dim)))):
        tensors[f"layers.{i}.lora_A"] = torch.randn(rank, dim, generator=g)
        tensors[f"layers.{i}.lora_B"] = torch.randn(dim, rank, generator=g)
    return tensors


def vit_adapter(
    seed: int, layers: int = 4, rank: int = 8, dim: int = 64, mlp: int = 128, classes: int = 10
) -> dict[str, torch.Tensor]:
    """A small ViT's LoRA delta under its wire names, in the client's order (B deltas smaller)."""
    g = torch.Generator().manual_seed(seed)
    linears = {
        "attention.q_proj": (dim, dim),
        "attention.k_proj": (dim, dim),
        "attention.v_proj": (dim, dim),
        "attention.output.dense": (dim, dim),
        "intermediate.dense": (dim, mlp),
        "output.dense": (mlp, dim),
    }
    tensors = {}
    for i in range(layers):
        for linear, (n_in, n_out) in linears.items():
            tensors[f"lora/vit.layers.{i}.{linear}/A"] = torch.randn(rank, n_in, generator=g)
            tensors[f"lora/vit.layers.{i}.{linear}/B"] = 0.3 * torch.randn(n_out, rank, generator=g)
    tensors["head/classifier.weight"] = torch.randn(classes, dim, generator=g)
    tensors["head/classifier.bias"] = torch.randn(classes, generator=g)
    return tensors


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def entropy_bound(k: float) -> float:
    """H(k) + k bits per parameter."""
    return -(k * math.log2(k) + (1 - k) * math.log2(1 - k)) + k


def size_row(data: str, tensors: dict[str, torch.Tensor], density: float) -> dict:
    n = sum(t.numel() for t in tensors.values())
    payload = compress(tensors, density=density)
    message = pb.AdapterUpdate.FromString(payload)
    body = sum(len(b.payload) + len(b.signs) for b in message.blocks)
    bound = entropy_bound(density)
    total_bits, body_bits = 8 * len(payload) / n, 8 * body / n
    return {
        "data": data,
        "params": n,
        "tensors": len(tensors),
        "density": density,
        "bytes": len(payload),
        "bits_per_param": total_bits,
        "body_bits_per_param": body_bits,
        "bound": bound,
        "ratio": total_bits / bound,
        "body_ratio": body_bits / bound,
        "vs_fp32": 32 / total_bits,
    }


def message_row(tensors: dict[str, torch.Tensor], density: float) -> dict:
    """Whole-message size of one update (round and example count set, as a client sends it)."""
    n = sum(t.numel() for t in tensors.values())
    kinds: dict[str, dict[str, Any]] = {
        "nameless": {},
        "named": {"include_names": True},
        "nameless_tensor_scope": {"scope": "tensor"},
    }
    row = {"params": n, "tensors": len(tensors), "density": density, "bound_bytes": entropy_bound(density) * n / 8}
    for kind, kwargs in kinds.items():
        size = len(compress(tensors, density=density, round=123, num_examples=4567, **kwargs))
        row |= {f"{kind}_bytes": size, f"{kind}_bytes_per_param": size / n, f"{kind}_vs_fp32": 4 * n / size}
    return row


def throughput(tensors: dict[str, torch.Tensor], density: float, scope: Scope, repeats: int) -> dict:
    """Median MB/s over `repeats` runs, by wall clock and by this process's CPU time.

    CPU time is what one core spends; it stays meaningful when other jobs share the machine
    (wall clock then also counts the time we were descheduled).
    """
    n = sum(t.numel() for t in tensors.values())
    expected = shapes_of(tensors)
    compress(tensors, density=density, scope=scope)  # warm-up
    runs: dict[str, list[float]] = {
        "compress_wall": [],
        "compress_cpu": [],
        "decompress_wall": [],
        "decompress_cpu": [],
    }
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        payload = compress(tensors, density=density, scope=scope)
        runs["compress_wall"].append(time.perf_counter() - wall)
        runs["compress_cpu"].append(time.process_time() - cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        decompress(payload, expected=expected)
        runs["decompress_wall"].append(time.perf_counter() - wall)
        runs["decompress_cpu"].append(time.process_time() - cpu)
    mb = 4 * n / 1e6
    kept = read_header(payload, expected=expected).num_kept
    row: dict[str, Any] = {"params": n, "tensors": len(tensors), "density": density, "scope": scope, "kept": kept}
    row |= {f"{key}_MBps_median": mb / statistics.median(times) for key, times in runs.items()}
    row |= {f"{key}_s": times for key, times in runs.items()}
    return row


def load_deltas(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a dict name -> tensor, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def markdown(config: dict, sizes: list[dict], messages: list[dict], speeds: list[dict]) -> str:
    lines = [
        "# ComPEFT codec benchmark",
        "",
        "Config: " + ", ".join(f"`{k}={v}`" for k, v in config.items()),
        "",
        "## Size vs the entropy bound H(k)+k (bits per parameter)",
        "",
        "| data | params | tensors | density | total bits/param | body bits/param | bound | total/bound "
        "| body/bound | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sizes:
        lines.append(
            f"| {r['data']} | {r['params']:,} | {r['tensors']} | {r['density']:.0%} "
            f"| {r['bits_per_param']:.4f} | {r['body_bits_per_param']:.4f} | {r['bound']:.4f} "
            f"| {r['ratio']:.3f} | {r['body_ratio']:.3f} | {r['vs_fp32']:.1f}x |"
        )
    if messages:
        m = messages[0]
        lines += [
            "",
            f"## Whole message, small ViT adapter ({m['params']:,} params, {m['tensors']} tensors)",
            "",
            "| density | bound bytes | nameless bytes | bytes/param | vs fp32 | named bytes | named vs fp32 "
            "| per-tensor scope bytes | per-tensor vs fp32 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in messages:
            lines.append(
                f"| {r['density']:.0%} | {r['bound_bytes']:.0f} | {r['nameless_bytes']:,} "
                f"| {r['nameless_bytes_per_param']:.4f} | {r['nameless_vs_fp32']:.1f}x "
                f"| {r['named_bytes']:,} | {r['named_vs_fp32']:.1f}x "
                f"| {r['nameless_tensor_scope_bytes']:,} | {r['nameless_tensor_scope_vs_fp32']:.1f}x |"
            )
        lines += [
            "",
            "nameless = the default (`include_names=False`, scope global: one block); named = "
            "`include_names=True`; per-tensor scope = nameless, one block per tensor. fp32 = 4 bytes/param.",
        ]
    lines += [
        "",
        f"## Throughput (MB/s of float32 input, 1 thread, median of {config['repeats']} runs)",
        "",
        "| params | tensors | density | scope | compress (wall) | decompress (wall) "
        "| compress (CPU) | decompress (CPU) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in speeds:
        lines.append(
            f"| {r['params']:,} | {r['tensors']} | {r['density']:.0%} | {r['scope']} "
            f"| {r['compress_wall_MBps_median']:.0f} | {r['decompress_wall_MBps_median']:.0f} "
            f"| {r['compress_cpu_MBps_median']:.0f} | {r['decompress_cpu_MBps_median']:.0f} |"
        )
    lines += [
        "",
        "total = whole message; body = position + sign bits only (no header). "
        "CPU = this process's CPU time (robust to other jobs on the machine).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown path; JSON goes next to it")
    parser.add_argument("--deltas", type=Path, help=".pt file of real LoRA deltas (dict name -> tensor)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument(
        "--message-densities",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.1, 0.2, 0.5],
        help="densities for the small-ViT whole-message table",
    )
    parser.add_argument("--params", type=int, default=10_000_000, help="size of the synthetic adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--speed-density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = {
        "seed": args.seed,
        "params": args.params,
        "rank": args.rank,
        "dim": args.dim,
        "densities": args.densities,
        "message_densities": args.message_densities,
        "speed_density": args.speed_density,
        "repeats": args.repeats,
        "deltas": str(args.deltas) if args.deltas else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }

    adapter = lora_adapter(args.params, args.rank, args.dim, args.seed)
    datasets = {
        f"gaussian LoRA {args.rank}x{args.dim}": adapter,
        "gaussian 1024x1024": {"w": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(args.seed))},
    }
    if args.deltas:
        datasets[f"deltas {args.deltas.name}"] = load_deltas(args.deltas)

    sizes = [size_row(name, tensors, d) for name, tensors in datasets.items() for d in args.densities]
    vit = vit_adapter(args.seed)
    messages = [message_row(vit, d) for d in args.message_densities]
    speeds = [throughput(adapter, args.speed_density, scope, args.repeats) for scope in ("global", "tensor")]

    text = markdown(config, sizes, messages, speeds)
    print(text)
    atomic_write_text(args.out.with_suffix(".md"), text)
    results = {"config": config, "sizes": sizes, "small_vit_messages": messages, "throughput": speeds}
    atomic_write_json(args.out.with_suffix(".json"), results, indent=2, sort_keys=False)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
