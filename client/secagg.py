"""The client side of secure aggregation: a Flower mod that wraps the ClientApp's train handler.

Train messages that carry the `fairedge-secagg` ConfigRecord are protocol steps (see
`fairedge.common.secagg.masking` and `fairedge.server.secagg`); all other messages pass through.

- setup: make this round's keys (per phase a pair for pairwise masks and a self-mask seed, one
  pair for encrypting shares); reply the public keys.
- share-keys: given the neighbours' public keys, Shamir-split each phase's seed and mask key and
  send each neighbour its shares, encrypted for it.
- masked, phase 0: decrypt the shares received, train as usual (`call_next`), and reply the
  quantised, masked `w_k·(x_k − sent)` (the factors the round asks for and the head) instead of
  the tensors; `num-examples` and `train-loss` travel inside the masked vector.
- masked, phase 1 (LoRA-FAIR): given `Ā`, reply the masked `w_k·(B_k A_k Āᵀ − B_s A_s Āᵀ)`.
- unmask: reveal the seed shares of neighbours the server lists alive and the mask-key shares
  of those it lists dead (never both for one node: the server lists each node once).

Keys, shares and the trained tensors live in the node's context state between the messages of a
round (like Flower's `secaggplus_mod`); the next setup replaces them.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fairedge.common.adapter_record import record_tensors
from fairedge.common.secagg import (
    SECAGG_KEY,
    FixedPoint,
    KeyPair,
    Layout,
    Stage,
    blobs,
    ints,
    layer_product,
    mask_vector,
    open_shares,
    seal_shares,
    shared_key,
    split,
)

STATE_KEY = "fairedge.secagg"
TENSORS_KEY = "fairedge.secagg.tensors"
START_KEY = "fairedge.secagg.start"
PLAIN_METRICS = ("num-examples", "train-loss")
"""Reply metrics that go inside the masked vector instead of in the clear."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run a secure-aggregation step, or pass the message on."""
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG_KEY not in msg.content.config_records:
        return call_next(msg, context)
    fields = msg.content.config_records[SECAGG_KEY]
    stage = str(fields["stage"])
    node = msg.metadata.dst_node_id
    if stage == Stage.SETUP:
        out, metrics = _setup(fields, node, context), None
    elif stage == Stage.SHARE_KEYS:
        out, metrics = _share_keys(fields, _state(context), context), None
    elif stage == Stage.MASKED and int(cast(int, fields["phase"])) == 0:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        out, metrics = _masked_update(msg, reply, fields, _state(context), context)
    elif stage == Stage.MASKED:
        out, metrics = _masked_product(msg, fields, _state(context), context), None
    elif stage == Stage.UNMASK:
        out, metrics = _unmask(fields, _state(context)), None
    else:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    content = RecordDict({SECAGG_KEY: ConfigRecord(out)})
    if metrics is not None:
        content["metrics"] = metrics
    return Message(content, reply_to=msg)


def _state(context: Context) -> dict[str, Any]:
    if STATE_KEY not in context.state.config_records:
        raise ValueError("secure aggregation: a protocol step arrived before this round's setup")
    return json.loads(str(context.state.config_records[STATE_KEY]["json"]))


def _save(context: Context, state: dict[str, Any]) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": json.dumps(state)})


def _fixed_point(state: dict[str, Any]) -> FixedPoint:
    return FixedPoint(state["clip_range"], state["bits"], state["modulus_bits"])


def _setup(record: ConfigRecord, node: int, context: Context) -> dict[str, Any]:
    fields: dict[str, Any] = dict(record)
    phases = int(fields["phases"])
    pairs = [KeyPair.new() for _ in range(phases)]
    sealing = KeyPair.new()
    state = {
        "node": node,
        "phases": phases,
        "threshold": int(fields["threshold"]),
        "num_shares": int(fields["num_shares"]),
        "clip_range": float(fields["clip_range"]),
        "bits": int(fields["bits"]),
        "modulus_bits": int(fields["modulus_bits"]),
        "max_weight": float(fields["max_weight"]),
        "sk1": [p.private.hex() for p in pairs],
        "seed": [os.urandom(32).hex() for _ in range(phases)],
        "sk2": sealing.private.hex(),
        "pk2": sealing.public.hex(),
        "pk1": {},
        "shares": [{} for _ in range(phases)],
    }
    _save(context, state)
    for key in (TENSORS_KEY, START_KEY):
        if key in context.state.array_records:
            del context.state.array_records[key]
    return {"pk1": [p.public for p in pairs], "pk2": sealing.public}


def _share_keys(fields: ConfigRecord, state: dict[str, Any], context: Context) -> dict[str, Any]:
    nodes, pk1s, pk2s = ints(fields, "nodes"), blobs(fields, "pk1"), blobs(fields, "pk2")
    phases, me = state["phases"], state["node"]
    if len(nodes) < state["threshold"]:
        raise ValueError(f"secure aggregation: {len(nodes)} neighbours, fewer than the threshold {state['threshold']}")
    if me not in nodes or pk2s[nodes.index(me)] != bytes.fromhex(state["pk2"]):
        raise ValueError("secure aggregation: the server forwarded wrong public keys for this node")
    state["pk1"] = {str(n): [pk1s[i * phases + p].hex() for p in range(phases)] for i, n in enumerate(nodes)}
    shares = [
        (
            split(bytes.fromhex(state["seed"][p]), state["threshold"], len(nodes)),
            split(bytes.fromhex(state["sk1"][p]), state["threshold"], len(nodes)),
        )
        for p in range(phases)
    ]
    dsts, ciphertexts = [], []
    for i, other in enumerate(nodes):
        mine = [s for p in range(phases) for s in (shares[p][0][i], shares[p][1][i])]
        if other == me:
            for p in range(phases):
                state["shares"][p][str(me)] = [mine[2 * p].hex(), mine[2 * p + 1].hex()]
            continue
        key = shared_key(bytes.fromhex(state["sk2"]), pk2s[i])
        dsts.append(other)
        ciphertexts.append(seal_shares(key, me, other, mine))
    state["pk2s"] = {str(n): pk2s[i].hex() for i, n in enumerate(nodes)}
    _save(context, state)
    return {"dsts": dsts, "ciphertexts": ciphertexts}


def _pair_keys(state: dict[str, Any], peers: list[int], phase: int) -> dict[int, bytes]:
    sk = bytes.fromhex(state["sk1"][phase])
    return {v: shared_key(sk, bytes.fromhex(state["pk1"][str(v)][phase])) for v in peers if v != state["node"]}


def _masked_update(
    msg: Message, reply: Message, fields: ConfigRecord, state: dict[str, Any], context: Context
) -> tuple[dict[str, Any], MetricRecord]:
    me, phases = state["node"], state["phases"]
    srcs = ints(fields, "srcs")
    for src, ct in zip(srcs, blobs(fields, "ciphertexts"), strict=True):
        key = shared_key(bytes.fromhex(state["sk2"]), bytes.fromhex(state["pk2s"][str(src)]))
        parts = open_shares(key, ct, src, me)
        for p in range(phases):
            state["shares"][p][str(src)] = [parts[2 * p].hex(), parts[2 * p + 1].hex()]
    if len(srcs) + 1 < state["threshold"]:
        raise ValueError(f"secure aggregation: shares from {len(srcs)} neighbours, fewer than the threshold")
    tensors = record_tensors(reply.content.array_records["arrays"])
    start = record_tensors(msg.content.array_records["arrays"])
    metrics = reply.content.metric_records["metrics"]
    examples, loss = int(cast(int, metrics["num-examples"])), float(cast(float, metrics["train-loss"]))
    change = {k: t.double() - start[k].double() for k, t in tensors.items()}
    weight = examples / state["max_weight"]
    vector = _fixed_point(state).encode(Layout.of(change).flat(change), examples, loss, weight)
    masked = mask_vector(vector, me, bytes.fromhex(state["seed"][0]), _pair_keys(state, srcs, 0), 0)
    state.update(examples=examples, weight=weight)
    _save(context, state)
    if phases > 1:  # keep what phase 1 needs, on this node only
        context.state.array_records[TENSORS_KEY] = _record(tensors)
        context.state.array_records[START_KEY] = _record(start)
    plain = MetricRecord({k: v for k, v in metrics.items() if k not in PLAIN_METRICS})
    return {"masked": masked.tobytes()}, plain


def _masked_product(msg: Message, fields: ConfigRecord, state: dict[str, Any], context: Context) -> dict[str, Any]:
    """Phase 1 of LoRA-FAIR: `w_k·(B_k (A_k Āᵀ) − B_s (A_s Āᵀ))` per layer, masked with phase-1 keys."""
    phase, peers = int(cast(int, fields["phase"])), ints(fields, "peers")
    abar = record_tensors(msg.content.array_records["abar"])
    mine = record_tensors(context.state.array_records[TENSORS_KEY])
    start = record_tensors(context.state.array_records[START_KEY])
    change = {
        k.removesuffix("/A") + "/M": layer_product(mine, k, a) - layer_product(start, k, a) for k, a in abar.items()
    }
    vector = _fixed_point(state).encode(Layout.of(change).flat(change), state["examples"], 0.0, state["weight"])
    masked = mask_vector(
        vector, state["node"], bytes.fromhex(state["seed"][phase]), _pair_keys(state, peers, phase), phase
    )
    return {"masked": masked.tobytes()}


def _unmask(fields: ConfigRecord, state: dict[str, Any]) -> dict[str, Any]:
    phase, alive, dead = int(cast(int, fields["phase"])), ints(fields, "alive"), ints(fields, "dead")
    if set(alive) & set(dead):
        raise ValueError("secure aggregation: the server listed a node both alive and dead")
    if len(alive) < state["threshold"]:
        raise ValueError(f"secure aggregation: {len(alive)} live neighbours, fewer than the threshold")
    held = state["shares"][phase]
    nodes = [n for n in alive + dead if str(n) in held]
    shares = [bytes.fromhex(held[str(n)][0 if n in alive else 1]) for n in nodes]
    return {"nodes": nodes, "shares": shares}


def _record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(t.detach().cpu().numpy())) for k, t in tensors.items()})
