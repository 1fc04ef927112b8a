"""The GPU check script: it refuses a machine without CUDA before it writes anything; its report renders."""

from __future__ import annotations

import json

import pytest
import torch

from fairedge.simulations import gpu_check


def test_gpu_check_stops_with_a_clear_message_and_writes_nothing_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_gpu_check_keeps_what_it_measured_when_a_later_stage_fails(tmp_path, monkeypatch):
    precision = {
        p: {"s_per_step": 0.1, "tokens_per_s": 2560.0, "peak_mib": 1e3, "losses": [4.0, 3.5]} for p in ("fp32", "bf16")
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "a test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(gpu_check, "precision_times", lambda *_: {**precision, "bf16_speedup": 1.0})

    def ray_fails(cfg, client_gpus):
        raise RuntimeError("Ray did not start")

    monkeypatch.setattr(gpu_check, "shared_run", ray_fails)
    with pytest.raises(RuntimeError, match="Ray did not start"):
        gpu_check.main(["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["precision"]["bf16"]["tokens_per_s"] == 2560.0 and saved["sharing"] == []
    assert "| bf16 | 0.1000 | 2560 |" in (tmp_path / "gpu_check.md").read_text()


def share(client_gpus: float, processes: int) -> dict:
    return {
        "client_gpus": client_gpus,
        "round_seconds": [3.0],
        "max_gpu_processes": processes,
        "peak_gpu_mib_clients": 1e3,
        "final_mean_perplexity": 30.0,
    }


def test_gpu_check_report_names_both_precisions_and_both_shares():
    run = {"s_per_step": 0.02, "tokens_per_s": 12800.0, "peak_mib": 900.0, "losses": [3.1, 2.9]}
    result = {
        "command": "python -m fairedge.simulations.gpu_check",
        "when": "2026-12-03 20:00",
        "gpu": "a GPU",
        "torch": torch.__version__,
        "config": "simulations/configs/shakespeare.toml",
        "overrides": ["federation.rounds=2"],
        "steps": 10,
        "repeats": 3,
        "precision": {"fp32": run, "bf16": {**run, "s_per_step": 0.01}, "bf16_speedup": 2.0},
        "sharing": [share(1.0, 1), share(0.25, 4)],
    }
    text = gpu_check.markdown(result)
    assert "| fp32 | 0.0200 |" in text and "| bf16 | 0.0100 |" in text and "2.00× fp32" in text
    assert "| 0.25 | 4 |" in text and "| 1 | 1 |" in text
