"""Checkpoints of a federated run, written after every complete round, and resuming from them.

Flower has no resume, so the server saves everything its round loop carries from
one round to the next. `<run dir>/checkpoint/round-0003/` holds:

- `tensors.safetensors`: the global adapter under its wire names (`lora/<layer>/A|B`,
  `head/<name>`, `base/<layer>/Q|P`, see `fairedge.common.adapter_record`), any tensor an
  aggregator keeps as an attribute (`aggregator/<attr>`) and torch's RNG state (`rng/torch`);
- `state.json`: the round, the config hash, the adapter's tensor names in order,
  the aggregator's other attributes (e.g. RoLoRA's alternation), the RNG states
  (the strategy's node sampler, python's `random`, numpy's), the strategy's round
  logs and the run record's rows so far.

A round's folder is written as `.round-0003.tmp/`, each file fsynced, then renamed
to `round-0003/` and the parent fsynced: a `round-*` folder is always complete,
so a crash at any moment leaves the previous checkpoint readable. The newest
folder is the checkpoint; the one before it is kept as a fallback, older ones
are removed.

Client-side state is not in the checkpoint: error-feedback residuals
(`compression.error_feedback`) and FedSA-LoRA's personal B live on the clients,
in Flower's per-run node context. A resumed run is a new Flower run (a new
simulation, or a new `flwr run` against a running deployment), so its clients
start that state afresh and the resumed run differs from an uninterrupted one.
Resume is exact for configs without client state.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fairedge.common.adapter_record import flatten, unflatten
from fairedge.common.aggregation import AGGREGATORS, Aggregator
from fairedge.common.atomic_files import atomic_write_bytes, fsync_dir
from fairedge.common.config import ConfigError, RunConfig, config_hash, load_config
from fairedge.server.run_outputs import RunRecord
from fairedge.server.strategy import LoraStrategy

log = logging.getLogger("fairedge.server")

CHECKPOINT_DIR = "checkpoint"
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout", "federation.round_retries")
"""Config fields a resumed run may change: none of them changes what a round computes."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


# --- the files ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, server_round: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write round `server_round`'s checkpoint atomically; return its folder."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    final = root / f"round-{server_round:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier write
    tmp.mkdir()
    atomic_write_bytes(
        tmp / "tensors.safetensors", save({k: t.detach().cpu().contiguous() for k, t in tensors.items()})
    )
    atomic_write_bytes(tmp / "state.json", json.dumps({"round": server_round, **state}, indent=1).encode())
    if final.exists():  # the same round written again: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for old in _round_dirs(root)[:-2]:  # keep this one and the one before
        shutil.rmtree(old, ignore_errors=True)
    return final


def _round_dirs(root: Path) -> list[Path]:
    """The complete round folders under `root`, oldest first."""
    return sorted((p for p in root.glob("round-*") if p.is_dir()), key=lambda p: int(p.name.removeprefix("round-")))


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(tensors, state)` of the newest readable checkpoint in `run_dir` (falling back to the one before)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    candidates = _round_dirs(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {root} (a run writes one after every complete round)")
    errors = []
    for folder in reversed(candidates):
        try:
            state = json.loads((folder / "state.json").read_text())
            tensors = load_file(str(folder / "tensors.safetensors"))
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            errors.append(f"{folder.name}: {err}")
            log.warning("checkpoint %s is unreadable (%s); trying the one before", folder, err)
            continue
        return tensors, state
    raise CheckpointError(f"no readable checkpoint in {root}: {'; '.join(errors)}")


# --- RNG and aggregator state ---------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """Python's, numpy's (as JSON) and torch's (a byte tensor) global RNG states."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (
        {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]},
        torch.get_rng_state(),
    )


def set_rng_state(state: dict[str, Any], torch_state: torch.Tensor) -> None:
    """Restore `rng_state()`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def aggregator_state(aggregator: Aggregator) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An aggregator's attributes: JSON values, and tensors. Anything else is an error, not silently dropped."""
    values, tensors = {}, {}
    for name, value in vars(aggregator).items():
        if isinstance(value, torch.Tensor):
            tensors[f"aggregator/{name}"] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            values[name] = value
        else:
            raise TypeError(
                f"cannot checkpoint {type(aggregator).__name__}.{name} of type {type(value).__name__}; "
                "an aggregator's state must be JSON values or tensors"
            )
    return values, tensors


def set_aggregator_state(aggregator: Aggregator, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore `aggregator_state()`."""
    for name, value in values.items():
        setattr(aggregator, name, value)
    for key, t in tensors.items():
        if key.startswith("aggregator/"):
            setattr(aggregator, key.removeprefix("aggregator/"), t)


# --- a run's state --------------------------------------------------------------------------------


def resumable_hash(cfg: RunConfig) -> str:
    """Hash of the config without the fields a resumed run may change."""
    data = cfg.model_dump(mode="json")
    for key in RESUMABLE_CHANGES:
        section, name = key.split(".")
        data[section].pop(name)
    return config_hash(data)


def save_run_state(
    run_dir: Path, server_round: int, strategy: LoraStrategy, record: RunRecord, wall_seconds: float
) -> Path:
    """Checkpoint everything a run carries past round `server_round`."""
    agg_values, agg_tensors = aggregator_state(strategy.aggregator)
    rng, torch_rng = rng_state()
    adapter = flatten(strategy.global_adapter)
    tensors = {**adapter, **agg_tensors, "rng/torch": torch_rng}
    state = {
        "adapter_keys": list(adapter),  # safetensors sorts names; the order matters (compressed-update layouts)
        "config_hash": config_hash(record.cfg),
        "resumable_hash": resumable_hash(record.cfg),
        "aggregator": {"name": strategy.aggregator.name, "state": agg_values},
        "rng": rng,
        "strategy": strategy.state_dict(),
        "record": {
            "rounds": record.rounds,
            "wall_seconds": wall_seconds,
            "resumed_after": record.resumed_after,
            "earlier_stops": record.earlier_stops,
        },
    }
    return save_checkpoint(run_dir, server_round, tensors, state)


def restore_run_state(run_dir: Path, cfg: RunConfig, strategy: LoraStrategy, record: RunRecord) -> int:
    """Load the newest checkpoint into `strategy` and `record` and the global RNGs; return its round.

    Raises CheckpointError if it was written under a config that differs in more
    than `RESUMABLE_CHANGES`, or for another aggregation rule or adapter layout.
    """
    tensors, state = load_checkpoint(run_dir)
    server_round = int(state["round"])
    if state["resumable_hash"] != resumable_hash(cfg):
        raise CheckpointError(
            f"the checkpoint in {run_dir} was written under another config "
            f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
        )
    if state["aggregator"]["name"] != strategy.aggregator.name:
        raise CheckpointError(
            f"the checkpoint is for aggregation {state['aggregator']['name']!r}, not {strategy.aggregator.name!r}"
        )
    adapter = unflatten({k: tensors[k] for k in state["adapter_keys"]}, like=strategy.global_adapter)
    strategy.load_state_dict(state["strategy"], adapter)
    set_aggregator_state(strategy.aggregator, state["aggregator"]["state"], tensors)
    set_rng_state(state["rng"], tensors["rng/torch"])
    record.rounds = state["record"]["rounds"]
    record.wall_seconds = float(state["record"]["wall_seconds"])
    record.resumed_after = [*state["record"]["resumed_after"], server_round]
    record.earlier_stops = list(state["record"].get("earlier_stops", []))
    try:  # the outputs of a session that stopped on its own say why
        status = json.loads((Path(run_dir) / "metrics.json").read_text())["summary"]["status"]
    except (OSError, ValueError, KeyError):
        status = "complete"
    if status != "complete" and status not in record.earlier_stops:
        record.earlier_stops.append(status)
    return server_round


# --- what a resume may change ---------------------------------------------------------------------


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config of the run in `run_dir` (its `config.toml`) with `overrides` applied.

    Raises ConfigError when the folder has no config or checkpoint, when an override
    changes anything but `RESUMABLE_CHANGES`, or when `federation.rounds` would end
    before the checkpoint's round.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.toml there (is it a fairedge run folder?)")
    saved = load_config(path)
    cfg = load_config(path, overrides)
    before, after = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    changed = [
        f"{k} ({before.get(k)!r} -> {after.get(k)!r})"
        for k in sorted(before.keys() | after.keys())
        if before.get(k) != after.get(k) and k not in RESUMABLE_CHANGES
    ]
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: a resumed run keeps its config; the overrides would change "
            f"{', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change)"
        )
    try:
        _, state = load_checkpoint(run_dir)
    except CheckpointError as err:
        raise ConfigError(f"--resume {run_dir}: {err}") from None
    if cfg.federation.rounds < state["round"]:
        raise ConfigError(
            f"--resume {run_dir}: federation.rounds={cfg.federation.rounds} is below the "
            f"checkpoint's round {state['round']}"
        )
    return cfg


def client_state_warning(cfg: RunConfig) -> str | None:
    """Why a resume of this config may not match an uninterrupted run (client-side state), or None."""
    kept = []
    if cfg.compression.enabled and cfg.compression.error_feedback:
        kept.append("error-feedback residuals (compression.error_feedback)")
    if AGGREGATORS[cfg.aggregation.method].personalized:
        kept.append(f"each client's personal B ({cfg.aggregation.method})")
    if not kept:
        return None
    return (
        f"clients keep {' and '.join(kept)}; that state is not in the server's checkpoint and a resumed "
        "run is a new Flower run whose clients start it afresh, so the result will differ from an "
        "uninterrupted run"
    )
