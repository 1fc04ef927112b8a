"""One federated LoRA run on a Flower Grid, from config to run folder.

Reads top to bottom: data and model, the initial global adapter, the strategy,
Flower's round loop with server-side evaluation per domain after every round,
then the outputs (see `server.run_outputs`).
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
from common.task import config_json, get_adapter, load_task, lora_model, set_adapter
from common.training import evaluate_per_domain, resolve_device
from server.run_outputs import RunRecord, write_outputs
from server.strategy import LoraStrategy

log = logging.getLogger("fairedge.server")
RoundCallback = Callable[[dict[str, Any]], None]


def make_aggregator(cfg: RunConfig) -> Aggregator:
    """The configured aggregation rule, given the config values its constructor takes."""
    cls = AGGREGATORS[cfg.aggregation.method]
    accepted = inspect.signature(cls).parameters
    params = {k: v for k, v in cfg.aggregation.model_dump().items() if k in accepted}
    return cls(**params)


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, on_round: RoundCallback | None = None
) -> RunRecord:
    """Run `cfg.federation.rounds` rounds on `grid`; write and return the run record."""
    started = time.time()
    task = load_task(cfg)
    model = lora_model(cfg)
    device = resolve_device(cfg.federation.device)
    initial = get_adapter(model)
    shifted = [d for d in task.domains if d != task.source_domain]
    record = RunRecord(cfg=cfg, run_dir=run_dir, domains=task.domains, shifted_domains=shifted)
    strategy = LoraStrategy(
        make_aggregator(cfg), initial,
        fraction_train=cfg.federation.fraction_train, min_train_nodes=cfg.federation.min_train_nodes,
        downlink=cfg.compression.downlink,
    )
    round_started = [time.time()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter(model, adapter_from_record(arrays, like=initial))
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
        evaluate_fn=evaluate,
    )
    set_adapter(model, strategy.global_adapter)
    record.wall_seconds = time.time() - started
    write_outputs(record, model.cpu())
    return record
