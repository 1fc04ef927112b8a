"""The DINOv2 aggregation study (sizing, the smoke of its whole pipeline on a tiny DINOv2) and the vision demo."""

from __future__ import annotations

import json

import pytest

from fairedge.common.config import load_config
from fairedge.simulations import dino_aggregation_study as study
from fairedge.simulations import dino_study_setup as setup


def test_the_study_fits_its_cpu_budget_and_pins_its_setting():
    s = setup.FULL
    runs = {"federated": 2 * (len(study.METHODS) + 1) * 3, "centralised": 2 * 2 * 3, "replays": 2}
    hours = setup.estimate_seconds(s, *runs.values()) / 3600 * setup.CORES
    assert 6 <= hours <= 10, hours
    cfg = load_config(setup.VISION_CONFIG, s.overrides())
    assert cfg.federation.num_clients == len(cfg.data.domains or []) == 8
    assert cfg.lora.top_layers == 4 and cfg.model.image_size == 56 and not cfg.compression.enabled


def test_the_vision_demo_config_validates():
    cfg = load_config(setup.VISION_CONFIG)
    assert cfg.model.kind == "hf-vision" and cfg.model.path is None and cfg.data.task == "digit-shift"
    assert cfg.aggregation.method == "lora_fair" and cfg.compression.enabled and cfg.compression.error_feedback
    assert cfg.federation.num_clients == len(cfg.data.domains or [])
    # ≤ 5 minutes on 2 cores after the one-time conversion, by the study's own per-step figures
    demo = setup.Setting(
        domains=tuple(cfg.data.domains or []), samples_per_domain=cfg.data.samples_per_domain,
        image_size=cfg.model.image_size, top_layers=cfg.lora.top_layers or 12, rounds=cfg.federation.rounds,
        local_steps=cfg.federation.local_steps, batch_size=cfg.federation.batch_size,
    )  # fmt: skip
    assert demo.run_seconds() + demo.fill_seconds() <= 300


@pytest.mark.slow
def test_quick_smoke_runs_every_part_on_a_tiny_dinov2(tmp_path, tiny_dinov2_4_dir):
    out = tmp_path / "out"
    sets = [f"model.path={tiny_dinov2_4_dir}", "model.image_size=28", f"model.cache_dir={tmp_path}"]
    argv = ["--quick", "--partitions", "feature", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    text = study.main(argv)
    rows = json.loads((out / "dino_aggregation.json").read_text())
    labels = {r["variant"] for r in rows}
    assert labels == {
        "feature/fedit", "feature/lora_fair", "feature/flora", f"feature/{study.LAMBDA0}",
        "feature/centralised", f"feature/{study.LARGE_BATCH}",
    }  # fmt: skip
    assert all(0 <= r["summary"]["final_mean_accuracy"] <= 1 for r in rows)
    (replayed,) = json.loads((out / "dino_aggregation_bias.json").read_text())
    assert replayed["rounds"][0]["err/fedit"] >= 0
    assert "QUICK SMOKE" in text and "Goal LoRA-FAIR − FedIT" in text and "| round | rank90(U)" in text
    assert (out / "dino_aggregation.png").stat().st_size > 0
    assert study.main(argv) == text  # resumed: every run reused, the same report
