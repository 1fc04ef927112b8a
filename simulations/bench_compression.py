"""Benchmark the ComPEFT codec: bits per parameter vs the entropy bound, and single-core speed.

    python -m simulations.bench_compression [--deltas deltas.pt] [--out simulations/results/compression_codec.md]

(1) For each density k, the wire size in bits per parameter against `H(k) + k`, the fewest
bits any code can spend on a ternary vector of density k (H the binary entropy). "total"
counts the whole message; "body" only the position and sign bits, without per-tensor headers.
(2) Compress and decompress throughput in MB/s of float32 input, one thread, on a
LoRA-shaped adapter of ~10 M parameters at density 0.1, median over repeats, by wall
clock and by process CPU time.
Writes a Markdown table and a JSON file (same path, `.md` / `.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from common.compression import compress, decompress, read_header
from common.wire import adapter_update_pb2 as pb

DEFAULT_OUT = Path("simulations/results/compression_codec.md")


def lora_adapter(params: int, rank: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Gaussian (rank x dim, dim x rank) pairs, like the LoRA factors of a BERT-base-sized model."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(max(1, round(params / (2 * rank * dim)))):
        tensors[f"layers.{i}.lora_A"] = torch.randn(rank, dim, generator=g)
        tensors[f"layers.{i}.lora_B"] = torch.randn(dim, rank, generator=g)
    return tensors


def entropy_bound(k: float) -> float:
    """H(k) + k bits per parameter."""
    return -(k * math.log2(k) + (1 - k) * math.log2(1 - k)) + k


def size_row(data: str, tensors: dict[str, torch.Tensor], density: float) -> dict:
    n = sum(t.numel() for t in tensors.values())
    payload = compress(tensors, density=density)
    message = pb.AdapterUpdate.FromString(payload)
    body = sum(len(t.payload) + len(t.signs) for t in message.tensors)
    bound = entropy_bound(density)
    total_bits, body_bits = 8 * len(payload) / n, 8 * body / n
    return {"data": data, "params": n, "tensors": len(tensors), "density": density,
            "bytes": len(payload), "bits_per_param": total_bits, "body_bits_per_param": body_bits,
            "bound": bound, "ratio": total_bits / bound, "body_ratio": body_bits / bound,
            "vs_fp32": 32 / total_bits}


def throughput(tensors: dict[str, torch.Tensor], density: float, scope: str, repeats: int) -> dict:
    """Median MB/s over `repeats` runs, by wall clock and by this process's CPU time.

    CPU time is what one core spends; it stays meaningful when other jobs share the machine
    (wall clock then also counts the time we were descheduled).
    """
    n = sum(t.numel() for t in tensors.values())
    compress(tensors, density=density, scope=scope)  # warm-up
    runs: dict[str, list[float]] = {"compress_wall": [], "compress_cpu": [], "decompress_wall": [],
                                    "decompress_cpu": []}
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        payload = compress(tensors, density=density, scope=scope)
        runs["compress_wall"].append(time.perf_counter() - wall)
        runs["compress_cpu"].append(time.process_time() - cpu)
        wall, cpu = time.perf_counter(), time.process_time()
        decompress(payload)
        runs["decompress_wall"].append(time.perf_counter() - wall)
        runs["decompress_cpu"].append(time.process_time() - cpu)
    mb = 4 * n / 1e6
    kept = sum(info.num_kept for info in read_header(payload).tensors.values())
    row = {"params": n, "tensors": len(tensors), "density": density, "scope": scope, "kept": kept}
    row |= {f"{key}_MBps_median": mb / statistics.median(times) for key, times in runs.items()}
    row |= {f"{key}_s": times for key, times in runs.items()}
    return row


def load_deltas(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"{path}: expected a dict name -> tensor, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def markdown(config: dict, sizes: list[dict], speeds: list[dict]) -> str:
    lines = ["# ComPEFT codec benchmark", "",
             "Config: " + ", ".join(f"`{k}={v}`" for k, v in config.items()), "",
             "## Size vs the entropy bound H(k)+k (bits per parameter)", "",
             "| data | params | tensors | density | total bits/param | body bits/param | bound | total/bound "
             "| body/bound | vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sizes:
        lines.append(f"| {r['data']} | {r['params']:,} | {r['tensors']} | {r['density']:.0%} "
                     f"| {r['bits_per_param']:.4f} | {r['body_bits_per_param']:.4f} | {r['bound']:.4f} "
                     f"| {r['ratio']:.3f} | {r['body_ratio']:.3f} | {r['vs_fp32']:.1f}x |")
    lines += ["", f"## Throughput (MB/s of float32 input, 1 thread, median of {config['repeats']} runs)", "",
              "| params | tensors | density | scope | compress (wall) | decompress (wall) "
              "| compress (CPU) | decompress (CPU) |",
              "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in speeds:
        lines.append(f"| {r['params']:,} | {r['tensors']} | {r['density']:.0%} | {r['scope']} "
                     f"| {r['compress_wall_MBps_median']:.0f} | {r['decompress_wall_MBps_median']:.0f} "
                     f"| {r['compress_cpu_MBps_median']:.0f} | {r['decompress_cpu_MBps_median']:.0f} |")
    lines += ["", "total = whole message; body = position + sign bits only (no per-tensor headers). "
              "CPU = this process's CPU time (robust to other jobs on the machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown path; JSON goes next to it")
    parser.add_argument("--deltas", type=Path, help=".pt file of real LoRA deltas (dict name -> tensor)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--params", type=int, default=10_000_000, help="size of the synthetic adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--speed-density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = {"seed": args.seed, "params": args.params, "rank": args.rank, "dim": args.dim,
              "densities": args.densities, "speed_density": args.speed_density, "repeats": args.repeats,
              "deltas": str(args.deltas) if args.deltas else None, "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "load_average_1min": round(os.getloadavg()[0], 2)}

    adapter = lora_adapter(args.params, args.rank, args.dim, args.seed)
    datasets = {f"gaussian LoRA {args.rank}x{args.dim}": adapter,
                "gaussian 1024x1024": {"w": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(args.seed))}}
    if args.deltas:
        datasets[f"deltas {args.deltas.name}"] = load_deltas(args.deltas)

    sizes = [size_row(name, tensors, d) for name, tensors in datasets.items() for d in args.densities]
    speeds = [throughput(adapter, args.speed_density, scope, args.repeats) for scope in ("global", "tensor")]

    text = markdown(config, sizes, speeds)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"config": config, "sizes": sizes, "throughput": speeds},
                                                        indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
