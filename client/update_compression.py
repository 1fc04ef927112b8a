"""The client's compressed uplink: ComPEFT on this round's change, with error feedback.

The client sends `τ = (trained − start) + e`, compressed, where `start` is what
it received (for the tensors it sends back) and `e` the part of earlier updates
that compression dropped. `e ← τ − decompress(compress(τ))` is kept per tensor in
Flower's per-node context state, so what one round drops is sent in later
rounds instead of being lost. Tensors not sent this round (a factor RoLoRA
freezes this round) keep their residual for the next round that sends them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fairedge.common.compression import compress, decompress
from fairedge.common.config import CompressionConfig

RESIDUAL_KEY = "fairedge.ef-residual"


def _stored_residual(state: RecordDict) -> dict[str, torch.Tensor]:
    if RESIDUAL_KEY not in state.array_records:
        return {}
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in state.array_records[RESIDUAL_KEY].items()}


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
        stored = _stored_residual(state)
        # a residual of another shape belongs to another run: start that tensor from zero
        delta = {k: v + stored[k] if k in stored and stored[k].shape == v.shape else v for k, v in delta.items()}
    payload = compress(
        delta, density=cfg.density, alpha=cfg.alpha, scope=cfg.scope, round=server_round, num_examples=num_examples
    )
    if cfg.error_feedback:
        sent = decompress(payload, expected={k: tuple(v.shape) for k, v in delta.items()})
        residual = {**stored, **{k: delta[k] - sent[k] for k in delta}}
        state[RESIDUAL_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in residual.items()})
    return payload
