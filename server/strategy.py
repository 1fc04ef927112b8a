"""The Flower strategy: FedAvg's sampling and messaging, a pluggable LoRA aggregation rule.

The strategy keeps the global `Adapter` (the factors clients restart from each
round: Avg-Initial, plus any base-weight change the rule makes). Each round it
merges the rule's `client_config` into the train config; a reply must carry
exactly the tensors that config asks for (`reply_factors`: a factor that is
frozen or personal stays out) with the sent shapes and finite values; an error
reply or a malformed one is logged with its node id and left out. Factors a
client did not send are taken as the ones it was sent. A round with fewer than
`min_train_nodes` valid replies is not aggregated: the global adapter stays as
it was. For a personalised rule (FedSA-LoRA) every client also evaluates its own
model after each round; the accuracies are kept per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.adapter_record import (
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
from common.aggregation import Adapter, Aggregator, ClientConfig, ClientUpdate, reply_factors
from common.compression import PayloadError, decompress

log = logging.getLogger("fairedge.server")


@dataclass
class RoundLog:
    """Who took part in a round, what it cost on the wire and, if personalised, each client's accuracy."""

    round: int
    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_bytes_up: int = 0
    aggregated: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    client_config: ClientConfig = field(default_factory=dict)
    personal_accuracy: dict[int, float] = field(default_factory=dict)
    """partition id → accuracy of that client's own model on its own domains (personalised rules)."""


class LoraStrategy(FedAvg):
    """Federated LoRA with a server-side `Aggregator`.

    Parameters
    ----------
    aggregator : Aggregator
        The rule that turns client adapters into the next global adapter; its
        `client_config` goes to the clients each round, and `personalized` turns
        on federated evaluation of the clients' own models.
    initial : Adapter
        The global adapter of round 1 (fresh LoRA factors and the pre-trained head).
    fraction_train : float
        Fraction of connected nodes sampled for training each round.
    min_train_nodes : int
        Fewest valid replies a round may aggregate (also the minimum sample size,
        and for personalised evaluation the minimum number of evaluating nodes).
    downlink : "fp32" | "fp16"
        Precision of the global adapter sent to clients. Compressed replies are
        changes relative to exactly what was sent.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        initial: Adapter,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        downlink: Literal["fp32", "fp16"] = "fp32",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=1.0 if aggregator.personalized else 0.0,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_train_nodes,
            min_available_nodes=min_train_nodes,
        )
        self.aggregator = aggregator
        self.global_adapter = initial
        self.downlink = downlink
        self.sent = initial
        self.round_config: ClientConfig = {}
        self.rounds: list[RoundLog] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global adapter and the round's instructions; log who and how many bytes."""
        self.round_config = self.aggregator.client_config(server_round)
        arrays = adapter_to_record(self.global_adapter, self.downlink)
        self.sent = adapter_from_record(arrays)  # what clients start from (fp16-rounded if so sent)
        config = ConfigRecord({**config, **self.round_config})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append(
            RoundLog(
                round=server_round,
                sampled=[m.metadata.dst_node_id for m in messages],
                bytes_down=record_bytes(arrays) * len(messages),
                client_config=dict(self.round_config),
            )
        )
        return messages

    def _client_adapter(self, content: RecordDict, entry: RoundLog) -> Adapter:
        """The adapter a reply stands for: the tensors it sent (as arrays, or as a compressed
        change since `self.sent`), with the factors it was not asked to send taken from `self.sent`."""
        factors = reply_factors(self.round_config)
        expected = shapes(self.sent, factors)
        if "compressed" in content:
            payload = content["compressed"]["payload"]
            if not isinstance(payload, bytes):
                raise MalformedAdapter("compressed payload is not bytes")
            entry.bytes_up += len(payload)
            entry.fp32_bytes_up += fp32_bytes(self.sent, factors)
            delta = decompress(payload, expected=expected)
            start = reply_tensors(self.sent, factors)
            tensors = {k: start[k] + delta[k] for k in start}
        elif "arrays" in content:
            entry.bytes_up += record_bytes(content["arrays"])
            entry.fp32_bytes_up += fp32_bytes(self.sent, factors)
            tensors = record_tensors(content["arrays"])
        else:
            raise MalformedAdapter("reply lacks 'arrays' (or 'compressed')")
        check_tensors(tensors, expected)
        return unflatten({**reply_tensors(self.sent), **tensors})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate the valid ones, keep the result as the global adapter."""
        entry = self.rounds[-1]
        updates: list[ClientUpdate] = []
        losses: list[tuple[float, int]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            entry.replied.append(node)
            if msg.has_error():
                reason = (msg.error.reason or f"error code {msg.error.code}").strip().splitlines()[-1]
                self._reject(entry, node, f"client error: {reason}")
                continue
            try:
                content = msg.content
                if "metrics" not in content:
                    raise MalformedAdapter("reply lacks 'metrics'")
                metrics = content["metrics"]
                num_examples = int(metrics.get("num-examples", -1))
                if num_examples <= 0:
                    raise MalformedAdapter(f"num-examples must be positive, got {num_examples}")
                adapter = self._client_adapter(content, entry)
            except PayloadError as err:
                self._reject(entry, node, f"bad compressed payload: {err}")
                continue
            except (MalformedAdapter, KeyError, TypeError, ValueError) as err:
                self._reject(entry, node, f"malformed reply: {err}")
                continue
            updates.append(ClientUpdate(adapter, num_examples, node))
            losses.append((float(metrics.get("train-loss", float("nan"))), num_examples))

        if len(updates) < self.min_train_nodes:
            log.warning(
                "round %d: only %d valid replies (< min_train_nodes=%d); global adapter unchanged",
                server_round, len(updates), self.min_train_nodes,
            )
            return None, None
        self.global_adapter, agg_metrics = self.aggregator.aggregate(updates, self.global_adapter)
        total = sum(n for _, n in losses)
        entry.metrics = {"train-loss": sum(l * n for l, n in losses) / total, **agg_metrics}
        entry.aggregated = True
        return adapter_to_record(self.global_adapter), MetricRecord(entry.metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """For a personalised rule, ask every node to evaluate its own model on its own domains."""
        if not self.aggregator.personalized:
            return []
        return super().configure_evaluate(server_round, arrays, ConfigRecord({**config, **self.round_config}), grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each client's personalised accuracy in the round log; return their mean."""
        entry = self.rounds[-1]
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log.warning("round %d: node %d failed to evaluate: %s", server_round, node, msg.error.reason)
                continue
            try:
                metrics = msg.content["metrics"]
                entry.personal_accuracy[int(metrics["partition-id"])] = float(metrics["accuracy"])
            except (KeyError, TypeError, ValueError) as err:
                log.warning("round %d: node %d sent a malformed evaluation: %s", server_round, node, err)
        if not entry.personal_accuracy:
            return None
        accs = list(entry.personal_accuracy.values())
        return MetricRecord({"personal-mean-accuracy": sum(accs) / len(accs)})

    @staticmethod
    def _reject(entry: RoundLog, node: int, reason: str) -> None:
        entry.rejected[node] = reason
        log.warning("round %d: left out node %d: %s", entry.round, node, reason)
