"""Mixed LoRA ranks: the slice of an adapter a client of rank `r` gets, and zero-padding back to `r_max`.

A rank-`r` client holds the first `r` rows of `A` (`r×n`) and columns of `B` (`m×r`) of the
global rank-`r_max` adapter (`truncate`), with the same LoRA scale (see `fairedge.common.lora_ranks`).
Zero-padding its factors to `r_max` (`pad`) leaves `B_k A_k` unchanged, so a rule that averages
padded factors (FedIT as in HetLoRA, LoRA-FAIR's `Ā` and `B̄`) still sees every client's exact
update in `ΔW = Σ p_k B_k A_k`; FLoRA and FlexLoRA stack the clients' own-rank factors directly.

Zero-padding also pulls the global rows a client does not hold towards zero every round (by the
weight of the clients that lack them). `aggregation.rank_padding = "global"` pads with the global
factors the client was sent instead: a client counts as having left those rows unchanged, so only
the clients that hold a row move it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from .base import Adapter, ClientUpdate, LayerFactors


def factor_rank(adapter: Adapter) -> int:
    """The adapter's LoRA rank (ValueError if its layers disagree)."""
    ranks = {a.shape[0] for a, _ in adapter.factors.values()}
    if len(ranks) > 1:
        raise ValueError(f"the adapter's layers have different ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


def truncate(factors: LayerFactors, rank: int) -> LayerFactors:
    """`(A[:rank], B[:, :rank])`; ValueError if the factors have a smaller rank."""
    a, b = factors
    if not 1 <= rank <= a.shape[0]:
        raise ValueError(f"cannot cut rank-{a.shape[0]} factors to rank {rank}")
    return a[:rank].contiguous(), b[:, :rank].contiguous()


def pad(factors: LayerFactors, rank: int, fill: LayerFactors | None = None) -> LayerFactors:
    """`A` with rows and `B` with columns up to `rank`: zeros (`B·A` unchanged), or those of `fill`."""
    a, b = factors
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank-{a.shape[0]} factors to the smaller rank {rank}")
    if extra == 0:
        return a, b
    if fill is None:
        return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    fa, fb = fill
    return torch.cat([a, fa[a.shape[0] : rank].to(a)]), torch.cat([b, fb[:, b.shape[1] : rank].to(b)], dim=1)


def truncate_adapter(adapter: Adapter, rank: int | None) -> Adapter:
    """The adapter a rank-`rank` client gets (head and base delta whole); `None` = the adapter itself."""
    if rank is None or rank == factor_rank(adapter):
        return adapter
    factors = {layer: truncate(f, rank) for layer, f in adapter.factors.items()}
    return Adapter(factors, adapter.head, adapter.base_delta)


RankPadding = Literal["zeros", "global"]
RANK_PADDINGS: tuple[RankPadding, ...] = get_args(RankPadding)


def pad_updates(updates: Sequence[ClientUpdate], like: Adapter, padding: RankPadding = "zeros") -> list[ClientUpdate]:
    """Every update's factors padded to the rank of `like` (the global adapter the clients were sent), layer by
    layer: with zeros, or with `like`'s own rows and columns (`padding = "global"`)."""
    if padding not in RANK_PADDINGS:
        raise ValueError(f"rank padding {padding!r}; allowed: {', '.join(RANK_PADDINGS)}")
    out = []
    for u in updates:
        factors = {
            layer: pad(u.adapter.factors[layer], g[0].shape[0], g if padding == "global" else None)
            for layer, g in like.factors.items()
        }
        out.append(ClientUpdate(Adapter(factors, u.adapter.head, u.adapter.base_delta), u.num_examples, u.node_id))
    return out
