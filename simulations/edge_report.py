"""`edge.md`: the edge study's report, from every teacher's result file.

The numbers and tables come from here and `edge_tables`; the prose is the template
`templates/edge.md.j2` (one section per teacher: `edge_teacher.md.j2`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from pathlib import Path
from typing import Any

from fairedge.common.config import config_hash, load_config
from fairedge.simulations.edge_settings import study_settings
from fairedge.simulations.edge_stream import PER_SEGMENT, SEEDS, STREAM_CORRUPTIONS
from fairedge.simulations.edge_tables import (
    gain_table,
    gains,
    headroom_table,
    latency_summary,
    mode_table,
    segment_table,
    summary_table,
    target_misses,
    tuning_table,
)
from fairedge.simulations.edge_teachers import (
    FOUNDATION_TRAINING,
    JITTER_BRIGHTNESS,
    JITTER_CONTRAST,
    JITTER_COPIES,
    TEACHERS,
)
from fairedge.simulations.paths import CONFIG, RESULTS, ROOT
from fairedge.simulations.report import macro, render

FOUNDATION = {
    "training": FOUNDATION_TRAINING,
    "copies": JITTER_COPIES,
    "contrast": JITTER_CONTRAST,
    "brightness": JITTER_BRIGHTNESS,
}
"""How the foundation teacher was trained, for the text that describes it."""


def target_values(g: dict[int, dict[str, float]]) -> dict[str, Any] | None:
    """Whether the issue's target is met (`target_misses`) and the figures its paragraph gives."""
    if not g:
        return None
    upload = statistics.mean(v["uploaded_cema"] for v in g.values())
    ratios = [v["gain_ratio"] for v in g.values()]
    ratio = statistics.mean(ratios)  # nan when uploading everything did not help on some seed
    misses = target_misses(g)
    lost = misses["lost"]
    mean_all = statistics.mean(v["gain_all"] for v in g.values())
    return {
        "met": not any(misses.values()),
        "short": misses["short"],
        "over": misses["over"],
        "upload": upload,
        "ratio": ratio,
        "ratios": ratios,
        "mean_ratio": statistics.mean(v["gain_cema"] for v in g.values()) / mean_all if mean_all > 0 else math.nan,
        "lost": lost,
        "lost_points": [100 * g[s]["gain_all"] for s in lost],
    }


def target_line(g: dict[int, dict[str, float]]) -> str:
    """The target paragraph of a teacher's section (empty without complete seeds)."""
    values = target_values(g)
    return macro("edge_macros.md.j2", "target", values) + "\n" if values else ""


def study_command(run: str | None, folder: Path, data: dict[str, Any]) -> str:
    """The command that reruns the studies in `folder` (`--teacher T` and its own options follow): the served
    run, or the config and method that train it (recorded in a result file's `invocation`), the stream's
    length, the seeds and the folder. `data`: one of the folder's result files."""
    invocation = data.get("invocation", {})
    parts = ["python", "-m", "fairedge.simulations.edge_study"]
    if run:
        parts += ["--run", run]
    if invocation.get("config") not in (None, os.path.relpath(CONFIG, ROOT)):
        parts += ["--config", invocation["config"]]
    if invocation.get("method") not in (None, "fedit"):
        parts += ["--method", invocation["method"]]
    if data["study"]["per_segment"] != PER_SEGMENT:
        parts += ["--per-segment", str(data["study"]["per_segment"])]
    seeds = sorted({r["seed"] for r in data.get("rows", [])})
    if seeds and seeds != list(SEEDS):
        parts += ["--seeds", *map(str, seeds)]
    if folder.resolve() != RESULTS.resolve():
        parts += ["--out", os.path.relpath(folder, ROOT)]
    return shlex.join(parts)


def teacher_options(teacher: str, data: dict[str, Any]) -> str:
    """`--teacher T` plus the options this teacher's study ran with: its `--teacher-set` and a given `--set`."""
    parts = ["--teacher", teacher]
    for item in data.get("invocation", {}).get("teacher_set", []):
        parts += ["--teacher-set", item]
    if data.get("chosen") == "given":
        for item in data.get("overrides", []):
            parts += ["--set", item]
    return shlex.join(parts)


def teacher_section(teacher: str, data: dict[str, Any], *, command: str, plot_name: str) -> str:
    """The section of `edge.md` for one teacher: its chosen setting, per-seed and per-mode tables, plot, tuning."""
    study, rows = data["study"], data.get("rows", [])
    t_acc = data.get("teacher_stream_accuracy", {})
    origin = (
        ""
        if study["teacher"] == "self"
        else (
            f"`{study['teacher']}` (model version `{study.get('teacher_model_version', '?')}`, config "
            f"`{_teacher_hash(study['teacher'])}`; {_lora_text(study['teacher'])}; "
            f"{_federated_accuracy(study['teacher'])})"
        )
    )
    return render(
        "edge_teacher.md.j2",
        teacher=teacher,
        command=command,
        foundation=FOUNDATION,
        origin=origin,
        teacher_accuracy=t_acc,
        teacher_mean=statistics.mean(t_acc.values()) if t_acc else None,
        chosen=data.get("chosen"),
        overrides=data.get("overrides", []),
        gain_table=gain_table(rows),
        target_values=target_values(gains(rows)),
        mode_table=mode_table(rows),
        segment_table=segment_table(rows, study["segments"]),
        plot_name=plot_name,
        tuning_table=tuning_table(data["tuning"], data.get("chosen")) if data.get("tuning") else "",
    )


def markdown(
    results: dict[str, dict[str, Any]], *, command: str, plots: dict[str, str], latency: Path | None = None
) -> str:
    """`edge.md`: setup, headroom, a summary over teachers, one section per teacher, reading, speed.

    `results` maps teacher to its result file's data (the self-taught study first); `plots` teacher
    to the file name of its plot.
    """
    data = results["self"]
    g_self = gains(data.get("rows", []))
    return render(
        "edge.md.j2",
        **_setup_values(results, command=command, plots=plots),
        all_teachers=TEACHERS,
        teachers=[t for t in TEACHERS if t in results],
        foundation=FOUNDATION,
        seeds=sorted({r["seed"] for r in data.get("rows", [])}),
        headroom_table=headroom_table(data["headroom"]) if data.get("headroom") else "",
        oracle=[
            (seed, acc, 100 * (acc - g_self[int(seed)]["acc_none"]))
            for seed, acc in data.get("label_oracle", {}).items()
            if int(seed) in g_self
        ],
        reading=_reading(results),
        e_max=_e_max_reading(results.get("foundation", {}).get("tuning", [])),
        bench=data.get("cloud_updates_per_s"),
        latency=latency_summary(latency.read_text()) if latency is not None and latency.is_file() else "",
    )


def brief_markdown(
    results: dict[str, dict[str, Any]], *, command: str, plots: dict[str, str], headroom: dict[str, Any] | None = None
) -> str:
    """`edge.md` of a study run without the self-taught baseline (e.g. on the DINOv2 backbone): setup read from
    the served run's and the teachers' own configs, the summary over teachers, one section per teacher;
    `headroom`: the `--headroom` result for the same served model, when there is one."""
    first = next(iter(results.values()))
    return render(
        "edge_brief.md.j2",
        **_setup_values(results, command=command, plots=plots),
        lora=_lora_text(first["study"]["run_dir"]),
        seeds=sorted({r["seed"] for d in results.values() for r in d.get("rows", [])}),
        oracle=_oracle(first),
        headroom_table=headroom_table(headroom["rows"]) if headroom and headroom.get("rows") else "",
        headroom_minutes=(headroom or {}).get("seconds", 0) / 60,
    )


def _oracle(data: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """Per seed: `label_oracle`'s accuracy, its gain over no adaptation and the gain of uploading everything (pts)."""
    g = gains(data.get("rows", []))
    return [
        (seed, acc, 100 * (acc - g[int(seed)]["acc_none"]), 100 * (g[int(seed)]["acc_all"] - g[int(seed)]["acc_none"]))
        for seed, acc in data.get("label_oracle", {}).items()
        if int(seed) in g
    ]


def _setup_values(results: dict[str, dict[str, Any]], *, command: str, plots: dict[str, str]) -> dict[str, Any]:
    """What both reports show: the served run (from the first teacher's study), stream, time, summary, sections."""
    study = next(iter(results.values()))["study"]
    return {
        "command": command,
        "study": study,
        "cfg": study_settings(ROOT / study["run_dir"], []),
        "federated_accuracy": _federated_accuracy(study["run_dir"]),
        "train_minutes": _training_minutes(study["run_dir"]),
        "corruptions": "; ".join(
            f"{n} {v[0]} / {v[1]}" for n, v in study["corruptions"].items() if n in STREAM_CORRUPTIONS
        ),
        "runtime": [
            (t, len(d.get("rows", [])) + len(d.get("tuning", [])), sum(_seconds(d)) / 60) for t, d in results.items()
        ],
        "summary_table": summary_table(results),
        "teacher_sections": [
            teacher_section(t, d, command=f"{command} {teacher_options(t, d)}", plot_name=plots[t])
            for t, d in results.items()
            if d.get("rows")
        ],
    }


def _lora_text(run_dir: str) -> str:
    """How a run folder's model was adapted: LoRA rank, targets and blocks (from its config.toml)."""
    path = ROOT / run_dir / "config.toml"
    if not path.is_file():
        return "LoRA unknown"
    lora = load_config(path).lora
    blocks = f"top {lora.top_layers} blocks" if lora.top_layers else "every block"
    targets = ", ".join(lora.target_modules) if lora.target_modules else "the default attention targets"
    return f"LoRA r{lora.rank} on {targets}, {blocks}"


def _seconds(data: dict[str, Any]) -> list[float]:
    return [r["seconds"] for r in data.get("rows", []) + data.get("tuning", [])]


def _metrics(run_dir: str) -> dict[str, Any] | None:
    """The summary of a run folder's metrics.json (None when the folder is not on this machine)."""
    path = ROOT / run_dir / "metrics.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else None


def _teacher_hash(run_dir: str) -> str:
    """The config hash of a teacher's run folder (its cache key)."""
    path = ROOT / run_dir / "config.toml"
    return config_hash(load_config(path)) if path.is_file() else "?"


def _federated_accuracy(run_dir: str) -> str:
    """The trained model's own mean test accuracy over the uncorrupted domains, from its metrics.json."""
    acc = (_metrics(run_dir) or {}).get("final_mean_accuracy")
    return f"mean accuracy {acc:.3f} on the uncorrupted test domains" if acc is not None else "accuracy unknown"


def _training_minutes(run_dir: str) -> float | None:
    seconds = (_metrics(run_dir) or {}).get("wall_seconds")
    return seconds / 60 if seconds else None


def _reading(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per teacher: its accuracy on the stream, the served model's, and the mean gains (points)."""
    out = []
    for teacher, data in results.items():
        g = gains(data.get("rows", []))
        if not g:
            continue
        out.append(
            {
                "teacher": teacher,
                "teacher_accuracy": statistics.mean(data.get("teacher_stream_accuracy", {"-": math.nan}).values()),
                "served": statistics.mean(v["acc_none"] for v in g.values()),
                "gain_cema": 100 * statistics.mean(v["gain_cema"] for v in g.values()),
                "gain_all": 100 * statistics.mean(v["gain_all"] for v in g.values()),
                "wins": sum(v["gain_all"] > 0 for v in g.values()),
                "seeds": len(g),
            }
        )
    return out


def _e_max_reading(tuning: list[dict[str, Any]]) -> dict[str, float] | None:
    """Seed 0 with the foundation teacher: CEMA's uploads and gain with E_max 0.4 and 0.7 ln C (None if not run)."""
    none = next((r["accuracy"] for r in tuning if r["mode"] == "none"), None)
    by = {(r["setting"], r["mode"]): r for r in tuning}
    narrow, wide = by.get(("KL, frozen teacher", "cema")), by.get(("KL, frozen teacher, E_max 0.7", "cema"))
    if none is None or narrow is None or wide is None:
        return None
    return {
        "narrow_uploaded": narrow["uploaded_fraction"],
        "narrow_gain": 100 * (narrow["accuracy"] - none),
        "wide_uploaded": wide["uploaded_fraction"],
        "wide_gain": 100 * (wide["accuracy"] - none),
    }
