"""The Flower ClientApp: local LoRA training from the global factors (Avg-Initial).

Each train message carries the global adapter (`arrays`) and the run config
(`config["fairedge-config"]`, JSON). The reply carries the trained adapter
(`arrays`), or with compression on, the ComPEFT-compressed change since the
global adapter (`compressed["payload"]`, see `client.update_compression`).
The node's data partition comes from the node config: `partition-id` of
`num-partitions` (simulation) selects the client's share of the run's data.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.update_compression import compress_update
from common.adapter_record import adapter_from_record, adapter_to_record, flatten
from common.config import RunConfig
from common.task import client_partition, get_adapter, lora_model, set_adapter
from common.training import resolve_device, train_local

log = logging.getLogger("fairedge.client")
CONFIG_KEY = "fairedge-config"

app = ClientApp()
_models: dict[str, torch.nn.Module] = {}


def _model_for(cfg: RunConfig, key: str) -> torch.nn.Module:
    """One LoRA model per process and config: every round overwrites all its trainables."""
    if key not in _models:
        _models.clear()
        _models[key] = lora_model(cfg)
    return _models[key]


def run_train(msg: Message, context: Context) -> Message:
    """Train on this node's data starting from the global adapter; reply with the result."""
    raw = str(msg.content["config"][CONFIG_KEY])
    cfg = RunConfig.model_validate_json(raw)
    server_round = int(msg.content["config"].get("server-round", 0))
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", cfg.federation.num_clients))
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))

    data = client_partition(cfg, partition_id, num_partitions)
    model = _model_for(cfg, raw)
    global_adapter = adapter_from_record(msg.content["arrays"])
    set_adapter(model, global_adapter)
    start = flatten(get_adapter(model))
    f = cfg.federation
    loss = train_local(
        model, data, steps=f.local_steps, epochs=f.local_epochs, batch_size=f.batch_size, lr=f.lr,
        optimizer=f.optimizer, weight_decay=f.weight_decay, device=resolve_device(f.device),
        seed=cfg.seed * 100_003 + server_round * 1_009 + partition_id,
    )
    model.cpu()
    trained = get_adapter(model)
    metrics = MetricRecord({"num-examples": len(data), "train-loss": loss, "partition-id": partition_id})
    if cfg.compression.enabled:
        payload = compress_update(flatten(trained), start, cfg.compression, context.state,
                                  server_round=server_round, num_examples=len(data))
        content = RecordDict({"compressed": ConfigRecord({"payload": payload}), "metrics": metrics})
    else:
        content = RecordDict({"arrays": adapter_to_record(trained), "metrics": metrics})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point for train messages."""
    return run_train(msg, context)
