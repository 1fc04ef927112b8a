"""Save real client LoRA deltas (one round of local training per client) for the codec benchmark.

    python -m fairedge.simulations.real_deltas --out simulations/results/real_deltas.pt
    python -m fairedge.simulations.bench_compression --deltas simulations/results/real_deltas.pt

Each client of the config trains `local_steps` from the initial global adapter,
exactly as in round 1 of a run; the file maps `client<k>/<wire name>` to its delta.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from fairedge.common.adapter_record import flatten
from fairedge.common.atomic_files import atomic_write_bytes
from fairedge.common.config import RunConfig, load_config
from fairedge.common.task import client_partition, get_adapter, lora_model, set_adapter
from fairedge.common.training import train_local
from fairedge.simulations.paths import CONFIG


def collect_deltas(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """`client<k>/<wire name>` -> that client's round-1 change of its LoRA factors (`local_steps` from the start)."""
    model = lora_model(cfg)
    start = get_adapter(model)
    f = cfg.federation
    deltas: dict[str, torch.Tensor] = {}
    for k in range(f.num_clients):
        set_adapter(model, start)
        train_local(
            model,
            client_partition(cfg, k),
            steps=f.local_steps,
            batch_size=f.batch_size,
            lr=f.lr,
            optimizer=f.optimizer,
            seed=cfg.seed * 100_003 + 1_009 + k,
        )
        after = flatten(get_adapter(model))
        deltas.update({f"client{k}/{name}": after[name] - t for name, t in flatten(start).items()})
        print(f"client {k}: {sum(t.numel() for t in after.values()):,} parameters", flush=True)
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--out", type=Path, default=Path("simulations/results/real_deltas.pt"))
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    torch.set_num_threads(1)
    deltas = collect_deltas(cfg)
    buffer = io.BytesIO()
    torch.save(deltas, buffer)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {len(deltas)} tensors ({sum(t.numel() for t in deltas.values()):,} values) to {args.out}")


if __name__ == "__main__":
    main()
