"""The client's compressed uplink: ComPEFT on this round's change, with error feedback.

The client sends `τ = (trained − start) + e`, compressed, where `start` is the
global adapter it received and `e` the part of earlier updates that compression
dropped. `e ← τ − decompress(compress(τ))` is kept in Flower's per-node context
state, so what one round drops is sent in later rounds instead of being lost.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from common.compression import compress, decompress
from common.config import CompressionConfig

RESIDUAL_KEY = "fairedge.ef-residual"


def _residual(state: RecordDict, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored residual, or zeros when there is none or it no longer fits (a new run)."""
    zeros = {k: torch.zeros_like(v) for k, v in like.items()}
    if RESIDUAL_KEY not in state:
        return zeros
    stored = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in state[RESIDUAL_KEY].items()}
    if set(stored) != set(like) or any(stored[k].shape != like[k].shape for k in like):
        return zeros
    return stored


def compress_update(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    cfg: CompressionConfig,
    state: RecordDict,
    *,
    server_round: int,
    num_examples: int,
) -> bytes:
    """The compressed change since `start`; updates the error-feedback residual in `state`."""
    delta = {k: trained[k].float() - start[k].float() for k in start}
    if cfg.error_feedback:
        residual = _residual(state, delta)
        delta = {k: delta[k] + residual[k] for k in delta}
    payload = compress(delta, density=cfg.density, alpha=cfg.alpha, scope=cfg.scope,
                       round=server_round, num_examples=num_examples)
    if cfg.error_feedback:
        sent = decompress(payload, expected={k: tuple(v.shape) for k, v in delta.items()})
        state[RESIDUAL_KEY] = ArrayRecord({k: Array((delta[k] - sent[k]).numpy()) for k in delta})
    return payload
