"""The Flower strategy: seeded node sampling, update screening, a pluggable LoRA rule.

It implements Flower's `Strategy` contract (`flwr.serverapp.strategy`): the caller
holds the global adapter as an `ArrayRecord` (Avg-Initial factors, the head and any
base-weight change the rule makes), hands it to `configure_train` /
`configure_evaluate`, and takes the next one from `aggregate_train`. Each round the
strategy samples nodes with its own seeded RNG (from the sorted node ids, so the
draw is reproducible and its state can be checkpointed) and merges the rule's
`client_config` into the train config. A reply must carry exactly the tensors
that config asks for (`reply_factors`: a factor that is frozen or personal stays
out) with the sent shapes and finite values; an error reply or a malformed one is
logged with its node id and left out, and a sampled node that does not reply in
time is logged as such. Factors a client did not send are taken as the ones it
was sent.

Flower hands `aggregate_train` only the replies, but a compressed reply is a change
relative to exactly what was sent (fp16-rounded if so sent) and the rule needs the
adapter the round started from; like Flower's FedOpt (`current_arrays`), the
strategy keeps these from `configure_train`, in one place (`SentRound`), until the
round's `aggregate_train`.

Update norms: a client's update is its change from the adapter it was sent. Its
norm is compared with the round's reference norm, the median of the valid
updates' norms (with two updates the smaller one; a single update cannot be
judged and passes). Beyond `update_norm_factor` × the reference, the update is
rejected (`update_norm_rule="reject"`) or scaled down to that norm ("clip");
"off" only logs the norms. A reference of zero (clients that did not move)
gives no scale and disables the check for the round.

Valid updates are aggregated in the order of the partition ids the clients
report (then node ids), so the result does not depend on reply arrival order.
A round attempt with fewer than `min_train_nodes` valid replies is not
aggregated (`aggregate_train` returns no arrays, so the global adapter stays as
it was) and the caller may retry the round (each attempt gets its own
`RoundLog`). For a personalised rule (FedSA-LoRA) every client also evaluates its
own model after each round; the accuracies are kept per round.

Client-level DP (`privacy`, see `fairedge.server.privacy.central`): central DP replaces the rule's
call with a release of clipped, noised sums (norm screening is then off: DP clipping bounds every
update, and rejecting by the others' norms would break that bound); local DP tells the clients
to noise their updates. Either way the round's (ε, δ) goes into its `RoundLog.privacy`.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fairedge.common.adapter_record import (
    MalformedAdapter,
    adapter_from_record,
    adapter_to_record,
    check_tensors,
    fp32_bytes,
    record_bytes,
    record_tensors,
    reply_tensors,
    shapes,
    unflatten,
)
from fairedge.common.aggregation import Adapter, Aggregator, ClientConfig, ClientUpdate, reply_factors
from fairedge.common.aggregation.ranks import truncate_adapter
from fairedge.common.compression import PayloadError, decompress
from fairedge.server.privacy.central import ClientLevelDP
from fairedge.server.round_log import RoundLog, SentRound

log = logging.getLogger("fairedge.server")


class LoraStrategy(Strategy):
    """Federated LoRA with a server-side `Aggregator`.

    Parameters
    ----------
    aggregator : Aggregator
        The rule that turns client adapters into the next global adapter; its
        `client_config` goes to the clients each round, and `personalized` turns
        on federated evaluation of the clients' own models.
    fraction_train : float
        Fraction of connected nodes sampled for training each round.
    min_train_nodes : int
        Fewest valid replies a round may aggregate (also the minimum sample size).
    downlink : "fp32" | "fp16"
        Precision of the global adapter sent to clients. Compressed replies are
        changes relative to exactly what was sent.
    seed : int
        Seed of the node sampler (`self.sampler`, a `random.Random`).
    update_norm_rule : "reject" | "clip" | "off"
        What happens to an update whose norm exceeds `update_norm_factor` × the
        round's reference norm (see the module docstring).
    update_norm_factor : float
        The limit, as a multiple of the reference norm (> 1).
    node_wait : float
        Seconds `configure_train` waits for `min_train_nodes` nodes to be connected
        (a deployment's SuperNodes may connect after the server starts).
    privacy : ClientLevelDP or None
        Client-level differential privacy (central or local), or none.
    client_ranks : bool
        Heterogeneous LoRA ranks: each node is sent the global adapter cut to its own rank, which it
        reports in a QUERY message the first time it is sampled (and in every train reply). A node
        that does not answer the query gets the whole adapter and cuts it itself.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        downlink: Literal["fp32", "fp16"] = "fp32",
        seed: int = 0,
        update_norm_rule: Literal["reject", "clip", "off"] = "reject",
        update_norm_factor: float = 10.0,
        node_wait: float = 0.0,
        privacy: ClientLevelDP | None = None,
        client_ranks: bool = False,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train!r}")
        if min_train_nodes < 1:
            raise ValueError(f"min_train_nodes must be >= 1, got {min_train_nodes!r}")
        if downlink not in ("fp32", "fp16"):
            raise ValueError(f"downlink must be 'fp32' or 'fp16', got {downlink!r}")
        if update_norm_rule not in ("reject", "clip", "off"):
            raise ValueError(f"update_norm_rule must be 'reject', 'clip' or 'off', got {update_norm_rule!r}")
        if not update_norm_factor > 1:
            raise ValueError(f"update_norm_factor must be > 1, got {update_norm_factor!r}")
        self.aggregator = aggregator
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.downlink = downlink
        self.rounds: list[RoundLog] = []
        self.partitions: dict[int, int] = {}
        """node id → the partition id it last reported (also names nodes whose later replies are errors)."""
        self.sampler = random.Random(seed)
        self.update_norm_rule = update_norm_rule
        self.update_norm_factor = float(update_norm_factor)
        self.node_wait = node_wait
        self.privacy = privacy
        self.client_ranks = client_ranks
        self.node_ranks: dict[int, int] = {}
        """node id → the LoRA rank it reported (heterogeneous ranks)."""
        self._sent: SentRound | None = None

    def summary(self) -> None:
        """Log the strategy's settings (Flower's `Strategy.start` calls this)."""
        log.info(
            "LoraStrategy: aggregation %s, fraction_train %g, min_train_nodes %d, downlink %s, "
            "update norms %s (factor %g)",
            self.aggregator.name,
            self.fraction_train,
            self.min_train_nodes,
            self.downlink,
            self.update_norm_rule,
            self.update_norm_factor,
        )

    def _connected_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids, sorted; waits up to `node_wait` s for `min_train_nodes` of them."""
        deadline = time.monotonic() + self.node_wait
        while len(nodes := sorted(grid.get_node_ids())) < self.min_train_nodes and time.monotonic() < deadline:
            log.info("waiting for nodes: %d connected, %d needed", len(nodes), self.min_train_nodes)
            time.sleep(1.0)
        return nodes

    def _content(
        self, arrays: ArrayRecord, server_round: int, config: ConfigRecord, client_config: ClientConfig
    ) -> tuple[Adapter, ArrayRecord, RecordDict]:
        """The global adapter in `arrays`, its downlink record, and a round's message content (that and the config)."""
        if not arrays:
            raise ValueError(f"round {server_round}: `arrays` must hold the global adapter, got an empty ArrayRecord")
        current = adapter_from_record(arrays)
        downlink = adapter_to_record(current, self.downlink)
        merged = ConfigRecord({**config, **client_config, "server-round": server_round})
        return current, downlink, RecordDict({"arrays": downlink, "config": merged})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each `arrays` (the global adapter) with the round's instructions; log who
        and how many bytes. With fewer than `min_train_nodes` connected nodes nobody is sampled (the attempt fails).
        """
        client_config = {**self.aggregator.client_config(server_round), **self._dp_config()}
        current, downlink, content = self._content(arrays, server_round, config, client_config)
        nodes = self._connected_nodes(grid)
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        sampled = self.sampler.sample(nodes, size) if len(nodes) >= size else []
        entry = RoundLog(
            round=server_round,
            attempt=sum(1 for r in self.rounds if r.round == server_round),
            sampled=sampled,
            client_config=dict(client_config),
        )
        if not sampled:
            entry.failure = f"{len(nodes)} nodes connected, fewer than min_train_nodes={self.min_train_nodes}"
            log.warning("round %d: %s", server_round, entry.failure)
        self.rounds.append(entry)
        if self.client_ranks:
            self._learn_ranks(sampled, config, grid)
            entry.ranks = {n: self.node_ranks[n] for n in sampled if n in self.node_ranks}
        by_rank: dict[int | None, RecordDict] = {None: content}  # one downlink per rank: the global adapter cut to it
        for rank in sorted(set(entry.ranks.values())):
            cut = adapter_to_record(truncate_adapter(current, rank), self.downlink)
            by_rank[rank] = RecordDict({"arrays": cut, "config": content.config_records["config"]})
        messages = []
        for node in sampled:
            node_content = by_rank[entry.ranks.get(node)]
            entry.bytes_down += record_bytes(node_content.array_records["arrays"])
            messages.append(Message(node_content, dst_node_id=node, message_type=MessageType.TRAIN))
        sent = adapter_from_record(downlink)  # what clients start from (fp16-rounded if so sent)
        self._sent = SentRound(entry, current, sent, client_config, messages, population=len(nodes))
        return messages

    def take_sent(self, server_round: int) -> SentRound:
        """What `configure_train` sent this round, handed over (for a caller that aggregates it itself)."""
        round_ = self._sent
        if round_ is None or round_.entry.round != server_round:
            raise RuntimeError(f"take_sent({server_round}) without configure_train({server_round}) before it")
        self._sent = None
        return round_

    def _dp_config(self) -> ClientConfig:
        return dict(self.privacy.client_config()) if self.privacy is not None else {}

    def _learn_ranks(self, nodes: list[int], config: ConfigRecord, grid: Grid) -> None:
        """Ask the nodes whose LoRA rank is unknown for it (one QUERY message each, once per node)."""
        unknown = [n for n in nodes if n not in self.node_ranks]
        if not unknown:
            return
        query = RecordDict({"config": ConfigRecord(dict(config))})
        messages = [Message(query, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=self.node_wait or None):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason.strip().splitlines()[-1] if reply.error.reason else "error")
                self.node_ranks[node] = int(_number(reply.content.metric_records["metrics"], "lora-rank"))
            except (KeyError, TypeError, ValueError, IndexError) as err:
                log.warning("node %d did not report its LoRA rank (%s): it gets the whole adapter", node, err)

    def _client_adapter(self, content: RecordDict, round_: SentRound, node: int, rank: int | None = None) -> Adapter:
        """The adapter a reply stands for: the tensors it sent (as arrays, or as a compressed
        change since what was sent, at the `rank` it reports), with the factors it was not asked to
        send taken from what was sent."""
        sent, entry = round_.sent_to(node, rank), round_.entry
        factors = reply_factors(round_.client_config)
        expected = shapes(sent, factors)
        if "compressed" in content:
            payload = content["compressed"]["payload"]
            if not isinstance(payload, bytes):
                raise MalformedAdapter("compressed payload is not bytes")
            entry.bytes_up += len(payload)
            entry.fp32_bytes_up += fp32_bytes(sent, factors)
            delta = decompress(payload, expected=expected)
            start = reply_tensors(sent, factors)
            tensors = {k: start[k] + delta[k] for k in start}
        elif "arrays" in content:
            entry.bytes_up += record_bytes(content.array_records["arrays"])
            entry.fp32_bytes_up += fp32_bytes(sent, factors)
            tensors = record_tensors(content.array_records["arrays"])
        else:
            raise MalformedAdapter("reply lacks 'arrays' (or 'compressed')")
        check_tensors(tensors, expected)
        return unflatten({**reply_tensors(sent), **tensors})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, screen update norms, aggregate the valid ones; return the next global adapter.

        Returns `(None, None)` when fewer than `min_train_nodes` updates are left; the
        reason is in the round log's `failure`.
        """
        round_ = self._sent
        if round_ is None or round_.entry.round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train({server_round}) before it")
        self._sent = None
        entry = round_.entry
        updates: list[ClientUpdate] = []
        losses: dict[int, float] = {}
        dp_clipped = 0
        for msg in replies:
            node = round_.sender(msg)
            if msg.has_error():
                reason = (msg.error.reason or f"error code {msg.error.code}").strip().splitlines()[-1]
                if msg.metadata.src_node_id != node:  # the SuperLink answered for a node that is gone
                    self._reject(entry, node, f"no reply: {reason}")
                    continue
                entry.replied.append(node)
                self._reject(entry, node, f"client error: {reason}")
                continue
            entry.replied.append(node)
            try:
                content = msg.content
                if "metrics" not in content:
                    raise MalformedAdapter("reply lacks 'metrics'")
                metrics = content.metric_records["metrics"]
                if "partition-id" in metrics:
                    self.partitions[node] = int(_number(metrics, "partition-id"))
                num_examples = int(_number(metrics, "num-examples", -1))
                if num_examples <= 0:
                    raise MalformedAdapter(f"num-examples must be positive, got {num_examples}")
                rank = self._reply_rank(metrics, round_, node)
                adapter = self._client_adapter(content, round_, node, rank)
            except PayloadError as err:
                self._reject(entry, node, f"bad compressed payload: {err}")
                continue
            except (MalformedAdapter, KeyError, TypeError, ValueError) as err:
                self._reject(entry, node, f"malformed reply: {err}")
                continue
            updates.append(ClientUpdate(adapter, num_examples, node))
            losses[node] = _number(metrics, "train-loss", float("nan"))
            dp_clipped += int(_number(metrics, "dp-clipped", 0))
        answered = set(entry.replied) | set(entry.rejected)
        entry.no_reply = [n for n in entry.sampled if n not in answered]
        entry.partitions = {n: self.partitions[n] for n in entry.sampled + entry.replied if n in self.partitions}
        for node in entry.no_reply:
            log.warning("round %d: left out node %d: no reply within the round timeout", server_round, node)

        updates = self._screen_update_norms(updates, round_)
        if self.privacy is not None and not self.privacy.central and updates:  # local DP: sent, so spent
            entry.privacy = self.privacy.account_local(len(entry.sampled), round_.population, dp_clipped)
        updates.sort(key=lambda u: (entry.partitions.get(u.node_id, math.inf), u.node_id))
        if len(updates) < self.min_train_nodes:
            entry.failure = entry.failure or (
                f"{len(updates)} valid updates from {len(entry.sampled)} sampled nodes, "
                f"fewer than min_train_nodes={self.min_train_nodes}"
            )
            log.warning(
                "round %d (attempt %d) not aggregated: %s; global adapter unchanged",
                server_round,
                entry.attempt + 1,
                entry.failure,
            )
            return None, None
        if self.privacy is not None and self.privacy.central:
            new, agg_metrics, entry.privacy = self.privacy.release(updates, round_, self.aggregator, round_.population)
        else:
            new, agg_metrics = self.aggregator.aggregate(updates, round_.current)
        total = sum(u.num_examples for u in updates)
        train_loss = sum(losses[u.node_id] * u.num_examples for u in updates) / total
        entry.metrics = {"train-loss": train_loss, **agg_metrics}
        entry.aggregated = True
        return adapter_to_record(new), MetricRecord({**entry.metrics})

    def _reply_rank(self, metrics: MetricRecord, round_: SentRound, node: int) -> int | None:
        """The LoRA rank a reply reports (`lora-rank`), if it differs from what was sent and the rule takes it."""
        if "lora-rank" not in metrics:
            return None
        rank, sent = int(_number(metrics, "lora-rank")), round_.sent_to(node)
        sent_rank = next(iter(sent.factors.values()))[0].shape[0] if sent.factors else rank
        if rank == sent_rank:
            if self.client_ranks:
                self.node_ranks[node] = rank  # known now: no query next time
            return None
        if not (self.client_ranks and self.aggregator.mixed_ranks and 1 <= rank < sent_rank):
            raise MalformedAdapter(f"reply of LoRA rank {rank}, but rank {sent_rank} was sent")
        self.node_ranks[node] = rank
        round_.entry.ranks[node] = rank
        return rank

    def _screen_update_norms(self, updates: list[ClientUpdate], round_: SentRound) -> list[ClientUpdate]:
        """Log every update's norm; reject or clip those beyond `update_norm_factor` × the reference norm."""
        entry = round_.entry
        factors = reply_factors(round_.client_config)
        starts = {u.node_id: reply_tensors(round_.sent_to(u.node_id), factors) for u in updates}
        norms = [update_norm(reply_tensors(u.adapter), starts[u.node_id]) for u in updates]
        entry.update_norms.update({u.node_id: n for u, n in zip(updates, norms, strict=True)})
        if self.update_norm_rule == "off" or len(updates) < 2:
            return updates
        reference = statistics.median(norms) if len(norms) >= 3 else min(norms)
        if reference == 0:
            return updates
        limit = self.update_norm_factor * reference
        what = "median update norm" if len(norms) >= 3 else "smaller update norm"
        kept = []
        for u, norm in zip(updates, norms, strict=True):
            if norm <= limit:
                kept.append(u)
                continue
            why = (
                f"update norm {norm:.4g} is {norm / reference:.3g}x the round's {what} {reference:.4g} "
                f"(limit {self.update_norm_factor:g}x)"
            )
            if self.update_norm_rule == "reject":
                self._reject(entry, u.node_id, why)
                continue
            scale = limit / norm
            entry.clipped[u.node_id] = f"{why}: scaled by {scale:.3g} to norm {limit:.4g}"
            log.warning("round %d: clipped node %d: %s", entry.round, u.node_id, entry.clipped[u.node_id])
            tensors, start = reply_tensors(u.adapter), starts[u.node_id]
            scaled = {k: start[k] + (tensors[k] - start[k]) * scale for k in start}
            kept.append(ClientUpdate(unflatten({**tensors, **scaled}), u.num_examples, u.node_id))
        return kept

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """For a personalised rule, ask every connected node to evaluate its own model on its own domains,
        sending it `arrays` (the global adapter) and the round's instructions."""
        if not self.aggregator.personalized:
            return []
        _, _, content = self._content(arrays, server_round, config, self.aggregator.client_config(server_round))
        return [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in sorted(grid.get_node_ids())
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each client's personalised accuracy in the round's log; return their mean."""
        entry = next((r for r in reversed(self.rounds) if r.round == server_round), None)
        if entry is None:
            raise RuntimeError(f"aggregate_evaluate({server_round}) for a round that was never configured")
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed to evaluate: %s", server_round, node, msg.error.reason)
                continue
            try:
                metrics = msg.content.metric_records["metrics"]
                entry.personal_accuracy[int(_number(metrics, "partition-id"))] = _number(metrics, "accuracy")
            except (KeyError, TypeError, ValueError) as err:
                log.warning("round %d: node %d sent a malformed evaluation: %s", server_round, node, err)
        if not entry.personal_accuracy:
            return None
        accs = list(entry.personal_accuracy.values())
        return MetricRecord({"personal-mean-accuracy": sum(accs) / len(accs)})

    def state_dict(self) -> dict[str, Any]:
        """What the strategy keeps across rounds, as JSON-able data: the sampler's state and the round logs
        (the global adapter is the caller's, the aggregator's state is its own `state_dict`)."""
        version, internal, gauss = self.sampler.getstate()
        state = {"sampler": [version, list(internal), gauss], "rounds": [r.to_json() for r in self.rounds]}
        return state | ({"privacy": self.privacy.state_dict()} if self.privacy is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (resume)."""
        version, internal, gauss = state["sampler"]
        rounds = [RoundLog.from_json(r) for r in state["rounds"]]
        self.sampler.setstate((version, tuple(internal), gauss))
        self.rounds = rounds
        if self.privacy is not None:
            if "privacy" not in state:
                raise ValueError("the checkpoint has no privacy ledger, but this run has privacy.enabled")
            self.privacy.load_state_dict(state["privacy"])
        self.partitions = {n: p for r in self.rounds for n, p in r.partitions.items()}
        self._sent = None

    @staticmethod
    def _reject(entry: RoundLog, node: int, reason: str) -> None:
        entry.rejected[node] = reason
        log.warning("round %d: left out node %d: %s", entry.round, node, reason)


def _number(metrics: MetricRecord, key: str, default: float | None = None) -> float:
    """A reply's metric as a float; KeyError if it is missing (and has no default), ValueError if not a number."""
    value = metrics[key] if default is None else metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}")
    return float(value)


def update_norm(tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """`‖tensors − start‖` over the keys of `start` (float64)."""
    return math.sqrt(sum(float((tensors[k].double() - s.double()).square().sum()) for k, s in start.items()))
