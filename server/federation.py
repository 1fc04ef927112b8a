"""One federated LoRA run on a Flower Grid, from config to run folder.

Reads top to bottom: data and model, the initial global adapter, the strategy,
Flower's round loop with server-side evaluation per domain after every round
(of the global adapter, on the base weights it implies), then the outputs (see
`server.run_outputs`). Personalised rules (FedSA-LoRA) also have every client
evaluate its own model; the strategy's round log keeps those accuracies.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from common.adapter_record import adapter_from_record, adapter_to_record
from common.aggregation import AGGREGATORS, Aggregator
from common.config import RunConfig
from common.lora import get_base_weights
from common.task import config_json, get_adapter, load_task, lora_model, set_adapter
from common.training import evaluate_per_domain, resolve_device
from server.run_outputs import RunRecord, write_outputs
from server.strategy import LoraStrategy

log = logging.getLogger("fairedge.server")
RoundCallback = Callable[[dict[str, Any]], None]


def make_aggregator(cfg: RunConfig) -> Aggregator:
    """The configured aggregation rule, given the config values its constructor takes.

    Besides the `aggregation` section it may take `lora_scale` (`alpha / rank`, for
    rules that fold `s·B·A` into the base weights).
    """
    cls = AGGREGATORS[cfg.aggregation.method]
    accepted = inspect.signature(cls).parameters
    values = {**cfg.aggregation.model_dump(), "lora_scale": cfg.lora.alpha / cfg.lora.rank}
    return cls(**{k: v for k, v in values.items() if k in accepted})


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, on_round: RoundCallback | None = None
) -> RunRecord:
    """Run `cfg.federation.rounds` rounds on `grid`; write and return the run record."""
    started = time.time()
    task = load_task(cfg)
    model = lora_model(cfg)
    device = resolve_device(cfg.federation.device)
    initial = get_adapter(model)
    base_weights = get_base_weights(model)  # W0 of every LoRA layer, for rules that change base weights
    shifted = [d for d in task.domains if d != task.source_domain]
    record = RunRecord(cfg=cfg, run_dir=run_dir, domains=task.domains, shifted_domains=shifted)
    strategy = LoraStrategy(
        make_aggregator(cfg), initial,
        fraction_train=cfg.federation.fraction_train, min_train_nodes=cfg.federation.min_train_nodes,
        downlink=cfg.compression.downlink,
    )
    round_started = [time.time()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter(model, adapter_from_record(arrays, like=initial), base_weights)
        acc = evaluate_per_domain(model, task.test, task.domains, device=device)
        row = record.add_round(server_round, acc, strategy.rounds[-1] if server_round else None,
                               seconds=time.time() - round_started[0])
        round_started[0] = time.time()
        if on_round is not None:
            on_round(row)
        return MetricRecord({f"acc/{k}": v for k, v in acc.items()})

    strategy.start(
        grid=grid,
        initial_arrays=adapter_to_record(initial),
        num_rounds=cfg.federation.rounds,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord({"fairedge-config": config_json(cfg)}),
        evaluate_config=ConfigRecord({"fairedge-config": config_json(cfg)}),
        evaluate_fn=evaluate,
    )
    set_adapter(model, strategy.global_adapter, base_weights)
    record.wall_seconds = time.time() - started
    write_outputs(record, model.cpu(), strategy.global_adapter.base_delta)
    return record
