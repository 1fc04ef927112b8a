"""Short in-process runs with secure aggregation on the digits config: the same result as plaintext."""

import json
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fairedge.common.config import build_config
from fairedge.simulations.simulate import simulate
from tests.tiny_vit import TINY_VIT

pytestmark = pytest.mark.slow
DIGITS = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"
TINY = [
    *TINY_VIT,
    "federation.num_clients=4",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "federation.device='cpu'",
    "federation.update_norm_rule='off'",
]


def _run(tmp_path, name, *overrides):
    raw = tomllib.loads(DIGITS.read_text())
    cfg = build_config(
        raw, [*TINY, f"output_dir='{tmp_path / 'runs'}'", f"model.cache_dir='{tmp_path.parent / 'cache'}'", *overrides]
    )
    simulate(cfg, tmp_path / name, engine="inprocess")
    return json.loads((tmp_path / name / "metrics.json").read_text())


def _adapter(tmp_path, name):
    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "method",
    [["aggregation.method='fedit'"], ["aggregation.method='lora_fair'", "aggregation.objective='frobenius'"]],
    ids=["fedit", "lora-fair-frobenius"],
)
def test_a_secure_run_matches_the_plaintext_run(tmp_path, method):
    secure = [
        "privacy.secure_aggregation.enabled=true",
        "privacy.secure_aggregation.modulus_bits=64",
        "privacy.secure_aggregation.quantization_bits=44",
        "privacy.secure_aggregation.max_weight=200",
    ]
    plain = _run(tmp_path, "plain", *method)
    masked = _run(tmp_path, "secure", *method, *secure)
    rounds = masked["rounds"][1:]
    assert all(r["aggregated"] and r["aggregator_metrics"]["secagg/survivors"] == 4 for r in rounds)
    assert all(r["bytes_up"] > 0 and not r["no_reply"] for r in rounds)
    a, b = _adapter(tmp_path, "plain"), _adapter(tmp_path, "secure")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    for p, s in zip(plain["rounds"][1:], rounds, strict=True):
        assert s["train_loss"] == pytest.approx(p["train_loss"], abs=1e-4)
