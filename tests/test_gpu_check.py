"""The GPU check script: it refuses a machine without CUDA before it writes anything; its report renders."""

from __future__ import annotations

import pytest
import torch

from fairedge.simulations import gpu_check


def test_gpu_check_stops_with_a_clear_message_and_writes_nothing_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


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
