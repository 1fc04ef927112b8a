"""What one round attempt leaves behind: its log (`RoundLog`, kept in checkpoints and `metrics.json`) and
what `configure_train` sent (`SentRound`, kept until that attempt's `aggregate_train`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import Message

from fairedge.common.aggregation import Adapter, ClientConfig
from fairedge.common.aggregation.ranks import truncate_adapter


@dataclass
class RoundLog:
    """One attempt at a round: who took part, who was left out and why, what it cost on the wire
    and, if personalised, each client's accuracy. Node ids are Flower's."""

    round: int
    attempt: int = 0
    """0 for the first try of a round, 1 for its first retry, ..."""
    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    no_reply: list[int] = field(default_factory=list)
    """sampled nodes with no reply within the round timeout (crashed, disconnected or too slow)."""
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, str] = field(default_factory=dict)
    partitions: dict[int, int] = field(default_factory=dict)
    """node id → partition id of the sampled and replying nodes, where known (reported this round or earlier)."""
    update_norms: dict[int, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_bytes_up: int = 0
    aggregated: bool = False
    failure: str = ""
    """why this attempt was not aggregated (empty when it was)."""
    metrics: dict[str, float] = field(default_factory=dict)
    client_config: ClientConfig = field(default_factory=dict)
    personal_accuracy: dict[int, float] = field(default_factory=dict)
    """partition id → accuracy of that client's own model on its own domains (personalised rules)."""
    privacy: dict[str, float] = field(default_factory=dict)
    """client-level DP of this attempt, if on: ε of the round and in total, δ, clipped clients, ..."""
    ranks: dict[int, int] = field(default_factory=dict)
    """node id → the LoRA rank it was sent, or trained if it cut a larger one (heterogeneous ranks; else empty)."""

    _INT_KEYED = ("rejected", "clipped", "partitions", "update_norms", "personal_accuracy", "ranks")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (JSON turns its int keys into strings; `from_json` turns them back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundLog:
        fields: dict[str, Any] = {
            k: ({int(n): v for n, v in val.items()} if k in cls._INT_KEYED else val) for k, val in data.items()
        }
        return cls(**fields)


@dataclass
class SentRound:
    """What `configure_train` sent in a round attempt, for that attempt's `aggregate_train`."""

    entry: RoundLog
    current: Adapter
    """the global adapter the round started from (what the rule aggregates onto)."""
    sent: Adapter
    """what the clients received and start from (`current`, fp16-rounded if the downlink is fp16)."""
    client_config: ClientConfig
    messages: list[Message]
    """the train messages; the grid gives each its message id when it pushes it."""
    population: int = 0
    """nodes connected when the round was sampled (the accountant's N)."""

    def sent_to(self, node: int, rank: int | None = None) -> Adapter:
        """What `node` started from: `sent` cut to `rank`, else to the rank it was sent (heterogeneous ranks)."""
        return truncate_adapter(self.sent, rank or self.entry.ranks.get(node))

    def sender(self, reply: Message) -> int:
        """The node a reply stands for: the one its message was sent to.

        An error reply made by the SuperLink for a node that died carries the
        SuperLink's own id as sender; the message ids still say whom it was meant for.
        """
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.messages if m.metadata.message_id}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
