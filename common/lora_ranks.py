"""Heterogeneous LoRA ranks: which rank a client trains, and the config it trains with.

The global adapter has rank `r_max = lora.rank`. With `lora.client_ranks` set, each client trains
its own rank `r_k <= r_max`:

- a node's `lora-rank` node config (a deployment: the node knows its memory) wins;
- otherwise partition `i` gets `client_ranks[i % len(client_ranks)]` (`rank_assignment = "cyclic"`),
  or a draw from `client_ranks` seeded by `(seed, i)` (`"random"`: the same partition gets the same
  rank in every run with that seed, and the draw of one partition does not depend on the others).

Every client keeps the global LoRA scale `s = alpha / r_max`: a rank-`r_k` client's PEFT
`lora_alpha` is `alpha · r_k / r_max`. Its factors are then the first `r_k` rows of `A` and
columns of `B` of an `r_max` adapter with the same scale, so zero-padding them back to `r_max`
changes nothing in `s·B·A`, and the rules aggregate the clients' updates on one scale.
Torch-free, like the config.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from fairedge.common.config import LoraSettings, RunConfig

NODE_RANK_KEY = "lora-rank"
"""Node-config key of a node's own LoRA rank (a deployment's SuperNode: `--node-config "lora-rank=4"`)."""


def assigned_rank(lora: LoraSettings, seed: int, partition_id: int) -> int:
    """The rank `lora.client_ranks` gives partition `partition_id` (`lora.rank` when it is unset)."""
    ranks = lora.client_ranks
    if not ranks:
        return lora.rank
    if lora.rank_assignment == "cyclic":
        return ranks[partition_id % len(ranks)]
    return random.Random(f"fairedge-rank:{seed}:{partition_id}").choice(ranks)


def node_rank(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int) -> int:
    """This node's rank: its `lora-rank` node config, else its partition's assigned rank.

    A `lora-rank` is refused (ValueError naming it) above `lora.rank`, or different from `lora.rank`
    when the run has no `lora.client_ranks` (its rule may not aggregate mixed ranks).
    """
    raw = node_config.get(NODE_RANK_KEY)
    if raw is None or raw == "":
        return assigned_rank(cfg.lora, cfg.seed, partition_id)
    try:
        rank = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"node config {NODE_RANK_KEY}={raw!r} is not an integer") from None
    if not 1 <= rank <= cfg.lora.rank:
        raise ValueError(
            f"node config {NODE_RANK_KEY}={rank} is outside 1..lora.rank={cfg.lora.rank} (the global adapter's rank)"
        )
    if rank != cfg.lora.rank and not cfg.lora.client_ranks:
        raise ValueError(
            f"node config {NODE_RANK_KEY}={rank} differs from lora.rank={cfg.lora.rank}, but the run has no "
            "lora.client_ranks (set it to turn on heterogeneous ranks)"
        )
    return rank


def at_rank(cfg: RunConfig, rank: int) -> RunConfig:
    """`cfg` for a client of rank `rank`: `lora.rank = rank`, `lora.alpha` scaled so `alpha / rank` stays `s`."""
    if rank == cfg.lora.rank:
        return cfg
    lora = cfg.lora.model_copy(
        update={"rank": rank, "alpha": cfg.lora.alpha * rank / cfg.lora.rank, "client_ranks": None}
    )
    return cfg.model_copy(update={"lora": lora})
