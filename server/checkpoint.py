"""Checkpoints of a federated run, written after every complete round, and resuming from them.

Flower has no resume, so the server saves everything its round loop carries from
one round to the next. `<run dir>/checkpoint/round-0003/` holds:

- `tensors.safetensors`: the global adapter under its wire names (`lora/<layer>/A|B`,
  `head/<name>`, `base/<layer>/Q|P`, see `fairedge.common.adapter_record`), the tensors
  of the aggregator's `state_dict()` (`aggregator/<key>`) and torch's RNG state (`rng/torch`);
- `state.json`: the schema version, the round, the sha256 of `tensors.safetensors`,
  the config hash, the adapter's tensor names in order, the aggregator's other state
  (e.g. RoLoRA's alternation), the RNG states (the strategy's node sampler, python's
  `random`, numpy's), the strategy's round logs and the run record's rows so far.

A round's folder is written as `.round-0003.tmp/`, each file fsynced, then renamed
to `round-0003/` and the parent fsynced: a `round-*` folder is always complete,
so a crash at any moment leaves the previous checkpoint readable. The newest
folder is the checkpoint; the one before it is kept as a fallback, older ones
are removed.

A checkpoint whose tensors do not match their digest (a flipped bit), whose
`state.json` is not valid JSON, lacks a key, or has another schema version, is
unreadable: resuming warns and falls back to the one before, or stops with a
`CheckpointError` naming every problem when none is readable. Nothing is
resumed from a damaged checkpoint. (`state.json` itself carries no digest: a
flipped bit there that still parses goes unnoticed.)

Client-side state is not in the checkpoint: error-feedback residuals
(`compression.error_feedback`) and FedSA-LoRA's personal B live on the clients,
in Flower's per-run node context. A resumed run is a new Flower run (a new
simulation, or a new `flwr run` against a running deployment), so its clients
start that state afresh and the resumed run differs from an uninterrupted one.
Resume is exact for configs without client state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load, save

from fairedge.common.adapter_record import flatten, unflatten
from fairedge.common.aggregation import AGGREGATORS, Adapter, Aggregator
from fairedge.common.atomic_files import atomic_write_bytes, fsync_dir
from fairedge.common.config import ConfigError, RunConfig, config_hash, load_config
from fairedge.server.run_outputs import RunRecord
from fairedge.server.strategy import LoraStrategy

log = logging.getLogger("fairedge.server")

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
SCHEMA_VERSION = 1
"""Version of the checkpoint layout; a checkpoint of another version is unreadable (no migration)."""
HEADER_KEYS = ("schema", "round", "tensors_sha256")
"""Keys `save_checkpoint` writes into every `state.json` itself."""
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout", "federation.round_retries")
"""Config fields a resumed run may change: none of them changes what a round computes."""

T = TypeVar("T")
Tensors = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the run."""


# --- the files ------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, server_round: int, tensors: Tensors, state: dict[str, Any]) -> Path:
    """Write round `server_round`'s checkpoint atomically; return its folder.

    `state` is any JSON-able dict without the `HEADER_KEYS`, which are added here.
    """
    if clash := sorted(set(state) & set(HEADER_KEYS)):
        raise ValueError(f"checkpoint state may not use the keys {clash}: save_checkpoint writes them")
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    final = root / f"round-{server_round:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier write
    tmp.mkdir()
    data = save({k: t.detach().cpu().contiguous() for k, t in tensors.items()})
    header = {"schema": SCHEMA_VERSION, "round": server_round, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(tmp / TENSORS_FILE, data)
    atomic_write_bytes(tmp / STATE_FILE, json.dumps({**header, **state}, indent=1).encode())
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


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run folder holds a complete round checkpoint (a run there can be resumed)."""
    return bool(_round_dirs(Path(run_dir) / CHECKPOINT_DIR))


def read_checkpoint(folder: Path) -> tuple[Tensors, dict[str, Any]]:
    """`(tensors, state)` of one checkpoint folder; ValueError if its schema, round or digest is wrong."""
    state = json.loads((folder / STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise ValueError(f"{STATE_FILE} holds a {type(state).__name__}, not an object")
    if state.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{STATE_FILE} has schema {state.get('schema')!r}, this fairedge reads {SCHEMA_VERSION}")
    if state.get("round") != int(folder.name.removeprefix("round-")):
        raise ValueError(f"{STATE_FILE} is for round {state.get('round')!r}, the folder is {folder.name}")
    data = (folder / TENSORS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != state.get("tensors_sha256"):
        raise ValueError(
            f"{TENSORS_FILE} has sha256 {digest[:12]}…, {STATE_FILE} says {str(state.get('tensors_sha256'))[:12]}…"
        )
    return load(data), {k: v for k, v in state.items() if k not in ("schema", "tensors_sha256")}


UNREADABLE = (OSError, ValueError, KeyError, TypeError, SafetensorError)
"""What reading or parsing a damaged checkpoint raises (pydantic's ValidationError is a ValueError)."""


def newest_checkpoint(run_dir: Path, use: Callable[[Tensors, dict[str, Any]], T], *, warn: bool = True) -> T:
    """`use(tensors, state)` of the newest checkpoint that is readable and that `use` accepts.

    A checkpoint is passed over (with a warning unless `warn=False`) when reading it or
    `use` raises one of `UNREADABLE`; other errors (e.g. a `CheckpointError`) propagate.
    CheckpointError when none is left.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    candidates = _round_dirs(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {root} (a run writes one after every complete round)")
    errors = []
    for folder in reversed(candidates):
        try:
            result = use(*read_checkpoint(folder))
        except UNREADABLE as err:
            why = f"{type(err).__name__}: {err}".replace("\n", "; ")
            errors.append(f"{folder.name}: {why}")
            if warn:
                log.warning("checkpoint %s is unreadable (%s); trying the one before", folder, why)
            continue
        if errors and warn:
            log.warning("resuming from %s, the newest readable checkpoint in %s", folder.name, root)
        return result
    raise CheckpointError(f"no readable checkpoint in {root}: {' | '.join(errors)}")


def load_checkpoint(run_dir: Path) -> tuple[Tensors, dict[str, Any]]:
    """`(tensors, state)` of the newest readable checkpoint in `run_dir` (falling back to the one before)."""
    return newest_checkpoint(run_dir, lambda tensors, state: (tensors, state))


# --- RNG and aggregator state ---------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """Python's, numpy's (as JSON) and torch's (a byte tensor) global RNG states."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # legacy=True: the tuple form
    name, keys, pos, has_gauss, cached = numpy_state
    return (
        {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]},
        torch.get_rng_state(),
    )


def set_rng_state(state: dict[str, Any], torch_state: torch.Tensor) -> None:
    """Restore `rng_state()`."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)


def aggregator_state(aggregator: Aggregator) -> tuple[dict[str, Any], Tensors]:
    """The aggregator's `state_dict()` split into JSON values and tensors (`aggregator/<key>`).

    Anything else is an error, not silently dropped.
    """
    values, tensors = {}, {}
    for key, value in aggregator.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"aggregator/{key}"] = value
        elif value is None or isinstance(value, (bool, int, float, str, list, dict)):
            values[key] = value
        else:
            raise TypeError(
                f"cannot checkpoint {type(aggregator).__name__}.state_dict()[{key!r}] of type "
                f"{type(value).__name__}; an aggregator's state must be JSON values or tensors"
            )
    return values, tensors


def set_aggregator_state(aggregator: Aggregator, values: dict[str, Any], tensors: Tensors) -> None:
    """Restore `aggregator_state()` through the aggregator's `load_state_dict`."""
    own = {k.removeprefix("aggregator/"): t for k, t in tensors.items() if k.startswith("aggregator/")}
    aggregator.load_state_dict({**values, **own})


# --- a run's state --------------------------------------------------------------------------------


class _AggregatorState(BaseModel):
    name: str
    state: dict[str, Any]


class _RngState(BaseModel):
    python: list[Any]
    numpy: list[Any]


class _RecordState(BaseModel):
    rounds: list[dict[str, Any]]
    wall_seconds: float
    resumed_after: list[int]
    earlier_stops: list[str]


class RunState(BaseModel):
    """The `state.json` of a run's checkpoint: a key missing here makes the checkpoint unreadable."""

    round: int
    adapter_keys: list[str]
    config_hash: str
    resumable_hash: str
    aggregator: _AggregatorState
    rng: _RngState
    strategy: dict[str, Any]
    record: _RecordState


def resumable_hash(cfg: RunConfig) -> str:
    """Hash of the config without the fields a resumed run may change.

    Like `config_hash`, only values that differ from their defaults count, so a release that adds a setting
    (with a default) can still resume the checkpoints of an older one.
    """
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    for key in RESUMABLE_CHANGES:
        section, name = key.split(".")
        data.get(section, {}).pop(name, None)
    return config_hash({section: values for section, values in data.items() if values != {}})


def save_run_state(
    run_dir: Path,
    server_round: int,
    strategy: LoraStrategy,
    global_adapter: Adapter,
    record: RunRecord,
    wall_seconds: float,
) -> Path:
    """Checkpoint everything a run carries past round `server_round`."""
    agg_values, agg_tensors = aggregator_state(strategy.aggregator)
    rng, torch_rng = rng_state()
    adapter = flatten(global_adapter)
    tensors = {**adapter, **agg_tensors, "rng/torch": torch_rng}
    state = RunState(
        round=server_round,
        adapter_keys=list(adapter),  # safetensors sorts names; the order matters (compressed-update layouts)
        config_hash=config_hash(record.cfg),
        resumable_hash=resumable_hash(record.cfg),
        aggregator=_AggregatorState(name=strategy.aggregator.name, state=agg_values),
        rng=_RngState(**rng),
        strategy=strategy.state_dict(),
        record=_RecordState(
            rounds=record.rounds,
            wall_seconds=wall_seconds,
            resumed_after=record.resumed_after,
            earlier_stops=record.earlier_stops,
        ),
    )
    # python mode, not "json": pydantic's JSON mode would turn a NaN metric into null
    return save_checkpoint(run_dir, server_round, tensors, state.model_dump(exclude={"round"}))


def restore_run_state(
    run_dir: Path, cfg: RunConfig, strategy: LoraStrategy, record: RunRecord, like: Adapter
) -> tuple[int, Adapter]:
    """Load the newest readable checkpoint into `strategy`, `record` and the global RNGs;
    return its round and the global adapter (checked against `like`'s names and shapes).

    Raises CheckpointError if it was written under a config that differs in more
    than `RESUMABLE_CHANGES`, or for another aggregation rule, or if no checkpoint is readable.
    """

    def restore(tensors: Tensors, raw: dict[str, Any]) -> tuple[int, Adapter]:
        state = RunState.model_validate(raw)
        if state.resumable_hash != resumable_hash(cfg):
            raise CheckpointError(
                f"the checkpoint in {run_dir} was written under another config "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
            )
        if state.aggregator.name != strategy.aggregator.name:
            raise CheckpointError(
                f"the checkpoint is for aggregation {state.aggregator.name!r}, not {strategy.aggregator.name!r}"
            )
        adapter = unflatten({k: tensors[k] for k in state.adapter_keys}, like=like)
        torch_rng = tensors["rng/torch"]
        # a damaged piece raises here and the checkpoint before is restored over whatever was set
        strategy.load_state_dict(state.strategy)
        set_aggregator_state(strategy.aggregator, state.aggregator.state, tensors)
        set_rng_state(state.rng.model_dump(), torch_rng)
        record.rounds = state.record.rounds
        record.wall_seconds = state.record.wall_seconds
        record.resumed_after = [*state.record.resumed_after, state.round]
        record.earlier_stops = list(state.record.earlier_stops)
        return state.round, adapter

    server_round, adapter = newest_checkpoint(run_dir, restore)
    try:  # the outputs of a session that stopped on its own say why
        status = json.loads((Path(run_dir) / "metrics.json").read_text())["summary"]["status"]
    except (OSError, ValueError, KeyError):
        status = "complete"
    if status != "complete" and status not in record.earlier_stops:
        record.earlier_stops.append(status)
    return server_round, adapter


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
    try:  # quietly: the resume itself warns about checkpoints it passes over
        server_round = newest_checkpoint(run_dir, lambda _, raw: RunState.model_validate(raw).round, warn=False)
    except CheckpointError as err:
        raise ConfigError(f"--resume {run_dir}: {err}") from None
    if cfg.federation.rounds < server_round:
        raise ConfigError(
            f"--resume {run_dir}: federation.rounds={cfg.federation.rounds} is below the "
            f"checkpoint's round {server_round}"
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
