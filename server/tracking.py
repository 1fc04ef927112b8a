"""Experiment tracking: the server logs each round's metrics and the run's config to TensorBoard or MLflow.

`tracking.backend` picks the backend (`none` by default). Every backend has the same three calls,
`start(cfg, run_dir)`, `log_round(row)` (a row of `RunRecord.add_round`, logged at step = round)
and `finish(status)`; `make_tracker` wraps the chosen one so that a failing tracker (a full disk, an
unreachable MLflow server) logs one warning and stops tracking, never stopping the run.

What is logged per round, from the row (`round_scalars`): accuracy per group (domain, or a causal LM's
client) with its mean, worst and shifted mean; perplexity and loss per client with mean and worst
(causal LMs); the clients' train loss; bytes up and down and the uplink ratio against fp32; how many
nodes were sampled, replied, stayed silent, were rejected or clipped, and retries; personal accuracy
(personalised rules); the aggregation rule's numeric metrics; the round's seconds. The config goes in
as flat `section.field` parameters (MLflow params, TensorBoard hparams) and as its TOML text (an MLflow
artifact `config.toml`, a TensorBoard text summary).

Where: unset `tracking.uri` keeps everything in the run folder. MLflow then uses a SQLite store,
`<run>/mlflow/mlflow.db`, with artifacts in `<run>/mlflow/artifacts` (MLflow 3 refuses its old
plain-file store unless MLFLOW_ALLOW_FILE_STORE is set; SQLite is its local default and needs no
server: `mlflow ui --backend-store-uri sqlite:///<run>/mlflow/mlflow.db`). TensorBoard writes event
files to `<run>/tensorboard/`, or to `<uri>/<run folder name>/` so that one `tensorboard --logdir <uri>`
compares runs. A resumed run goes on in the same MLflow run (`mlflow-run.json` in the run folder names
it) and appends to the same TensorBoard folder. The backends are imported only when chosen.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Protocol

from fairedge.common.atomic_files import atomic_write_json
from fairedge.common.config import RunConfig, TrackingConfig, config_hash, to_toml

log = logging.getLogger("fairedge.server")

MLFLOW_RUN_FILE = "mlflow-run.json"
"""In the run folder: the MLflow store and run id, so that a resumed run goes on logging to the same run."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")  # what MLflow allows in a metric name; TensorBoard takes it too


class Tracker(Protocol):
    """A tracking backend; `make_tracker` makes one for a config."""

    def start(self, cfg: RunConfig, run_dir: Path) -> None: ...
    def log_round(self, row: dict[str, Any]) -> None: ...
    def finish(self, status: str) -> None: ...


def _name(*parts: Any) -> str:
    return _UNSAFE.sub("_", "/".join(str(p) for p in parts))


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one round's row, by metric name (`accuracy/mean`, `accuracy/<group>`, `bytes/up`, ...)."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return
        out[name] = float(value)

    put("accuracy/mean", row.get("mean_accuracy"))
    put("accuracy/worst", row.get("worst_accuracy"))
    put("accuracy/shifted_mean", row.get("shifted_mean_accuracy"))
    for group, value in row.get("accuracy", {}).items():
        put(_name("accuracy", group), value)
    put("perplexity/mean", row.get("mean_perplexity"))
    put("perplexity/worst", row.get("worst_perplexity"))
    put("perplexity/geomean", row.get("geomean_perplexity"))
    for key in ("perplexity", "loss"):
        for group, value in (row.get(key) or {}).items():
            put(_name(key, group), value)
    put("train/loss", row.get("train_loss"))
    put("bytes/up", row.get("bytes_up"))
    put("bytes/down", row.get("bytes_down"))
    put("bytes/uplink_ratio_vs_fp32", row.get("uplink_ratio_vs_fp32"))
    for key in ("sampled", "replied", "no_reply", "rejected", "clipped"):
        if key in row:
            put(f"clients/{key}", len(row[key]))
    put("clients/retries", row.get("retries"))
    put("personal_accuracy/mean", row.get("personal_mean_accuracy"))
    for node, value in (row.get("personal_accuracy") or {}).items():
        put(_name("personal_accuracy", f"node {node}"), value)
    for key, value in (row.get("aggregator_metrics") or {}).items():
        put(_name("aggregator", key), value)
    for key, value in (row.get("privacy") or {}).items():  # client-level DP: epsilon per round and in total, ...
        put(_name("privacy", key), value)
    put("time/seconds", row.get("seconds"))
    return out


def config_params(cfg: RunConfig) -> dict[str, str | float | int | bool]:
    """The config as flat `section.field` values (lists as their JSON-ish text; None left out)."""
    flat: dict[str, str | float | int | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif value is not None:
            flat[prefix] = value if isinstance(value, str | float | int | bool) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


class NoTracker:
    """`tracking.backend = "none"`: nothing is logged."""

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        pass

    def log_round(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class TensorBoardTracker:
    """Event files (tensorboardX): scalars per round, the config as hparams and as TOML text."""

    def __init__(self, settings: TrackingConfig) -> None:
        self.settings = settings
        self.writer: Any = None
        self._end: Any = None

    def logdir(self, run_dir: Path) -> Path:
        return Path(self.settings.uri) / run_dir.name if self.settings.uri else run_dir / "tensorboard"

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self.writer = SummaryWriter(logdir=str(self.logdir(run_dir)))
        self.writer.add_text("config", "```toml\n" + to_toml(cfg) + "\n```", 0)
        # hparams in this same run, with the metrics of the scalars below (not add_hparams' extra sub-run)
        experiment, session_start, self._end = hparams(
            config_params(cfg), {"accuracy/mean": 0.0, "accuracy/worst": 0.0}
        )
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_round(self, row: dict[str, Any]) -> None:
        for name, value in round_scalars(row).items():
            self.writer.add_scalar(name, value, row["round"])
        self.writer.flush()  # a watching TensorBoard sees each round as it ends

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        if self._end is not None:
            self.writer.file_writer.add_summary(self._end)
        self.writer.close()


class MlflowTracker:
    """An MLflow run (`MlflowClient`, no global MLflow state): params, per-round metrics, artifacts."""

    def __init__(self, settings: TrackingConfig) -> None:
        self.settings = settings
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        store = run_dir / "mlflow"
        if self.settings.uri:
            uri, artifacts = self.settings.uri, None
        else:
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store.absolute() / 'mlflow.db'}", (store / "artifacts").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.settings.experiment, artifact_location=artifacts)
        )
        if (earlier := self._earlier_run(run_dir, uri)) is not None:  # a resumed run continues its MLflow run
            self.run_id = earlier
            self.client.update_run(earlier, status="RUNNING")
            self.client.log_text(self.run_id, to_toml(cfg), "config.toml")  # params stay; rounds may have grown
            return
        tags = {"fairedge.run_dir": str(run_dir.absolute()), "fairedge.config_hash": config_hash(cfg)}
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        atomic_write_json(run_dir / MLFLOW_RUN_FILE, {"tracking_uri": uri, "run_id": self.run_id})
        params = [Param(k, str(v)) for k, v in config_params(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(
                self.run_id, params=params[i : i + 100], tags=[] if i else [RunTag("method", cfg.aggregation.method)]
            )
        self.client.log_text(self.run_id, to_toml(cfg), "config.toml")

    def _earlier_run(self, run_dir: Path, uri: str) -> str | None:
        """The MLflow run id an earlier session of this run folder logged to, if it is in this store."""
        try:
            earlier = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())
            if earlier["tracking_uri"] != uri:
                return None
            return str(self.client.get_run(earlier["run_id"]).info.run_id)
        except Exception:  # no file, another store, a deleted run: start a new MLflow run
            return None

    def log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(row["round"]), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_scalars(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, status: str) -> None:
        assert self.run_dir is not None
        for name in ("metrics.json", "report.md"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_tag(self.run_id, "fairedge.status", status[:5000])
        self.client.set_terminated(self.run_id, "FINISHED" if status == "complete" else "FAILED")


class SafeTracker:
    """Wraps a backend: its first error is logged as a warning and tracking stops; the run goes on."""

    def __init__(self, backend: Tracker, name: str) -> None:
        self.backend: Tracker | None = backend
        self.name = name
        self.error: str | None = None
        """the first error, if any (tests and reports read it)."""

    def _call(self, what: str, *args: Any) -> None:
        if self.backend is None:
            return
        try:
            getattr(self.backend, what)(*args)
        except Exception as err:  # any failure of the tracker, never of the run
            self.error = f"{type(err).__name__}: {err}"
            log.warning("tracking (%s) failed in %s: %s; the run goes on without tracking", self.name, what, self.error)
            self.backend = None

    def start(self, cfg: RunConfig, run_dir: Path) -> None:
        self._call("start", cfg, run_dir)

    def log_round(self, row: dict[str, Any]) -> None:
        self._call("log_round", row)

    def finish(self, status: str) -> None:
        self._call("finish", status)


def make_tracker(settings: TrackingConfig) -> SafeTracker:
    """The tracker `tracking.backend` names, wrapped so that it cannot stop the run."""
    backend: Tracker
    if settings.backend == "tensorboard":
        backend = TensorBoardTracker(settings)
    elif settings.backend == "mlflow":
        backend = MlflowTracker(settings)
    else:
        backend = NoTracker()
    return SafeTracker(backend, settings.backend)
