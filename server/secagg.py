"""The server side of secure aggregation: one SecAgg+ round over the Grid, learning only sums.

Why our own driver and not Flower's `SecAggPlusWorkflow`: that workflow runs inside Flower's legacy
`DefaultWorkflow` (it needs a `LegacyContext` and a legacy `Strategy` with `configure_fit` /
`aggregate_fit` on `ClientProxy`s), and its client mod masks the legacy `FitRes` parameters of one
reply; our ServerApp drives rounds itself (`LoraStrategy`, retries, checkpoints) and LoRA-FAIR needs a
second masked sum that depends on the first. So we run the same four stages with Flower's primitives
(`fairedge.common.secagg`), through `LoraStrategy.configure_train` for sampling and round logs:

    setup -> share-keys -> masked (train) -> unmask                       sum of w_k·(x_k − sent)
                              LoRA-FAIR:  -> masked (Ā) -> unmask         sum of w_k·(B_k A_k Āᵀ − ref)

The first sum gives the example-weighted mean of the factors and the head; FedIT, FFA-LoRA, RoLoRA
and FedSA-LoRA's rule applied to that mean as a single client is the rule's output. LoRA-FAIR
(frobenius) broadcasts `Ā` and gets `M = Σ p_k B_k A_k Āᵀ` securely, then `B'` from `(Ā, B̄, M)`.

Dropouts (SecAgg+): a client that stops before sending its masked vector is left out, and its
pairwise masks are rebuilt from `threshold` of its neighbours' shares of its mask key; a survivor's
self mask is rebuilt from shares of its seed. Too few shares for any of them, or fewer survivors
than `min_train_nodes`, fail the attempt (the caller retries the round). A client lost in LoRA-FAIR's
second phase leaves `M` averaged over fewer clients than `Ā`, `B̄` (logged: `secagg/phase1_dropped`).
The server is assumed honest-but-curious (as in Flower's implementation: no consistency round).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp import Grid

from fairedge.common.adapter_record import adapter_to_record, fp32_bytes, record_bytes, reply_tensors, unflatten
from fairedge.common.aggregation import Adapter, ClientUpdate, frobenius_from_sums, reply_factors
from fairedge.common.privacy_config import SecureAggregationConfig
from fairedge.common.secagg import (
    SECAGG_KEY,
    FixedPoint,
    Layout,
    Stage,
    blob,
    blobs,
    combine,
    ints,
    layer_product,
    pairwise_mask,
    prg,
    shared_key,
)
from fairedge.server.round_log import SentRound
from fairedge.server.strategy import LoraStrategy

log = logging.getLogger("fairedge.server")


class SecAggFailed(RuntimeError):
    """Too few clients or shares to finish the protocol; the round attempt is not aggregated."""


class SecureAggregation:
    """Runs rounds of `strategy` under SecAgg+ (see the module docstring)."""

    def __init__(self, cfg: SecureAggregationConfig, *, lam: float = 0.01, timeout: float | None = None) -> None:
        self.cfg = cfg
        self.fp = FixedPoint(cfg.clip_range, cfg.quantization_bits, cfg.modulus_bits)
        self.lam = lam
        self.timeout = timeout

    def run_round(
        self, strategy: LoraStrategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One attempt at a round; `(None, None)` if it fails (the reason is in the round log)."""
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        round_ = strategy.take_sent(server_round)
        if not messages:
            return None, None
        run = _Run(self, strategy, round_, grid, messages[0].content)
        try:
            new, metrics = run.protocol()
        except SecAggFailed as err:
            round_.entry.failure = f"secure aggregation: {err}"
            log.warning("round %d not aggregated: %s", server_round, round_.entry.failure)
            return None, None
        finally:
            run.close()
        round_.entry.metrics = metrics
        round_.entry.aggregated = True
        return adapter_to_record(new), MetricRecord(dict(metrics))


class _Run:
    """The state of one protocol run: who is still in, their keys, the neighbour graph, the bytes."""

    def __init__(self, sa: SecureAggregation, strategy: LoraStrategy, round_: SentRound, grid: Grid, train: RecordDict):
        self.sa, self.strategy, self.round_, self.grid, self.train = sa, strategy, round_, grid, train
        self.entry = round_.entry
        self.two_phase = strategy.aggregator.name == "lora_fair"
        sampled = list(self.entry.sampled)
        n = len(sampled)
        shares = min(sa.cfg.num_shares or n, n)
        self.threshold = max(2, math.ceil(sa.cfg.reconstruction_threshold * shares))
        secrets.SystemRandom().shuffle(sampled)  # the graph must not be the server's choice of who sees whom
        half = shares // 2
        self.neighbours = {
            u: ({sampled[(i + d) % n] for d in range(-half, half + 1)} if shares < n else set(sampled))
            for i, u in enumerate(sampled)
        }
        self.pk1: dict[int, list[bytes]] = {}
        self.silent: set[int] = set()
        """nodes that did not answer a stage they were sent (dropped out)."""
        self.dp_clipped = 0
        self.entry.bytes_down = 0  # counted per protocol message below

    def protocol(self) -> tuple[Adapter, dict[str, float]]:
        alive = self._setup(set(self.entry.sampled))
        alive = self._share_keys(alive)
        start = reply_tensors(self.round_.sent, reply_factors(self.round_.client_config))
        layout = Layout.of(start)
        masked, survivors = self._collect(alive, Stage.MASKED, 0, layout.size)
        totals = self._unmask(masked, 0, survivors, alive)
        examples, clamped, loss, sums = self.sa.fp.decode(totals)
        weight = examples / self.sa.cfg.max_weight
        mean = {k: start[k].double() + v / weight for k, v in layout.split(sums).items()}
        metrics = {
            "train-loss": loss / weight,
            "secagg/survivors": float(len(survivors)),
            "secagg/dropped": float(len(self.entry.sampled) - len(survivors)),
            "secagg/clamped": float(clamped),
            "secagg/threshold": float(self.threshold),
        }
        if clamped:
            log.warning(
                "round %d: %d weighted update entries exceeded privacy.secure_aggregation.clip_range=%g and were "
                "clamped",
                self.entry.round,
                clamped,
                self.sa.cfg.clip_range,
            )
        self.entry.replied = sorted(survivors)
        self.entry.fp32_bytes_up = fp32_bytes(self.round_.sent, reply_factors(self.round_.client_config)) * len(
            survivors
        )
        if self.strategy.privacy is not None:  # local DP (central is a config error): sent, so spent
            self.entry.privacy = self.strategy.privacy.account_local(
                len(self.entry.sampled), self.round_.population, self.dp_clipped
            )
        as_sent = {k: v.to(start[k].dtype) for k, v in mean.items()}
        private = unflatten({**reply_tensors(self.round_.sent), **as_sent})
        if not self.two_phase:
            new, agg = self.strategy.aggregator.aggregate([ClientUpdate(private, 1, 0)], self.round_.current)
            return new, {**metrics, **agg}
        return self._lora_fair(private, mean, survivors, metrics)

    def _lora_fair(
        self, private: Adapter, mean: dict[str, torch.Tensor], phase0: set[int], metrics: dict[str, float]
    ) -> tuple[Adapter, dict[str, float]]:
        """Phase 1: broadcast `Ā`, securely sum `B_k A_k Āᵀ − B_s A_s Āᵀ`, solve frobenius LoRA-FAIR."""
        # Ā goes down as float32 (like every global adapter); clients and the reference use exactly that
        abar = {f"lora/{layer}/A": mean[f"lora/{layer}/A"].float() for layer in private.factors}
        sent = reply_tensors(self.round_.sent)
        ref = {k.removesuffix("/A") + "/M": layer_product(sent, k, a) for k, a in abar.items()}
        layout = Layout.of(ref)
        extra = {"abar": ArrayRecord({k: Array(a.numpy()) for k, a in abar.items()})}
        masked, survivors = self._collect(phase0, Stage.MASKED, 1, layout.size, extra, peers=sorted(phase0))
        examples, _, _, sums = self.sa.fp.decode(self._unmask(masked, 1, survivors, phase0))
        weight = examples / self.sa.cfg.max_weight
        m = {k: ref[k] + v / weight for k, v in layout.split(sums).items()}
        factors = {}
        for layer, (a, b) in private.factors.items():
            key = f"lora/{layer}/"
            b_new = frobenius_from_sums(mean[key + "A"], mean[key + "B"], m[key + "M"], self.sa.lam)
            factors[layer] = (a, b_new.to(b.dtype))
        metrics["secagg/phase1_dropped"] = float(len(phase0) - len(survivors))
        return Adapter(factors, private.head), metrics

    # --- the stages -------------------------------------------------------------------------------

    def _setup(self, nodes: set[int]) -> set[int]:
        phases = 2 if self.two_phase else 1
        fields: dict[str, ConfigRecordValues] = {
            "stage": Stage.SETUP,
            "phases": phases,
            "threshold": self.threshold,
            "num_shares": max(len(v) for v in self.neighbours.values()),
            "clip_range": float(self.sa.cfg.clip_range),
            "bits": self.sa.cfg.quantization_bits,
            "modulus_bits": self.sa.cfg.modulus_bits,
            "max_weight": float(self.sa.cfg.max_weight),
        }
        replies = self._exchange({u: RecordDict({SECAGG_KEY: ConfigRecord(fields)}) for u in nodes})
        self.pk2: dict[int, bytes] = {}
        for u, rec in replies.items():
            self.pk1[u], self.pk2[u] = blobs(rec, "pk1"), blob(rec, "pk2")
        return self._enough(set(replies), "setup")

    def _share_keys(self, alive: set[int]) -> set[int]:
        contents = {}
        for u in alive:
            nodes = sorted(self.neighbours[u] & alive)
            fields: dict[str, ConfigRecordValues] = {
                "stage": Stage.SHARE_KEYS,
                "nodes": nodes,
                "pk1": [k for v in nodes for k in self.pk1[v]],
                "pk2": [self.pk2[v] for v in nodes],
            }
            contents[u] = RecordDict({SECAGG_KEY: ConfigRecord(fields)})
        replies = self._exchange(contents)
        self.forward: dict[int, list[tuple[int, bytes]]] = {u: [] for u in replies}
        for src, rec in replies.items():
            for dst, ct in zip(ints(rec, "dsts"), blobs(rec, "ciphertexts"), strict=True):
                if dst in self.forward:
                    self.forward[dst].append((src, ct))
        return self._enough(set(replies), "share-keys")

    def _collect(
        self,
        nodes: set[int],
        stage: str,
        phase: int,
        size: int,
        extra: Mapping[str, ArrayRecord] | None = None,
        peers: list[int] | None = None,
    ) -> tuple[np.ndarray, set[int]]:
        """Send the masked stage of `phase`; the sum of the masked vectors that came back, and their senders."""
        contents = {}
        for u in nodes:
            fields: dict[str, Any] = {"stage": stage, "phase": phase}
            if phase == 0:
                fields |= {"srcs": [s for s, _ in self.forward[u]], "ciphertexts": [c for _, c in self.forward[u]]}
                content = RecordDict({"arrays": self.train["arrays"], "config": self.train["config"]})
            else:
                fields["peers"] = peers or []
                content = RecordDict(dict(extra or {}))
            content[SECAGG_KEY] = ConfigRecord(fields)
            contents[u] = content
        replies = self._exchange(contents, metrics=phase == 0)
        total = np.zeros(size + 3, dtype=self.sa.fp.dtype)
        for u, rec in list(replies.items()):
            vec = np.frombuffer(blob(rec, "masked"), dtype=self.sa.fp.dtype)
            if vec.shape != total.shape:
                self.strategy._reject(self.entry, u, f"masked vector of {vec.size} entries, expected {total.size}")
                del replies[u]
                continue
            total += vec
        return total, self._enough(set(replies), f"masked vectors of phase {phase}", survivors=True)

    def _unmask(self, total: np.ndarray, phase: int, survivors: set[int], participants: set[int]) -> np.ndarray:
        """Remove the survivors' self masks and the dropped participants' pairwise masks from `total`."""
        dead = participants - survivors
        contents = {
            u: RecordDict(
                {
                    SECAGG_KEY: ConfigRecord(
                        {
                            "stage": Stage.UNMASK,
                            "phase": phase,
                            "alive": sorted(self.neighbours[u] & survivors),
                            "dead": sorted(self.neighbours[u] & dead),
                        }
                    )
                }
            )
            for u in survivors
        }
        replies = self._exchange(contents)
        collected: dict[int, list[bytes]] = {u: [] for u in participants}
        for rec in replies.values():
            for owner, share in zip(ints(rec, "nodes"), blobs(rec, "shares"), strict=True):
                if owner in collected:
                    collected[owner].append(share)
        out = total.copy()
        dtype, length = out.dtype.type, len(out)
        for u in sorted(participants):
            if u not in survivors and not self.neighbours[u] & survivors - {u}:
                continue  # no survivor masked with it
            if len(collected[u]) < self.threshold:
                raise SecAggFailed(
                    f"phase {phase}: {len(collected[u])} shares of node {u}'s {'seed' if u in survivors else 'mask key'}"
                    f" came back, fewer than the threshold {self.threshold}"
                )
            secret = combine(collected[u])
            if u in survivors:
                out -= prg(secret, phase, length, dtype)
                continue
            for v in sorted(self.neighbours[u] & survivors - {u}):  # v added pairwise_mask(v, u); take it out
                key = shared_key(secret, self.pk1[v][phase])
                out -= pairwise_mask(v, u, key, phase, length, dtype)
        return out

    # --- plumbing ---------------------------------------------------------------------------------

    def _exchange(self, contents: Mapping[int, RecordDict], metrics: bool = False) -> dict[int, ConfigRecord]:
        """Send each node its content; the protocol records of the nodes that answered without error."""
        messages = [Message(c, dst_node_id=u, message_type=MessageType.TRAIN) for u, c in contents.items()]
        for m in messages:
            self.entry.bytes_down += _content_bytes(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=self.sa.timeout)) if messages else []
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        out: dict[int, ConfigRecord] = {}
        answered = set()
        for msg in replies:
            u = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(u)
            if msg.has_error():
                reason = (msg.error.reason or f"error code {msg.error.code}").strip().splitlines()[-1]
                self.strategy._reject(self.entry, u, f"secure aggregation: {reason}")
                continue
            if SECAGG_KEY not in msg.content.config_records:
                self.strategy._reject(self.entry, u, f"secure aggregation: reply lacks '{SECAGG_KEY}'")
                continue
            self.entry.bytes_up += _content_bytes(msg.content)
            if metrics and "metrics" in msg.content.metric_records:
                rec = msg.content.metric_records["metrics"]
                if "partition-id" in rec:
                    self.strategy.partitions[u] = int(cast(int, rec["partition-id"]))
                self.dp_clipped += int(cast(int, rec.get("dp-clipped", 0)))
            out[u] = msg.content.config_records[SECAGG_KEY]
        self.silent |= set(contents) - answered
        return out

    def _enough(self, nodes: set[int], stage: str, survivors: bool = False) -> set[int]:
        short = [u for u in nodes if len(self.neighbours[u] & nodes) < self.threshold]
        if short or len(nodes) < max(2, self.threshold):
            raise SecAggFailed(
                f"after {stage}: {len(nodes)} clients left, fewer than the threshold {self.threshold} "
                f"among the neighbours of node(s) {sorted(short)}"
            )
        if survivors and len(nodes) < self.strategy.min_train_nodes:
            raise SecAggFailed(
                f"{len(nodes)} masked vectors, fewer than min_train_nodes={self.strategy.min_train_nodes}"
            )
        return nodes

    def close(self) -> None:
        """Fill in the round log: who never answered, and the partitions of those who did."""
        e = self.entry
        e.no_reply = [u for u in e.sampled if u in self.silent and u not in e.rejected]
        e.partitions = {u: self.strategy.partitions[u] for u in e.sampled if u in self.strategy.partitions}
        for u in e.no_reply:
            log.warning("round %d: node %d dropped out of secure aggregation (no reply in time)", e.round, u)


def _content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: its arrays (as `record_bytes` counts them) plus its bytes, strings and numbers."""
    total = sum(record_bytes(rec) for rec in content.array_records.values())
    for rec in content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            total += sum(len(i) if isinstance(i, (bytes, str)) else 8 for i in items)
    return total
