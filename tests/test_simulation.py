"""Short real Flower simulations (Ray): accuracy improves; a failing client is left out."""

import json
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from peft import PeftModel

from fairedge.client.client_app import run_train
from fairedge.common.config import build_config
from fairedge.common.task import base_model, load_task
from fairedge.common.training import evaluate_per_domain
from fairedge.simulations.simulate import simulate

pytestmark = pytest.mark.slow
DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    raw = tomllib.loads(DEFAULT.read_text())
    return build_config(
        raw,
        [
            "name=test-sim",
            f"output_dir='{root / 'runs'}'",
            f"model.cache_dir='{root / 'cache'}'",
            "federation.num_clients=3",
            "federation.rounds=2",
            "federation.min_train_nodes=2",
        ],
    )


def test_three_clients_two_rounds_improve_accuracy_and_write_outputs(cfg, tmp_path):
    record = simulate(cfg, tmp_path / "run")
    s = record.summary()
    assert [r["round"] for r in record.rounds] == [0, 1, 2]
    assert s["final_mean_accuracy"] > s["base_mean_accuracy"] + 0.01
    assert all(len(r["replied"]) == 3 and not r["rejected"] for r in record.rounds[1:])
    for name in ("config.toml", "metrics.json", "report.md", "accuracy.png", "adapter/adapter_config.json"):
        assert (tmp_path / "run" / name).is_file(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["name"] == "test-sim" and len(metrics["rounds"]) == 3
    # the final global adapter loads with PEFT on the same base and reproduces the server's accuracy
    model = PeftModel.from_pretrained(base_model(cfg), tmp_path / "run" / "adapter").eval()
    acc = evaluate_per_domain(model, load_task(cfg).test, load_task(cfg).domains)
    assert acc == pytest.approx(record.rounds[-1]["accuracy"], abs=1e-9)


faulty_app = ClientApp()


@faulty_app.train()
def _faulty_train(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("simulated client crash")
    return run_train(msg, context)


def test_failing_client_is_left_out_and_compressed_rounds_go_on(cfg, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the workers cannot import tests/
    compressed = cfg.model_copy(
        update={"compression": cfg.compression.model_copy(update={"enabled": True, "density": 0.1, "downlink": "fp16"})}
    )
    record = simulate(compressed, tmp_path / "run", client_app=faulty_app)
    for r in record.rounds[1:]:
        assert r["aggregated"], r
        assert len(r["rejected"]) == 1
        assert "simulated client crash" in next(iter(r["rejected"].values()))
        assert r["uplink_ratio_vs_fp32"] > 10  # ComPEFT at 10 % density
    assert record.summary()["final_mean_accuracy"] > record.summary()["base_mean_accuracy"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "simulated client crash" in report
