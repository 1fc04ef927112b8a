"""The edge study's pure parts: corruptions (deterministic per seed, they change the images), the stream, the tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fairedge.common.data.task_data import LabeledData, normalize_pixels
from fairedge.simulations.edge_lockstep import MODES
from fairedge.simulations.edge_plot import windowed_accuracy
from fairedge.simulations.edge_stream import CORRUPTIONS, SEGMENTS, build_stream, corrupt, corruption_generator
from fairedge.simulations.edge_tables import (
    gain_table,
    gains,
    latency_summary,
    mode_table,
    ratio_interval,
    segment_table,
    tuning_table,
)


def digits_like(n: int = 24, seed: int = 0) -> torch.Tensor:
    """Dark images with a bright stroke, pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 16, 16), generator=g) * 0.1
    x[:, :, 4:12, 7:9] = 0.9
    return x


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 2])
def test_corruptions_change_the_images_and_repeat_per_seed(name, severity):
    x = digits_like()
    a = corrupt(x, name, severity, corruption_generator(0, name, severity))
    b = corrupt(x, name, severity, corruption_generator(0, name, severity))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # same seed, same corruption
    assert (a - x).abs().mean() > 0.01  # it really changes the images
    top = 1 + CORRUPTIONS["brightness"][severity - 1] if name == "brightness" else 1  # an offset, not clipped
    assert x.min() >= 0 and a.min() >= -1e-6 and a.max() <= top + 1e-6  # stays on the [0, 1] scale
    if name in ("salt_pepper", "occlusion"):  # random ones differ with the seed
        assert not torch.equal(a, corrupt(x, name, severity, corruption_generator(1, name, severity)))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_severe_is_further_from_the_clean_image_than_mild(name):
    x = digits_like(64)
    mild = corrupt(x, name, 1, corruption_generator(0, name, 1))
    severe = corrupt(x, name, 2, corruption_generator(0, name, 2))
    assert (severe - x).abs().mean() > (mild - x).abs().mean()


def test_bad_corruption_arguments_are_named():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(digits_like(), "fog", 1, corruption_generator(0, "fog", 1))
    with pytest.raises(ValueError, match="severity must be 1"):
        corrupt(digits_like(), "contrast", 3, corruption_generator(0, "contrast", 3))


def test_stream_is_segments_in_order_and_deterministic_per_seed():
    x01 = digits_like(40)
    test = LabeledData(x=normalize_pixels(x01), y=torch.arange(40) % 10, domain=torch.arange(40) % 6)
    s = build_stream(test, seed=3, per_segment=8)
    assert len(s) == 8 * len(SEGMENTS) and s.x.dtype == np.float32
    assert s.boundaries() == list(range(0, len(s) + 1, 8))
    assert s.segments[0] == "contrast-1" and (np.diff(s.segment) >= 0).all()
    again = build_stream(test, seed=3, per_segment=8)
    other = build_stream(test, seed=4, per_segment=8)
    assert np.array_equal(s.x, again.x) and np.array_equal(s.y, again.y)
    assert not np.array_equal(s.y, other.y)
    with pytest.raises(ValueError, match="per_segment = 41"):
        build_stream(test, seed=0, per_segment=41)


def _row(mode: str, seed: int, acc: float, uploaded: float) -> dict:
    return {
        "mode": mode,
        "seed": seed,
        "accuracy": acc,
        "uploaded_fraction": uploaded,
        "bytes_up": 1000,
        "bytes_down": 10,
        "params_version": 3,
        "seconds": 1.0,
        "overrides": [],
        "setting": "defaults",
        "segment_accuracy": {"contrast-1": acc},
    }


def test_ratio_interval_resamples_the_same_batches_for_every_mode():
    rng = np.random.default_rng(0)
    none = [[32 * i, 32, int(c), 0, 0] for i, c in enumerate(rng.integers(8, 16, 16))]
    plus = lambda d: [[s, n, c + d, 0, 0] for s, n, c, *_ in none]  # noqa: E731  (d more right in every batch)
    # CEMA gains half of what uploading everything gains in every batch: the ratio is 0.5 in every draw
    assert ratio_interval({"none": none, "cema": plus(2), "all": plus(4)}, segments=2) == pytest.approx((0.5, 0.5))
    # batch-to-batch noise in CEMA's gain widens it around the point ratio
    cema = [[s, n, c + int(k), 0, 0] for (s, n, c, *_), k in zip(none, rng.integers(0, 5, 16))]
    lo, hi = ratio_interval({"none": none, "cema": cema, "all": plus(4)}, segments=2)
    point = sum(c[2] - n[2] for c, n in zip(cema, none)) / (4 * 16)
    assert lo < point < hi and hi - lo > 0.1
    assert ratio_interval({"none": none, "cema": cema, "all": none}, segments=2) is None  # nothing to keep
    assert ratio_interval({"none": none, "cema": cema}, segments=2) is None  # a mode without batch records


def test_gains_and_tables():
    rows = [
        _row("none", 0, 0.50, 0.0),
        _row("cema", 0, 0.59, 0.3),
        _row("all", 0, 0.60, 1.0),
        _row("none", 1, 0.40, 0.0),
        _row("cema", 1, 0.40, 0.4),
        _row("all", 1, 0.38, 1.0),
    ]
    g = gains(rows)
    assert g[0]["gain_cema"] == pytest.approx(0.09) and g[0]["gain_ratio"] == pytest.approx(0.9)
    assert math.isnan(g[1]["gain_ratio"])  # no gain to keep when uploading everything did not help
    table = gain_table(rows)
    assert "| 0 | 0.5000 | 0.5900 | 0.6000 | +9.00 | +10.00 | 0.90 | – | 30.0% |" in table  # no batch records
    assert "| mean |" in table
    assert all(f"| {m} |" in mode_table(rows) for m in MODES)
    assert "| contrast-1 | 0.4500 | 0.4950 | 0.4900 |" in segment_table(rows, ["contrast-1"])
    assert "| defaults | `-` | 0.5900 | 0.6000 | +9.00 | +10.00 | 0.90 | 30.0% |" in tuning_table(rows[:3])


def test_windowed_accuracy():
    batches = [[0, 4, 4], [4, 4, 0], [8, 4, 2], [12, 4, 4]]
    seen, acc = windowed_accuracy(batches, window=8)
    assert seen.tolist() == [4, 8, 12, 16]
    assert acc.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.75])


def test_latency_summary_keeps_the_intro_and_the_chosen_sections_one_level_down():
    text = (
        "# Title\n\nMachine: x.\n\n## Latency (ms)\n\n| a |\n\n## Parity\n\n| b |\n\n## Swapping vs rebuild\n\n| c |\n"
    )
    out = latency_summary(text)
    assert "Title" not in out and "Machine: x." in out
    assert "### Latency (ms)" in out and "### Swapping vs rebuild" in out and "| c |" in out
    assert "Parity" not in out and "| b |" not in out


def test_target_line_and_teacher_section():
    from fairedge.simulations.edge_report import target_line, teacher_section
    from fairedge.simulations.edge_tables import summary_table

    rows = [_row("none", 0, 0.50, 0.0), _row("cema", 0, 0.595, 0.3), _row("all", 0, 0.60, 1.0)]
    line = target_line(gains(rows))
    assert line.startswith("**Target met**: CEMA uploads 30.0%") and "keeps 0.95" in line
    worse = [_row("none", 0, 0.50, 0.0), _row("cema", 0, 0.55, 0.6), _row("all", 0, 0.60, 1.0)]
    assert "**Target not met**" in target_line(gains(worse)) and "above the 50 % budget on seed(s) 0" in target_line(
        gains(worse)
    )
    # a mean ratio of 1.08 (0.95, 0.80, 1.50) does not hide seed 1's 0.80: the target holds per seed
    mixed = rows + [_row("none", 1, 0.50, 0.0), _row("cema", 1, 0.58, 0.4), _row("all", 1, 0.60, 1.0)]
    mixed += [_row("none", 2, 0.50, 0.0), _row("cema", 2, 0.65, 0.4), _row("all", 2, 0.60, 1.0)]
    line = target_line(gains(mixed))
    assert line.startswith("**Target not met**") and "keeps 1.08" in line
    assert "below the 0.9 asked for on seed(s) 1;" in line and "within the 50 % budget on every seed" in line
    data = {
        "study": {
            "teacher": "runs/t",
            "teacher_model_version": "abc",
            "config_hash": "h",
            "run_dir": "runs/s",
            "segments": ["contrast-1"],
        },
        "rows": rows,
        "teacher_stream_accuracy": {"0": 0.62},
        "overrides": ["cloud.ce_weight=0"],
        "chosen": "KL only",
    }
    md = teacher_section("centralised", data, command="cmd", plot_name="p.png")
    assert "## Teacher: centralised" in md and "`runs/t` (model version `abc`" in md
    assert "seed 0: 0.6200 (mean 0.6200)" in md and "**KL only** (`cloud.ce_weight=0`)" in md
    assert "| 0 | 0.5000 | 0.5950 | 0.6000 | +9.50 | +10.00 | 0.95 | – | 30.0% |" in md and "(p.png)" in md
    assert "Settings tried on seed 0" not in md  # no tuning rows
    summary = summary_table({"centralised": data})
    assert "| centralised | 0.6200 | KL only |" in summary and "| 30.0 % | met |" in summary


def _tuned(setting: str, cema: float, all_: float, uploaded: float) -> list[dict]:
    return [_row("cema", 0, cema, uploaded) | {"setting": setting}, _row("all", 0, all_, 1.0) | {"setting": setting}]


def test_chosen_setting_prefers_the_best_cema_within_the_upload_budget():
    from fairedge.simulations.edge_settings import chosen_setting

    none = [_row("none", 0, 0.50, 0.0)]
    assert chosen_setting([]) is None
    rows = (
        none
        + _tuned("defaults", 0.52, 0.55, 0.4)
        + _tuned("KL only", 0.56, 0.57, 0.6)
        + _tuned("cautious", 0.51, 0.58, 0.3)
    )
    assert chosen_setting(rows) == "defaults"  # KL only uploads too much; cautious gains less with CEMA
    over = none + _tuned("defaults", 0.52, 0.49, 0.4) + _tuned("KL only", 0.51, 0.53, 0.6)
    assert chosen_setting(over) == "KL only"  # nothing qualifies: the largest gain of uploading everything
    assert "| **KL only** |" in tuning_table(over, "KL only")


def test_photometric_jitter_adds_labelled_copies_deterministically():
    from fairedge.common.data import LabeledData
    from fairedge.simulations.edge_teachers import photometric_jitter

    x = torch.randn(6, 1, 4, 4)
    data = LabeledData(x, torch.arange(6), torch.zeros(6, dtype=torch.int64))
    out = photometric_jitter(data, copies=2, seed=3)
    assert out.x.shape == (18, 1, 4, 4) and out.y.tolist() == list(range(6)) * 3
    assert torch.equal(out.x[:6], x) and not torch.allclose(out.x[6:12], x)
    assert torch.equal(out.x, photometric_jitter(data, copies=2, seed=3).x)
    assert not torch.equal(out.x, photometric_jitter(data, copies=2, seed=4).x)


def test_headroom_table():
    from fairedge.simulations.edge_tables import headroom_table

    rows = [{"corruption": "contrast", "severity": 2, "in_stream": True, "served": 0.2, "fitted": 0.41}]
    assert "| contrast-2 | yes | 0.200 | 0.410 | +21.0 |" in headroom_table(rows)


def test_teacher_choice_is_checked():
    from fairedge.simulations.edge_teachers import study_config, teacher_run

    cfg = study_config()
    assert teacher_run("self", cfg) is None
    with pytest.raises(ValueError, match="teacher 'oracle': allowed"):
        teacher_run("oracle", cfg)


def test_stream_accuracy_of_student_and_teacher():
    from types import SimpleNamespace

    from fairedge.simulations.edge_stream import Stream
    from fairedge.simulations.edge_yardsticks import stream_accuracy

    x = np.zeros((10, 1, 2, 2), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(10)
    y = np.array([1] * 6 + [0] * 4)
    stream = Stream(x, y, np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64), ["contrast-1"])
    ones = lambda n: torch.tensor([[0.0, 1.0]]).expand(n, 2)  # noqa: E731  always class 1
    served = SimpleNamespace(
        inputs=[SimpleNamespace(name="pixels")],
        student="s",
        teacher="t",
        student_norm={},
        teacher_norm={},
        forward=lambda m, p, f: ones(len(f["pixels"])) if m == "s" else -ones(len(f["pixels"])),
    )
    assert stream_accuracy(served, stream, batch=3) == pytest.approx(0.6)
    assert stream_accuracy(served, stream, teacher=True, batch=4) == pytest.approx(0.4)


def test_target_line_names_seeds_where_uploading_everything_lost():
    from fairedge.simulations.edge_report import target_line

    rows = [_row("none", 0, 0.50, 0.0), _row("cema", 0, 0.51, 0.3), _row("all", 0, 0.49, 1.0)]
    line = target_line(gains(rows))
    assert line.startswith("**Target not met**") and "gained nothing on seed(s) 0 (-1.00 points)" in line


def test_a_study_without_the_self_taught_baseline_gets_the_brief_report(tmp_path, monkeypatch):
    """The DINOv2 study runs only a stronger teacher, with a setting given on the command line."""
    from fairedge.common.config import build_config, to_toml
    from fairedge.simulations import edge_report, edge_study

    for name, lora in (("served", {"rank": 4}), ("teacher", {"rank": 16, "target_modules": ["query", "fc1"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(to_toml(build_config({"name": name, "lora": lora})))
    monkeypatch.setattr(edge_report, "ROOT", tmp_path)
    rows = [_row("none", 0, 0.50, 0.0), _row("cema", 0, 0.595, 0.3), _row("all", 0, 0.60, 1.0)]
    study = {"teacher": "teacher", "teacher_model_version": "abc", "run_dir": "served", "config_name": "served",
             "config_hash": "h", "model_version": "v", "per_segment": 32, "segments": ["contrast-1"],
             "corruptions": {"contrast": [0.35, 0.15]}, "fixed": ["edge.threads=1"]}  # fmt: skip
    data = {"study": study, "rows": rows, "teacher_stream_accuracy": {"0": 0.7}, "chosen": "given",
            "overrides": ["cloud.lr=0.05"], "label_oracle": {"0": 0.52},
            "invocation": {"config": "simulations/configs/vision.toml", "method": "lora_fair",
                           "teacher_set": ['lora.target_modules=["query","fc1"]']}}  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "edge_stream_foundation-teacher.json").write_text(json.dumps(data))
    path = edge_study.write_report(None, tmp_path / "out")
    md = path.read_text()
    assert path == tmp_path / "out" / "edge.md" and "## Headroom" not in md
    assert "LoRA r4 on the default attention targets, every block" in md  # the served model, from its config
    assert "LoRA r16 on query, fc1, every block" in md  # the teacher, from its own config
    assert "`cloud.lr=0.05`, given on the command line for every seed (not tuned)" in md
    assert "| 0 | 0.5000 | 0.5950 | 0.6000 | +9.50 | +10.00 | 0.95 | – | 30.0% |" in md
    # the regenerate commands name what trains the served model and the teacher, the seeds (only seed 0 here),
    # the setting and the folder
    command = (
        "python -m fairedge.simulations.edge_study --config simulations/configs/vision.toml --method lora_fair"
        " --per-segment 32 --seeds 0"
    )
    assert f"Regenerate: `{command} --out out --teacher T`" in md
    assert f"""`{command} --out out --teacher foundation --teacher-set 'lora.target_modules=["query","fc1"]' """ in md
    assert "--set cloud.lr=0.05`" in md
    assert "seed 0: 0.5200 (+2.00 pts; uploading everything: +10.00)" in md  # the label oracle beside `all`
    assert "fitted to the labels" not in md  # no `--headroom` result yet
    headroom = {"model_version": "v", "run_dir": "served", "seconds": 600.0, "rows": [
        {"corruption": "contrast", "severity": 2, "in_stream": True, "served": 0.2, "fitted": 0.41}]}  # fmt: skip
    (tmp_path / "out" / edge_study.HEADROOM).write_text(json.dumps(headroom))
    md = edge_study.write_report(None, tmp_path / "out").read_text()
    assert "(`--headroom`, 10 CPU-min; not deployable)" in md and "| contrast-2 | yes | 0.200 | 0.410 | +21.0 |" in md
    (tmp_path / "out" / edge_study.HEADROOM).write_text(json.dumps(headroom | {"model_version": "older"}))
    assert "fitted to the labels" not in edge_study.write_report(None, tmp_path / "out").read_text()  # another model
    assert edge_study.write_report(None, tmp_path / "empty") is None


def test_headroom_study_is_measured_once_per_served_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fairedge.common import task
    from fairedge.server import cloud
    from fairedge.simulations import edge_study

    served = SimpleNamespace(model_version="v1")
    calls: list[object] = []
    monkeypatch.setattr(cloud, "load_served_model", lambda run_dir: served)
    monkeypatch.setattr(task, "load_task", lambda cfg: SimpleNamespace(test="test-set"))
    monkeypatch.setattr(edge_study, "study_settings", lambda run_dir, overrides: None)
    monkeypatch.setattr(edge_study, "norm_headroom", lambda s, test: calls.append(test) or [{"fitted": 0.5}])
    out = tmp_path / edge_study.HEADROOM
    first = edge_study.headroom_study(tmp_path, out)
    assert first["rows"] == [{"fitted": 0.5}] and first["model_version"] == "v1" and calls == ["test-set"]
    assert json.loads(out.read_text())["rows"] == [{"fitted": 0.5}]
    edge_study.headroom_study(tmp_path, out)
    assert len(calls) == 1  # the same served model: read back, not measured again
    served.model_version = "v2"
    edge_study.headroom_study(tmp_path, out)
    assert len(calls) == 2 and json.loads(out.read_text())["model_version"] == "v2"


def test_a_result_file_resumes_only_for_the_same_study(tmp_path):
    """Written as JSON and read back, the study's description still matches: a resume keeps the finished rows."""
    from fairedge.simulations.edge_study import _load, _save, resumable

    study = {"teacher": "runs/t", "per_segment": 32, "corruptions": {"contrast": (0.35, 0.15)}}
    path = tmp_path / "r.json"
    _save(path, {"study": study, "rows": [_row("none", 0, 0.5, 0.0)]})
    assert resumable(_load(path), study)["rows"]
    assert resumable(_load(path), study | {"per_segment": 64}) == {}  # another stream: start afresh
    assert resumable({"study": {"per_segment": 32}}, {"teacher": "self", "per_segment": 32})  # files before --teacher
