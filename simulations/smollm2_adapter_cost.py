"""Server time per round for a whole SmolLM2-135M LoRA adapter: FedIT against LoRA-FAIR.

Part `smollm2` of `bench_aggregation_cost` runs `adapter_worker` in a fresh process
per (targets, K). The layer shapes are SmolLM2-135M's (hidden 576, 9 query heads and
3 key/value heads of 64, MLP 1536, 30 decoder layers); the factors are random,
drawn as the per-layer benchmark draws them (`A` at Kaiming scale, `B` small).
"""

from __future__ import annotations

import statistics
import time

import torch

from fairedge.common.aggregation.base import Adapter, ClientUpdate
from fairedge.common.aggregation.fedit import FedIT
from fairedge.common.aggregation.lora_fair import LoraFair, delta_form_flops

SEED = 0
SMOLLM2_LAYERS = 30
SMOLLM2_SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
"""`(m, n)` per module: B is m×r, A is r×n (SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536)."""
SMOLLM2_TARGETS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "all-linear": tuple(SMOLLM2_SHAPES)}
SMOLLM2_RANK = 16
SMOLLM2_CLIENTS = (8, 50)
ADAPTER_METHODS = ("fedit", "lora_fair", "lora_fair_factored", "lora_fair_dense")


def make_adapter_updates(targets: str, K: int, seed: int = SEED) -> tuple[list[ClientUpdate], Adapter]:
    """K clients' float32 adapters over SmolLM2's 30 layers × the target modules, as `make_inputs` draws them."""
    g = torch.Generator().manual_seed(seed)
    names = [
        (f"model.layers.{i}.{mod}", *SMOLLM2_SHAPES[mod])
        for i in range(SMOLLM2_LAYERS)
        for mod in SMOLLM2_TARGETS[targets]
    ]
    r = SMOLLM2_RANK
    updates = []
    for k in range(K):
        factors = {
            name: (torch.randn(r, n, generator=g) / n**0.5, 0.01 * torch.randn(m, r, generator=g))
            for name, m, n in names
        }
        examples = int(torch.randint(50, 500, (), generator=g))
        updates.append(ClientUpdate(Adapter(factors), num_examples=examples, node_id=k))
    current = Adapter({name: (torch.zeros(r, n), torch.zeros(m, r)) for name, m, n in names})
    return updates, current


def adapter_worker(targets: str, K: int, quick: bool) -> dict:
    """Per-round server time of each `ADAPTER_METHODS` entry on one adapter, the methods taking turns."""
    torch.set_num_threads(1)
    updates, current = make_adapter_updates(targets, K)
    aggregators = {
        "fedit": FedIT(),
        "lora_fair": LoraFair(),  # λ = 0.01 (the paper's), as in the per-layer rows
        "lora_fair_factored": LoraFair(delta_form="factored"),
        "lora_fair_dense": LoraFair(delta_form="dense"),
    }
    for agg in aggregators.values():  # warm-up: first touches of library code
        agg.aggregate(updates, current)
    times: dict[str, list[float]] = {name: [] for name in aggregators}
    for _ in range(3 if quick else 7):
        for name, agg in aggregators.items():
            t0 = time.perf_counter()
            agg.aggregate(updates, current)
            times[name].append(time.perf_counter() - t0)
    forms: dict[str, int] = {"factored": 0, "dense": 0}
    for A, B in current.factors.values():  # what `auto` takes per layer (the aggregator reports metrics too)
        flops = delta_form_flops(B.shape[0], A.shape[1], [SMOLLM2_RANK] * K, needs_norm=True, single=True)
        forms[min(flops, key=flops.__getitem__)] += 1
    fedit_med, fedit_min = statistics.median(times["fedit"]), min(times["fedit"])
    return {
        "targets": targets,
        "modules": list(SMOLLM2_TARGETS[targets]),
        "layers": len(current.factors),
        "r": SMOLLM2_RANK,
        "K": K,
        "runs": len(times["fedit"]),
        "auto_forms": forms,
        "methods": {
            name: {
                "seconds_median": statistics.median(ts),
                "seconds_min": min(ts),
                "ratio_to_fedit": statistics.median(ts) / fedit_med,
                "ratio_to_fedit_of_minima": min(ts) / fedit_min,
            }
            for name, ts in times.items()
        },
    }
