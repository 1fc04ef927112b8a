"""One federated LoRA run on a Flower Grid, from config to run folder.

Reads top to bottom: data and model, the initial global adapter, the strategy,
then the round loop, then the outputs (see `fairedge.server.run_outputs`). The loop is
ours rather than Flower's `Strategy.start` (which always runs rounds 1..N)
because a run must be able to resume and to retry a round. Like `Strategy.start`, the loop
holds the global adapter and hands it to the strategy (as an ArrayRecord) every round:

    for each round:   configure_train -> grid.send_and_receive -> aggregate_train
                      (retried up to `federation.round_retries` times while too few
                      valid updates came back; after that the run stops)
                      personalised rules: every client evaluates its own model
                      server-side evaluation per domain (of the global adapter,
                      on the base weights it implies)
                      checkpoint (`fairedge.server.checkpoint`)

With `resume=True` the run continues in `run_dir` after the round of its newest
checkpoint; its outputs then cover all rounds of all sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fairedge.common.adapter_record import adapter_from_record, adapter_to_record
from fairedge.common.aggregation import Adapter, Aggregator, make_aggregator
from fairedge.common.config import RunConfig
from fairedge.common.lora import get_base_weights
from fairedge.common.task import (
    config_json,
    get_adapter,
    greedy_replies,
    load_task,
    lora_model,
    server_test_split,
    set_adapter,
)
from fairedge.common.training import evaluate_groups, resolve_device
from fairedge.server.checkpoint import client_state_warning, restore_run_state, save_run_state
from fairedge.server.privacy.central import make_client_level_dp
from fairedge.server.run_outputs import RunRecord, write_config, write_outputs
from fairedge.server.secagg import SecureAggregation
from fairedge.server.strategy import LoraStrategy
from fairedge.server.tracking import SafeTracker, make_tracker

log = logging.getLogger("fairedge.server")
RoundCallback = Callable[[dict[str, Any]], None]


class RoundFailed(RuntimeError):
    """A round got too few valid updates in every attempt; the run stopped (its checkpoint is intact)."""


def configured_aggregator(cfg: RunConfig) -> Aggregator:
    """The configured aggregation rule (`make_aggregator` with the config's options and the LoRA scale
    `alpha / rank`, which rules that fold `s·B·A` into the base weights take)."""
    options = cfg.aggregation.model_dump(exclude={"method"})
    return make_aggregator(cfg.aggregation.method, lora_scale=cfg.lora.alpha / cfg.lora.rank, **options)


def _server_blind(cfg: RunConfig) -> bool:
    """Update-norm screening is off under central DP (clipping bounds every update) and under secure
    aggregation (the server never sees an update)."""
    return (cfg.privacy.enabled and cfg.privacy.mode == "central") or cfg.privacy.secure_aggregation.enabled


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, on_round: RoundCallback | None = None, resume: bool = False
) -> RunRecord:
    """Run rounds up to `cfg.federation.rounds` on `grid`; write and return the run record.

    Raises RoundFailed (after writing the outputs so far) when a round fails all its attempts.
    """
    started = time.time()
    f = cfg.federation
    task = load_task(cfg)
    test = server_test_split(cfg, task)  # with federation.eval_clients: some of an LM task's clients
    model = lora_model(cfg, task=task)
    device = resolve_device(f.device)
    initial = get_adapter(model)
    base_weights = get_base_weights(model)  # W0 of every LoRA layer, for rules that change base weights
    shifted = [d for d in task.domains if d != task.source_domain]
    record = RunRecord(cfg=cfg, run_dir=run_dir, domains=task.domains, shifted_domains=shifted)
    global_adapter = initial
    strategy = LoraStrategy(
        configured_aggregator(cfg),
        fraction_train=f.fraction_train,
        min_train_nodes=f.min_train_nodes,
        downlink=cfg.compression.downlink,
        seed=cfg.seed,
        update_norm_rule="off" if _server_blind(cfg) else f.update_norm_rule,
        update_norm_factor=f.update_norm_factor,
        node_wait=f.round_timeout,
        privacy=make_client_level_dp(cfg),
        client_ranks=cfg.lora.client_ranks is not None,
    )
    config = ConfigRecord({"fairedge-config": config_json(cfg)})
    a = cfg.aggregation
    if cfg.lora.client_ranks and a.method == "lora_fair" and a.objective == "cosine" and a.rank_padding == "zeros":
        log.warning(
            "lora_fair's cosine objective with mixed ranks (lora.client_ranks) and zero-padding keeps little of each "
            "round's update (README, 'Heterogeneous LoRA ranks'); aggregation.rank_padding='global' or "
            "aggregation.objective='frobenius' keeps it"
        )
    earlier_seconds = 0.0
    tracker = make_tracker(cfg.tracking)  # TensorBoard / MLflow; its failures only warn
    tracker.start(cfg, run_dir)
    sa = cfg.privacy.secure_aggregation
    secagg = SecureAggregation(sa, lam=cfg.aggregation.lam, timeout=f.round_timeout) if sa.enabled else None

    def evaluate(server_round: int, round_started: float) -> None:
        """Server-side accuracy of the global adapter; record the round; report it."""
        set_adapter(model, global_adapter, base_weights)
        groups = evaluate_groups(model, test, task.domains, device=device)
        acc = {g: m["accuracy"] for g, m in groups.items()}
        loss = {g: m["loss"] for g, m in groups.items()} if task.kind == "causal-lm" else None
        attempts = [r for r in strategy.rounds if r.round == server_round] or None
        row = record.add_round(server_round, acc, attempts, seconds=time.time() - round_started, loss=loss)
        tracker.log_round(row)
        if on_round is not None:
            on_round(row)

    def checkpoint(server_round: int) -> None:
        save_run_state(run_dir, server_round, strategy, global_adapter, record, earlier_seconds + time.time() - started)

    if resume:
        done, global_adapter = restore_run_state(run_dir, cfg, strategy, record, like=initial)
        write_config(run_dir, cfg)  # federation.rounds may have been extended
        earlier_seconds = record.wall_seconds
        log.warning("resuming %s after round %d of %d", run_dir, done, f.rounds)
        if (why := client_state_warning(cfg)) is not None:  # the one place every entry point passes
            log.warning("resume: %s", why)
    else:
        done = 0
        write_config(run_dir, cfg)
        evaluate(0, started)
        checkpoint(0)

    for server_round in range(done + 1, f.rounds + 1):
        round_started = time.time()
        for attempt in range(f.round_retries + 1):
            arrays = adapter_to_record(global_adapter)
            if secagg is not None:  # the server sees only sums (several exchanges per round)
                aggregated, _ = secagg.run_round(strategy, server_round, arrays, config, grid)
            else:
                messages = strategy.configure_train(server_round, arrays, config, grid)
                replies = grid.send_and_receive(messages, timeout=f.round_timeout) if messages else []
                aggregated, _ = strategy.aggregate_train(server_round, replies)
            if aggregated is not None:
                global_adapter = adapter_from_record(aggregated)
                break
            if attempt < f.round_retries:
                log.warning("round %d: retrying (%d of %d retries)", server_round, attempt + 1, f.round_retries)
        else:
            failures = "; ".join(
                f"attempt {r.attempt + 1}: {r.failure}" for r in strategy.rounds if r.round == server_round
            )
            record.status = (
                f"round {server_round} failed {f.round_retries + 1} attempts ({failures}); "
                f"the global adapter is the one after round {server_round - 1}"
            )
            _finish(record, model, global_adapter, base_weights, earlier_seconds + time.time() - started, tracker)
            raise RoundFailed(
                f"{record.status}. The checkpoint of round {server_round - 1} is in "
                f"{run_dir}/checkpoint; resume with: fairedge-sim run --resume {run_dir} "
                f'(flwr run: run config resume="{run_dir}")'
            )
        if strategy.aggregator.personalized:
            evaluations = strategy.configure_evaluate(server_round, adapter_to_record(global_adapter), config, grid)
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(evaluations, timeout=f.round_timeout))
        evaluate(server_round, round_started)
        checkpoint(server_round)

    if task.kind == "causal-lm":  # base (the initial adapter: B = 0, no base change) vs final, same prompts
        set_adapter(model, initial, base_weights)
        base = greedy_replies(cfg, model)
        set_adapter(model, global_adapter, base_weights)
        final = greedy_replies(cfg, model)
        record.samples = [{"prompt": p, "base": base[p], "final": final[p]} for p in base]
    _finish(record, model, global_adapter, base_weights, earlier_seconds + time.time() - started, tracker)
    return record


def _finish(
    record: RunRecord,
    model: Any,
    global_adapter: Adapter,
    base_weights: dict,
    wall_seconds: float,
    tracker: SafeTracker,
) -> None:
    """Write the outputs for the global adapter; close the tracker's run."""
    set_adapter(model, global_adapter, base_weights)
    record.wall_seconds = wall_seconds
    write_outputs(record, model.cpu(), global_adapter.base_delta)
    tracker.finish(record.status)
