"""The update-shape measurements behind the LM compression study's explanation."""

from __future__ import annotations

import math

import pytest
import torch

from fairedge.simulations.update_shape import DENSITIES, client_row, codec_error, kurtosis, top_energy


def test_kurtosis_separates_flat_gaussian_and_heavy_tailed_values() -> None:
    g = torch.Generator().manual_seed(0)
    assert kurtosis(torch.rand(200_000, generator=g)) == pytest.approx(1.8, abs=0.03)
    assert kurtosis(torch.randn(200_000, generator=g)) == pytest.approx(3.0, abs=0.1)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    assert kurtosis(laplace) > 5.0


def test_top_energy_of_a_sparse_and_of_a_flat_vector() -> None:
    sparse = torch.zeros(1000)
    sparse[:10] = torch.arange(1, 11, dtype=torch.float32)
    assert top_energy(sparse, 0.05) == pytest.approx(1.0)
    flat = torch.ones(1000)
    assert top_energy(flat, 0.2) == pytest.approx(0.2)


def test_codec_error_is_zero_when_dense_and_large_for_a_flat_update() -> None:
    g = torch.Generator().manual_seed(1)
    update = {"a": torch.randn(64, 8, generator=g), "b": torch.randn(8, 64, generator=g)}
    assert codec_error(update, 1.0, 1.0, "global") < 1e-6
    flat = {"a": torch.sign(torch.randn(64, 8, generator=g)) * 0.01}
    # sign × sigma at density 10 %: the kept entries are exact, the other 90 % of the energy is lost
    assert codec_error(flat, 0.1, 1.0, "global") == pytest.approx(math.sqrt(0.9), abs=0.02)


def test_client_row_has_every_density_scope_and_alpha() -> None:
    update = {"a": torch.randn(32, 4), "b": torch.randn(4, 32)}
    row = client_row(update)
    assert row["values"] == 256
    assert set(row["energy"]) == {f"{k:g}" for k in DENSITIES}
    assert len(row["codec_error"]) == len(DENSITIES) * 2 * 3
    assert all(0.0 < e < 1.5 for e in row["codec_error"].values())


def test_summary_takes_medians_over_clients_and_is_none_when_missing(tmp_path) -> None:
    import json

    from fairedge.simulations.update_shape import ALPHAS, SCOPES, summary

    assert summary(tmp_path / "missing.json") is None
    rows = {}
    for c, kurt in enumerate((1.0, 2.0, 9.0)):
        rows[f"client{c}"] = {
            "values": 10,
            "max_abs": 0.01 * (c + 1),
            "kurtosis": kurt,
            "energy": {f"{k:g}": k + c for k in DENSITIES},
            "codec_error": {f"{k:g}/{s}/{a:g}": a + c for k in DENSITIES for s in SCOPES for a in ALPHAS},
        }
    saved = {
        "config": {"federation": {"optimizer": "adamw", "local_steps": 8, "lr": 0.004}},
        "command": "python -m x",
        "clients": rows,
        "gaussian_energy": {f"{k:g}": 0.5 for k in DENSITIES},
    }
    path = tmp_path / "update_shape-lm-adamw.json"
    path.write_text(json.dumps(saved))
    s = summary(path)
    assert s is not None
    assert s["kurtosis"] == 2.0 and s["max_abs"] == pytest.approx(0.02) and s["cap"] == pytest.approx(0.032)
    assert s["energy"][0.2] == pytest.approx(1.2) and s["codec_error"][0.1][2.0] == pytest.approx(3.0)
