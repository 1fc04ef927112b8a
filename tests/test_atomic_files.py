"""Atomic writes: a failed write leaves the old file (or folder) whole and no temporary behind."""

from __future__ import annotations

import json
import os

import pytest

from fairedge.common import atomic_files
from fairedge.common.atomic_files import (
    atomic_folder,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
)


def test_text_and_json_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("\n")
    atomic_write_json(path, {"b": 1, "a": 2}, indent=2, sort_keys=False)
    assert path.read_text() == '{\n  "b": 1,\n  "a": 2\n}\n'
    atomic_write_text(tmp_path / "r.md", "λ ± σ")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "λ ± σ"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "r.md", "sub"]


def test_a_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    atomic_write_json(path, [{"seed": 0}])

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "fsync", fail)  # the new bytes are written, not yet flushed
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, [{"seed": 0}, {"seed": 1}])
    assert json.loads(path.read_text()) == [{"seed": 0}]
    assert os.listdir(tmp_path) == ["rows.json"]


def test_unserialisable_json_never_touches_the_file(tmp_path):
    path = tmp_path / "rows.json"
    atomic_write_json(path, [1])
    with pytest.raises(TypeError):
        atomic_write_json(path, [object()])
    assert json.loads(path.read_text()) == [1] and os.listdir(tmp_path) == ["rows.json"]


def test_figure_is_saved_in_the_format_of_its_suffix(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_save_figure(tmp_path / "f.png", fig, dpi=50)
    atomic_save_figure(tmp_path / "f.svg", fig)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:500]
    with pytest.raises(ValueError, match="needs a suffix"):
        atomic_save_figure(tmp_path / "f", fig)


def test_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        (tmp / "weights.bin").write_bytes(b"1")
    assert (target / "weights.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError, match="training failed"):
        with atomic_folder(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("training failed")
    assert (target / "weights.bin").read_bytes() == b"1"  # the old folder, untouched
    with atomic_folder(target) as tmp:
        (tmp / "other.bin").write_bytes(b"2")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_stale_temporary_files_and_folders_are_removed(tmp_path):
    (tmp_path / ".rows.json.abc.tmp").write_text("half")
    (tmp_path / ".adapter.abc.tmp").mkdir()
    (tmp_path / ".adapter.abc.tmp" / "w").write_text("x")
    (tmp_path / "rows.json").write_text("[]")
    remove_stale_temps(tmp_path)
    assert os.listdir(tmp_path) == ["rows.json"]
