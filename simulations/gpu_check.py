"""Check the GPU paths on a machine with CUDA: bf16 client training, and several clients sharing one GPU.

    python -m fairedge.simulations.gpu_check [--config simulations/configs/shakespeare.toml] [--steps 10]
        [--repeats 3] [--share 0.25] [--out simulations/results]

1. *Precision*: one client's local training (`train_client_round`, the config's model, LoRA, batch and
   sequence length) on the GPU in fp32 and in bf16 autocast (`federation.precision`), `--repeats` rounds of
   `--steps` steps each after a warm-up, alternating: seconds per step (median), tokens per second, peak
   GPU memory, and the final loss of each (bf16 must train, not only run).
2. *Sharing*: the same federation on Flower's simulation engine (Ray) twice, with `federation.client_gpus`
   1 (one client on the GPU at a time) and `--share` (1/share clients at once): seconds per round and the
   most client processes seen on the GPU at once (`nvidia-smi`, sampled every 0.2 s).

Writes `gpu_check.{json,md}` to `--out` after each stage. Without CUDA it stops at once with exit code 2 and
writes nothing: this is the script to run when a GPU is lent, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import RunConfig, load_config
from fairedge.common.task import client_partition, load_task, lora_model
from fairedge.common.training import train_client_round
from fairedge.server.run_outputs import new_run_dir
from fairedge.simulations.paths import RESULTS, display

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "shakespeare.toml"


def gpu_apps() -> list[tuple[int, float]]:
    """(pid, MiB) of every process that holds GPU memory now, as `nvidia-smi` lists them (none without it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [(int(p), float(m)) for p, m in (line.split(",") for line in out.strip().splitlines() if line.strip())]


def precision_times(cfg: RunConfig, steps: int, repeats: int) -> dict[str, Any]:
    """One client's training on the GPU in fp32 and bf16, alternating rounds; medians and the last loss."""
    task = load_task(cfg)
    data = client_partition(cfg, 0, task=task)
    device = torch.device("cuda")
    out: dict[str, Any] = {}
    models = {p: lora_model(cfg, task=task).to(device) for p in ("fp32", "bf16")}
    times: dict[str, list[float]] = {p: [] for p in models}
    losses: dict[str, list[float]] = {p: [] for p in models}
    for i in range(repeats + 1):  # round 0 warms up (kernels, allocator) and is not timed
        for p in models if i % 2 == 0 else reversed(list(models)):
            f = cfg.federation.model_copy(update={"local_steps": steps, "precision": p, "local_epochs": None})
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            losses[p].append(train_client_round(models[p], data, f, seed=i, device=device))
            torch.cuda.synchronize()
            if i:
                times[p].append((time.perf_counter() - started) / steps)
            out.setdefault(p, {})["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    tokens = cfg.federation.batch_size * cfg.data.seq_len
    for p in models:
        step = statistics.median(times[p])
        out[p].update(s_per_step=step, tokens_per_s=tokens / step, losses=losses[p], step_times=times[p])
    out["bf16_speedup"] = out["fp32"]["s_per_step"] / out["bf16"]["s_per_step"]
    return out


def shared_run(cfg: RunConfig, client_gpus: float) -> dict[str, Any]:
    """The federation on Ray with `client_gpus` per client: seconds per round, most client processes on the GPU."""
    from fairedge.simulations.simulate import simulate

    run_cfg = cfg.model_copy(
        update={"federation": cfg.federation.model_copy(update={"client_gpus": client_gpus, "device": "cuda"})}
    )
    me, stop, seen = os.getpid(), threading.Event(), []

    def sample() -> None:
        while not stop.is_set():
            apps = [a for a in gpu_apps() if a[0] != me]
            seen.append((len(apps), sum(m for _, m in apps)))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        record = simulate(run_cfg, new_run_dir(run_cfg))
    finally:
        stop.set()
        sampler.join()
    rounds = [r["seconds"] for r in record.rounds if r["round"] > 0]
    return {
        "client_gpus": client_gpus,
        "round_seconds": rounds,
        "max_gpu_processes": max((n for n, _ in seen), default=0),
        "peak_gpu_mib_clients": max((m for _, m in seen), default=0.0),
        "final_mean_perplexity": record.summary().get("final_mean_perplexity"),
    }


def markdown(result: dict[str, Any]) -> str:
    p, shares = result["precision"], result["sharing"]
    lines = [
        "# GPU check: bf16 client training, clients sharing one GPU",
        "",
        f"`{result['command']}` ({result['when']}). {result['gpu']}, torch {result['torch']}, "
        f"config `{result['config']}` with {', '.join(f'`{o}`' for o in result['overrides']) or 'no overrides'}.",
        "",
        f"## One client's training on the GPU ({result['steps']} steps × {result['repeats']} rounds, medians)",
        "",
        "| precision | s / step | tokens / s | peak GPU MiB | loss per round |",
        "|---|---:|---:|---:|---|",
    ]
    for name in ("fp32", "bf16"):
        r = p[name]
        losses = ", ".join(f"{x:.3f}" for x in r["losses"])
        lines.append(f"| {name} | {r['s_per_step']:.4f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | {losses} |")
    lines += [
        "",
        f"bf16 autocast is {p['bf16_speedup']:.2f}× fp32 in steps per second.",
        "",
        "## Clients sharing the GPU (Flower simulation engine, Ray)",
        "",
        "| client_gpus | most client processes on the GPU at once | peak GPU MiB (clients) | s / round | "
        "final mean perplexity |",
        "|---:|---:|---:|---|---:|",
    ]
    for s in shares:
        secs = ", ".join(f"{x:.1f}" for x in s["round_seconds"])
        lines.append(
            f"| {s['client_gpus']:g} | {s['max_gpu_processes']} | {s['peak_gpu_mib_clients']:.0f} | {secs} "
            f"| {'-' if s['final_mean_perplexity'] is None else format(s['final_mean_perplexity'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per precision")
    parser.add_argument("--share", type=float, default=0.25, help="client_gpus of the shared run (1 = exclusive)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine\n")
    overrides = [
        "federation.num_clients=8",
        "federation.fraction_train=1",
        "federation.rounds=2",
        "federation.client_cpus=1",
        f"output_dir={str(Path(tempfile.mkdtemp(prefix='gpu-check-')))!r}",
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    result: dict[str, Any] = {
        "command": " ".join(
            ["python -m fairedge.simulations.gpu_check", *(argv if argv is not None else sys.argv[1:])]
        ),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": torch.cuda.get_device_name(0),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "host": platform.node(),
        "config": display(args.config),
        "overrides": [o for o in overrides if not o.startswith("output_dir=")],
        "steps": args.steps,
        "repeats": args.repeats,
    }
    print("precision: fp32 vs bf16 on one client ...", flush=True)
    result["precision"] = precision_times(cfg, args.steps, args.repeats)
    result["sharing"] = []
    save(result, args.out)  # what was measured survives a failure in the (longer) sharing runs
    for share in (1.0, args.share):
        print(f"sharing: client_gpus={share:g} ...", flush=True)
        result["sharing"].append(shared_run(cfg, share))
        save(result, args.out)
    print(markdown(result))


def save(result: dict[str, Any], out: Path) -> None:
    """Write `gpu_check.{json,md}` with what has been measured so far."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_check.json", result, indent=1)
    atomic_write_text(out / "gpu_check.md", markdown(result))


if __name__ == "__main__":
    main()
