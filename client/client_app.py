"""The Flower ClientApp: local LoRA training from the global adapter (Avg-Initial).

Each train message carries the global adapter (`arrays`), the run config
(`config["fairedge-config"]`, JSON) and the aggregator's instructions for the
round (`config["train-factors"]`, `config["personal-b"]`, see
`fairedge.common.aggregation.base`). The client sets its base weights to `W0` plus the
adapter's base delta (FLoRA, FedEx-LoRA), loads the factors (with
`personal-b`, its own B from earlier rounds instead of the global one), trains
the factors it is told to, and replies with what `reply_factors` names plus the
head (`arrays`), or with compression on, the ComPEFT-compressed change since
what it started from (`compressed["payload"]`, see `fairedge.client.update_compression`).
A personal B never leaves the client: it is kept in Flower's per-node context
state. Evaluate messages are answered with this node's accuracy on the test
data of its own domains (for personalised methods: global A, own B).
The node's data comes from the node config: `partition-id` of
`num-partitions` selects the client's share of the run's data, or `data-path`
points at the node's own files (same `data.task` as the run, used whole; only
with `model.kind = "hf-text"`, whose base model every node loads from disk: the
built-in ViT is pre-trained on the run's data, so its nodes must share that data).

Every call loads what it needs (the data, the base model from its cache file or folder) and
keeps nothing in the process between calls: a node's memory is its Flower context state. Nor
does it change process-wide settings: the thread count belongs to the process's entry point
(`fairedge-sim run --threads`; in Ray's client processes Ray sets `OMP_NUM_THREADS` from
`federation.client_cpus`), which with `--engine inprocess` is shared with the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from fairedge.client.secagg import secagg_mod
from fairedge.client.update_compression import compress_update
from fairedge.common.adapter_record import adapter_from_record, reply_tensors, tensors_to_record
from fairedge.common.aggregation import PERSONAL_B, TRAIN_FACTORS, reply_factors
from fairedge.common.aggregation.ranks import truncate_adapter
from fairedge.common.config import RunConfig
from fairedge.common.data import TaskData
from fairedge.common.data.task_data import Examples
from fairedge.common.lora import get_base_weights, get_lora_factors, set_lora_factors, set_trainable_factors
from fairedge.common.lora_ranks import at_rank, node_rank
from fairedge.common.privacy import LOCAL_CLIP_KEY, LOCAL_NOISE_KEY, noise_generator, privatize_local
from fairedge.common.task import client_partition, get_adapter, load_task, lora_model, set_adapter
from fairedge.common.training import client_round_seed, resolve_device, train_client_round
from fairedge.common.training import evaluate as evaluate_model

log = logging.getLogger("fairedge.client")
CONFIG_KEY = "fairedge-config"
PERSONAL_B_KEY = "fairedge.personal-b"
"""Context-state key of this node's own B per layer (FedSA-LoRA)."""

app = ClientApp(mods=[secagg_mod])  # secure-aggregation steps (fairedge.client.secagg); other messages pass


def node_run_config(raw: str, node_config: Mapping[str, Any]) -> RunConfig:
    """The run's config (JSON) as this node uses it: with `data-path` in the node config, on the node's own files."""
    data_path = node_config.get("data-path")
    if not data_path:
        if "partition-id" not in node_config:
            raise ValueError(f"node config {dict(node_config)} needs partition-id (and num-partitions) or data-path")
        return RunConfig.model_validate_json(raw)
    values = json.loads(raw)
    if values["data"]["task"] not in ("text", "chat"):
        raise ValueError(
            f"node config data-path={data_path!r} needs data.task 'text' (model.kind 'hf-text') or 'chat' "
            f"(got {values['data']['task']!r}; the built-in ViT is pre-trained on the run's data: use partition-id)"
        )
    values["data"]["path"] = str(data_path)
    if values["data"]["task"] == "chat":  # the node's whole file is its data: one client, whatever its records say
        values["data"].update(client_field=None, clients=None)
    return RunConfig.model_validate(values)


def node_partition(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    partition_id: int,
    num_partitions: int,
    *,
    task: TaskData | None = None,
) -> Examples:
    """This node's training data: its own files whole (`data-path`), or its share of the run's data.

    `task` is `load_task(cfg)`, loaded here unless given.
    """
    task = task or load_task(cfg)
    if node_config.get("data-path"):
        return task.train
    return client_partition(cfg, partition_id, num_partitions, task=task)


@dataclass(frozen=True)
class _Job:
    """What one message gives a client: its config, data, partition and a model holding the global adapter."""

    cfg: RunConfig
    """the run's config as this node trains with it (at its own LoRA rank)."""
    task: TaskData
    model: PeftModel
    partition_id: int
    num_partitions: int

    def train_data(self, node_config: Mapping[str, Any]) -> Examples:
        return node_partition(self.cfg, node_config, self.partition_id, self.num_partitions, task=self.task)


def _load_message(msg: Message, context: Context) -> _Job:
    """Load the message's config, this node's data and a fresh model at this node's LoRA rank, and put the
    received adapter in it (cut to that rank if the server sent more: heterogeneous ranks)."""
    cfg = node_run_config(str(msg.content.config_records["config"][CONFIG_KEY]), context.node_config)
    partition_id = _int_setting(context.node_config, "partition-id", 0)
    cfg = at_rank(cfg, node_rank(cfg, context.node_config, partition_id))
    num_partitions = _int_setting(context.node_config, "num-partitions", cfg.federation.num_clients)
    own = not context.node_config.get("data-path") and num_partitions == cfg.federation.num_clients
    task = load_task(cfg, client=partition_id if own else None)  # an LM task: this client's rows only
    model = lora_model(cfg, task=task)
    received = truncate_adapter(adapter_from_record(msg.content.array_records["arrays"]), cfg.lora.rank)
    set_adapter(model, received, get_base_weights(model))
    return _Job(cfg=cfg, task=task, model=model, partition_id=partition_id, num_partitions=num_partitions)


def _int_setting(config: Mapping[str, Any], key: str, default: int, where: str = "node config") -> int:
    value = config.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} {key}={value!r} is not an integer") from None


def use_personal_b(model: PeftModel, state: RecordDict) -> bool:
    """Load this node's own B (if it has one that fits) in place of the global B; say whether it did."""
    if PERSONAL_B_KEY not in state.array_records:
        return False
    own = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in state.array_records[PERSONAL_B_KEY].items()}
    factors = get_lora_factors(model)
    if set(own) != set(factors) or any(own[k].shape != factors[k][1].shape for k in factors):
        return False  # kept by another run
    set_lora_factors(model, {k: (a, own[k]) for k, (a, _) in factors.items()})
    return True


def run_train(msg: Message, context: Context) -> Message:
    """Train on this node's data starting from the global adapter; reply with the result."""
    job = _load_message(msg, context)
    cfg, model, partition_id = job.cfg, job.model, job.partition_id
    round_config = msg.content.config_records["config"]
    server_round = _int_setting(round_config, "server-round", 0, "round config")
    personal_b = bool(round_config.get(PERSONAL_B, False))
    send = reply_factors(round_config)
    data = job.train_data(context.node_config)
    if personal_b:
        use_personal_b(model, context.state)
    set_trainable_factors(model, str(round_config.get(TRAIN_FACTORS, "AB")))
    start = reply_tensors(get_adapter(model), send)
    f = cfg.federation
    seed = client_round_seed(cfg.seed, server_round, partition_id)
    loss = train_client_round(model, data, f, seed=seed, device=resolve_device(f.device))
    trained = get_adapter(model)
    if personal_b:
        context.state[PERSONAL_B_KEY] = ArrayRecord({k: Array(b.numpy()) for k, (_, b) in trained.factors.items()})
    reply = reply_tensors(trained, send)
    metrics = MetricRecord(
        {"num-examples": len(data), "train-loss": loss, "partition-id": partition_id, "lora-rank": cfg.lora.rank}
    )
    if LOCAL_NOISE_KEY in round_config:  # local DP: clip and noise the change before it is compressed or sent
        gen = noise_generator(cfg.privacy.noise_seed, server_round, partition_id)
        clip, z = float(round_config[LOCAL_CLIP_KEY]), float(round_config[LOCAL_NOISE_KEY])  # type: ignore[arg-type]
        noised, clipped = privatize_local({k: reply[k] - start[k] for k in start}, clip, z, gen)
        reply = {**reply, **{k: start[k] + noised[k] for k in start}}
        metrics["dp-clipped"] = int(clipped)
    if cfg.compression.enabled:
        payload = compress_update(
            reply, start, cfg.compression, context.state, server_round=server_round, num_examples=len(data)
        )
        content = RecordDict({"compressed": ConfigRecord({"payload": payload}), "metrics": metrics})
    else:
        content = RecordDict({"arrays": tensors_to_record(reply), "metrics": metrics})
    return Message(content, reply_to=msg)


def run_evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of this node's model (global adapter, own B under `personal-b`) on its own domains' test data."""
    job = _load_message(msg, context)
    own_b = bool(msg.content.config_records["config"].get(PERSONAL_B, False)) and use_personal_b(
        job.model, context.state
    )
    domains = job.train_data(context.node_config).domain.unique()
    test = job.task.test.subset(torch.nonzero(torch.isin(job.task.test.domain, domains)).flatten())
    if len(test) == 0:
        names = [job.task.domains[int(d)] for d in domains]
        raise ValueError(f"the test split has no samples of this node's domains {names}: nothing to evaluate")
    acc, loss = evaluate_model(job.model, test, device=resolve_device(job.cfg.federation.device))
    metrics = MetricRecord(
        {
            "num-examples": len(test),
            "accuracy": acc,
            "loss": loss,
            "partition-id": job.partition_id,
            "own-b": int(own_b),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point for train messages."""
    return run_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Flower entry point for evaluate messages."""
    return run_evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower entry point for query messages: this node's LoRA rank and partition (heterogeneous ranks)."""
    cfg = node_run_config(str(msg.content.config_records["config"][CONFIG_KEY]), context.node_config)
    partition_id = _int_setting(context.node_config, "partition-id", 0)
    metrics = MetricRecord(
        {"lora-rank": node_rank(cfg, context.node_config, partition_id), "partition-id": partition_id}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
