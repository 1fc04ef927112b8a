"""Short in-process DP runs on the digits config: ε per round in metrics.json and the report."""

import json
import tomllib
from pathlib import Path

import pytest

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
    "privacy.enabled=true",
    "privacy.noise_seed=0",
    "privacy.delta=1e-5",
]


def _cfg(tmp_path, *overrides):
    raw = tomllib.loads(DIGITS.read_text())
    return build_config(
        raw, [*TINY, f"output_dir='{tmp_path / 'runs'}'", f"model.cache_dir='{tmp_path.parent / 'cache'}'", *overrides]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05", "federation.fraction_train=0.5"],
        ["privacy.target_epsilon=8.0", "aggregation.method='lora_fair'", "aggregation.objective='frobenius'"],
        [
            "privacy.noise_multiplier=1.0",
            "privacy.mode='local'",
            "compression.enabled=true",
            "aggregation.method='flexlora'",
        ],
    ],
    ids=["central-fedit-sampled", "central-lora-fair-target", "local-compressed-flexlora"],
)
def test_a_private_run_records_epsilon_per_round(tmp_path, overrides):
    cfg = _cfg(tmp_path, *overrides)
    simulate(cfg, tmp_path / "run", engine="inprocess")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"][1:]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] and all(r["privacy"]["epsilon_round"] > 0 for r in rounds)
    assert metrics["summary"]["epsilon"] == eps[-1] and metrics["summary"]["delta"] == 1e-5
    assert all(0 <= r["privacy"]["clipped"] <= len(r["sampled"]) for r in rounds)
    if cfg.privacy.target_epsilon is not None:
        assert eps[-1] <= cfg.privacy.target_epsilon
    if cfg.privacy.mode == "central" and cfg.privacy.clip_norm < 0.1:
        assert rounds[0]["privacy"]["clipped"] == len(rounds[0]["sampled"])  # a tiny bound clips everyone
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Privacy" in report and f"ε = {eps[-1]:.3g} at δ = 1e-05" in report
