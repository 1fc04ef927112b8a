"""Experiment tracking: a short run logs to TensorBoard / MLflow what metrics.json holds; a broken tracker only warns."""

import json
import logging
import tomllib

import pytest

from fairedge.common.config import build_config
from fairedge.server.tracking import SafeTracker, make_tracker, round_scalars
from fairedge.simulations.simulate import simulate
from tests.tiny_vit import TINY_VIT

TINY = [
    *TINY_VIT,
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.min_train_nodes=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "federation.device='cpu'",
]


def _cfg(root, *extra):
    return build_config({}, [f"output_dir='{root / 'runs'}'", f"model.cache_dir='{root / 'cache'}'", *TINY, *extra])


def _expected(run_dir) -> list[dict[str, float]]:
    """Per round, the values tracking must have logged, read from metrics.json."""
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    return [round_scalars(r) for r in rounds]


def _check_against_metrics(run_dir, logged: dict[str, dict[int, float]]) -> None:
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:  # named independently of round_scalars: the values a person would look for
        step = r["round"]
        assert logged["accuracy/mean"][step] == pytest.approx(r["mean_accuracy"], rel=1e-6)
        assert logged["accuracy/worst"][step] == pytest.approx(r["worst_accuracy"], rel=1e-6)
        for domain, acc in r["accuracy"].items():
            assert logged[f"accuracy/{domain}"][step] == pytest.approx(acc, rel=1e-6)
        if step:
            assert logged["bytes/up"][step] == r["bytes_up"] and logged["bytes/down"][step] == r["bytes_down"]
            assert logged["clients/replied"][step] == len(r["replied"]) == 3
            assert logged["clients/rejected"][step] == 0
            assert logged["train/loss"][step] == pytest.approx(r["train_loss"], rel=1e-6)
    # and every number round_scalars takes from a row was logged
    for step, want in enumerate(_expected(run_dir)):
        for name, value in want.items():
            assert logged[name][step] == pytest.approx(value, rel=1e-6), name


def test_tensorboard_events_hold_the_rounds_of_metrics_json(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    simulate(_cfg(tmp_path, "tracking.backend='tensorboard'"), run_dir, engine="inprocess")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    _check_against_metrics(run_dir, logged)
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[tracking]" in text and 'backend = "tensorboard"' in text


@pytest.mark.slow  # MLflow creates its SQLite store (schema migrations): about 15 s
def test_mlflow_run_in_the_run_folder_holds_params_metrics_and_config(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = _cfg(tmp_path, "tracking.backend='mlflow'", "federation.rounds=1")
    simulate(cfg, run_dir, engine="inprocess")
    # a resumed run (one more round) goes on logging to the same MLflow run
    simulate(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})}), run_dir,
             engine="inprocess", resume=True)  # fmt: skip
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fairedge").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "2" and run.data.params["aggregation.method"] == "fedit"
    assert run.data.params["federation.rounds"] == "1"  # MLflow params are write-once; config.toml has 2
    logged = {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in run.data.metrics
    }
    _check_against_metrics(run_dir, logged)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "metrics.json", "report.md"} <= artifacts
    config = client.download_artifacts(run.info.run_id, "config.toml", str(tmp_path))
    with open(config, "rb") as f:
        config = tomllib.load(f)
    assert config["lora"]["rank"] == 2 and config["federation"]["rounds"] == 2


def test_a_tracker_that_fails_warns_once_and_stops_tracking(tmp_path, caplog):
    class Broken:
        calls = 0

        def start(self, cfg, run_dir):
            pass

        def log_round(self, row):
            Broken.calls += 1
            raise OSError("disk full")

        def finish(self, status):
            Broken.calls += 1

    tracker = SafeTracker(Broken(), "broken")
    with caplog.at_level(logging.WARNING, logger="fairedge.server"):
        tracker.start(_cfg(tmp_path), tmp_path)
        tracker.log_round({"round": 1})
        tracker.log_round({"round": 2})
        tracker.finish("complete")
    assert Broken.calls == 1 and tracker.error == "OSError: disk full"
    assert "tracking (broken) failed in log_round: OSError: disk full; the run goes on" in caplog.text


def test_an_unusable_mlflow_uri_is_a_warning_not_an_error(tmp_path, caplog):
    cfg = _cfg(tmp_path, "tracking.backend='mlflow'", "tracking.uri='nosuchscheme://x'")
    tracker = make_tracker(cfg.tracking)
    with caplog.at_level(logging.WARNING, logger="fairedge.server"):
        tracker.start(cfg, tmp_path)
        tracker.log_round({"round": 0, "mean_accuracy": 0.5})
        tracker.finish("complete")
    assert tracker.error is not None and "tracking (mlflow) failed in start" in caplog.text


def test_a_tensorboard_uri_gets_one_folder_per_run(tmp_path):
    cfg = _cfg(tmp_path, "tracking.backend='tensorboard'", f"tracking.uri='{tmp_path / 'tb'}'")
    tracker = make_tracker(cfg.tracking)
    tracker.start(cfg, tmp_path / "20260101-000000-x")
    tracker.log_round({"round": 0, "mean_accuracy": 0.5, "accuracy": {"a b/c": 0.5}})
    tracker.finish("complete")
    assert tracker.error is None
    assert list((tmp_path / "tb" / "20260101-000000-x").glob("events.out.tfevents.*"))


def test_round_scalars_names_are_safe_and_skip_non_numbers():
    row = {"round": 3, "accuracy": {"hamlet/Ham": 0.25, "x:y": 0.5}, "mean_accuracy": float("nan"), "sampled": [1, 2]}
    assert round_scalars(row) == {"accuracy/hamlet/Ham": 0.25, "accuracy/x_y": 0.5, "clients/sampled": 2.0}


def test_round_scalars_carry_the_privacy_ledger():
    row = {"round": 2, "privacy": {"epsilon": 1.5, "epsilon_round": 0.9, "delta": 1e-5, "mode": "central"}}
    assert round_scalars(row) == {"privacy/epsilon": 1.5, "privacy/epsilon_round": 0.9, "privacy/delta": 1e-5}


def test_round_scalars_carry_the_lm_perplexities():
    row = {"round": 1, "mean_perplexity": 90.0, "worst_perplexity": 150.0, "geomean_perplexity": 70.0}
    assert round_scalars(row) == {"perplexity/mean": 90.0, "perplexity/worst": 150.0, "perplexity/geomean": 70.0}
