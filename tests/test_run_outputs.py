"""A run folder's outputs: every file written whole (no temporaries left), readable back."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fairedge.common.config import load_config
from fairedge.server.run_outputs import RunRecord, write_outputs

DEFAULT = Path(__file__).parents[1] / "simulations" / "configs" / "digits.toml"


class SavesLikePeft:
    """Stands in for a PeftModel: `save_pretrained` writes the adapter folder, or fails half-way."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.peft_config = defaultdict(lambda: SimpleNamespace(to_dict=dict))  # no set-valued fields

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / "adapter_config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"weights")


def _record(run_dir: Path) -> RunRecord:
    record = RunRecord(load_config(DEFAULT), run_dir, domains=["clean", "rotated"], shifted_domains=["rotated"])
    record.add_round(0, {"clean": 0.5, "rotated": 0.25}, None, 0.0)
    attempt = SimpleNamespace(  # what the strategy logs about a round (its RoundLog)
        bytes_up=100,
        fp32_bytes_up=400,
        bytes_down=200,
        metrics={"train-loss": 0.3},
        sampled=[1, 2],
        replied=[1, 2],
        no_reply=[],
        rejected={},
        clipped={},
        partitions={1: 0, 2: 1},
        update_norms={},
        aggregated=[1, 2],
        client_config={},
        personal_accuracy={},
    )
    record.add_round(1, {"clean": 0.75, "rotated": 0.5}, attempt, 1.0)
    return record


def test_write_outputs_writes_every_file_whole(tmp_path):
    run_dir = tmp_path / "run"
    delta = {"layer": (torch.ones(2, 3), torch.full((4, 2), 2.0))}
    write_outputs(_record(run_dir), SavesLikePeft(), delta)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "accuracy.png",
        "adapter",
        "base_delta.safetensors",
        "config.toml",
        "metrics.json",
        "report.md",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"]["final_mean_accuracy"] == pytest.approx(0.625)
    assert (run_dir / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert "| final (round 1) | 0.6250 |" in (run_dir / "report.md").read_text()
    tensors = load_file(run_dir / "base_delta.safetensors")
    assert torch.equal(tensors["base/layer/Q"], torch.ones(2, 3)) and tensors["base/layer/P"].shape == (4, 2)
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_an_adapter_that_fails_half_way_leaves_no_adapter_folder(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        write_outputs(_record(run_dir), SavesLikePeft(fail=True))
    assert not (run_dir / "adapter").exists()  # never a folder with a config and no weights
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def _plotted(monkeypatch, record: RunRecord):
    """The figure `plot_accuracy` would save: its lines' labels and its legend's texts."""
    from fairedge.server import run_outputs

    saved = []
    monkeypatch.setattr(run_outputs, "atomic_save_figure", lambda path, fig, dpi: saved.append(fig))
    run_outputs.plot_accuracy(record, record.run_dir / "accuracy.png")
    (ax,) = saved[0].axes
    return [line.get_label() for line in ax.get_lines()], [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_names_each_group_only_while_a_legend_can_be_read(tmp_path, monkeypatch):
    lines, legend = _plotted(monkeypatch, _record(tmp_path / "few"))
    assert legend == ["clean", "rotated", "mean"] and len(lines) == 3

    domains = [f"role-{i}" for i in range(300)]  # an LM run: 300 clients, the server scores 20 of them
    record = RunRecord(load_config(DEFAULT), tmp_path / "many", domains=domains, shifted_domains=[])
    record.add_round(0, {d: 0.5 for d in domains[:20]}, None, 0.0)
    lines, legend = _plotted(monkeypatch, record)
    assert len(lines) == 21  # the scored groups and the mean, not 300 empty lines
    assert legend == ["mean (thin lines: the 20 groups)"]
