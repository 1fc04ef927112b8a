"""CEMA on a drifting edge stream: no adaptation vs CEMA vs uploading every sample (issue 5, study 1).

    python -m fairedge.simulations.edge_study [--teacher self|centralised|foundation] [--seeds 0 1 2] [--run RUN_DIR]
    python -m fairedge.simulations.edge_study --teacher foundation --tune     # only the seed-0 settings search
    python -m fairedge.simulations.edge_study --headroom     # only `norm_headroom` of the served model

The federated model (`--run`, or by default `simulations/configs/digits.toml` trained here once
and cached as `runs/edge-study-<config hash>/`) is merged, exported to ONNX, and run by the real
edge runtime (`fairedge.client.edge.EdgeRuntime`) against a real CEMA cloud service
(`fairedge.server.cloud.CloudService`) on loopback gRPC with token auth, a fresh state and queue folder
per run. The stream is the task's test images (all six domains the federation trained on)
under corruptions it never trained on, one corruption after another, mild then severe (the
paper streams one ImageNet-C corruption after another): `SEGMENTS`. Each run steps in lockstep
with the cloud (after each batch: uploads acknowledged, every possible update done, the new
parameters swapped in), so a run is deterministic per seed and independent of thread timing.

A seed draws the stream (which test images, their order, the corruption noise) and the
cloud's replay sampling; the trained model is the same for every seed. Per teacher, the TUNING
settings run on seed 0, `chosen_setting` picks one, and every seed runs with it. Two yardsticks
use the true labels (not deployable): `norm_headroom` (what fitted norm parameters gain per
corruption) and `label_oracle` (the same, online, on the stream). The cloud's teacher is the
served model itself (`--teacher self`, the issue's default) or a stronger one trained once and
cached (`trained_teacher`: `centralised` LoRA on the pooled client data, or `foundation`, the
same trained longer with colour-jitter augmentation); each teacher has its own result files.

Writes, in `--out` (default `simulations/results/`), `edge_stream*.json` (every run, per-batch records;
`--headroom`: `norm_headroom.json`, for studies without the self-taught one, which holds it otherwise;
rewritten atomically after every run, so an interrupted study resumes), `edge_stream*.png` (accuracy along
the stream) per teacher, and `edge.md` (all of them; plus a summary of `edge_latency.md` when the latency
benchmark has written it; a brief report when the folder has no self-taught study, e.g. on DINOv2).
The parts: `edge_stream` (the stream), `edge_teachers` (the trained models), `edge_settings` (the settings
search), `edge_lockstep` (one run), `edge_yardsticks` (label yardsticks, cloud speed), `edge_tables`, `edge_plot` and `edge_report` (the outputs; prose in `templates/`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import config_hash, load_config
from fairedge.simulations.edge_lockstep import MODES, export_model, run_stream
from fairedge.simulations.edge_plot import plot
from fairedge.simulations.edge_report import brief_markdown, markdown, study_command
from fairedge.simulations.edge_settings import FIXED, TUNING, chosen_setting, study_settings
from fairedge.simulations.edge_stream import CORRUPTIONS, PER_SEGMENT, SEEDS, SEGMENTS, build_stream
from fairedge.simulations.edge_tables import gain_table, headroom_table, tuning_table
from fairedge.simulations.edge_teachers import TEACHERS, study_config, teacher_run, trained_run
from fairedge.simulations.edge_yardsticks import bench_cloud_updates, label_oracle, norm_headroom, stream_accuracy
from fairedge.simulations.paths import CONFIG, RESULTS, ROOT

HEADROOM = "norm_headroom.json"
"""`--headroom`'s result file in the --out folder: the served model's version and `norm_headroom`'s rows."""

OUTPUTS = {
    "self": "edge_stream",
    "centralised": "edge_stream_centralised-teacher",
    "foundation": "edge_stream_foundation-teacher",
}
"""Result files (.json, .png in the --out folder, default RESULTS) per teacher."""


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data, indent=1, sort_keys=False)


def resumable(data: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    """`data` (a result file's content) if it was written for `study` (same model, teacher and stream), else {}."""
    old = {"teacher": "self"} | data.get("study", {})  # files written before --teacher existed: self-taught
    study = json.loads(json.dumps(study))  # as a file holds it: tuples become lists
    return data if {k: old.get(k) for k in study} == study else {}


def run_study(
    run_dir: Path,
    *,
    seeds: Sequence[int],
    per_segment: int,
    out: Path,
    overrides: Sequence[str] | None = None,
    tune: bool = False,
    teacher: Path | None = None,
    settings: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The seed-0 tuning, then every (seed, mode) run with the chosen setting; rows saved to `out`.

    `overrides`: run the seeds with these settings instead of the TUNING setting `chosen_setting` picks
    (then no tuning runs). `tune`: only the TUNING `settings` (default all) on seed 0.
    `teacher`: the run folder of the cloud's teacher (None: the served model teaches itself).
    A row already in `out` for the same model, teacher, stream and settings is reused, not run again.
    """
    from fairedge.common.edge_model import load_merged_model
    from fairedge.common.task import load_task
    from fairedge.server.cloud import load_served_model

    unknown = sorted(set(settings or []) - TUNING.keys())
    if unknown:
        raise ValueError(f"tuning settings {unknown}: allowed {sorted(TUNING)}")
    onnx_path = export_model(run_dir)
    served = load_served_model(run_dir, teacher=teacher)
    test = load_task(study_settings(run_dir, [])).test
    data = _load(out)
    teacher_info = (
        {"teacher": "self"}
        if teacher is None
        else {
            "teacher": os.path.relpath(teacher, ROOT),
            "teacher_model_version": load_merged_model(teacher).model_version,
        }
    )
    study = {
        "model_version": served.model_version,
        "per_segment": per_segment,
        "segments": [f"{n}-{s}" for n, s in SEGMENTS],
        "corruptions": CORRUPTIONS,
    } | teacher_info
    data = resumable(data, study)
    cfg = load_config(run_dir / "config.toml")
    data.update(
        study=study
        | {
            "run_dir": os.path.relpath(run_dir, ROOT),
            "config_name": cfg.name,
            "config_hash": config_hash(cfg),
            "fixed": FIXED,
        }
    )
    workdir = Path(tempfile.mkdtemp(prefix="edge-study-"))

    def run_jobs(section: str, jobs: Sequence[tuple[str, Sequence[str], int, str]]) -> None:
        rows = data.setdefault(section, [])
        for label, ov, seed, mode in jobs:
            key = {"mode": mode, "seed": seed, "overrides": [] if mode == "none" else list(ov)}
            if any({k: r.get(k) for k in key} == key for r in rows):
                continue
            stream = build_stream(test, seed=seed, per_segment=per_segment)
            row = (
                run_stream(onnx_path, served, study_settings(run_dir, ov), stream, mode, seed, workdir)
                | key
                | {"setting": label}
            )
            rows.append(row)
            data["stream_boundaries"] = stream.boundaries()
            _save(out, data)
            print(
                f"{section}: {label:>12} seed {seed} {mode:>4}: accuracy {row['accuracy']:.4f}  uploaded "
                f"{row['uploaded_fraction']:.3f}  versions {row['params_version']}  {row['seconds']:.0f} s",
                flush=True,
            )

    try:
        if tune or overrides is None:
            run_jobs(
                "tuning",
                [
                    (label, ov, 0, mode)
                    for label, ov in TUNING.items()
                    if label in (settings or TUNING)
                    for mode in MODES
                ],
            )
        if tune:
            return data
        label = "given" if overrides is not None else chosen_setting(data["tuning"])
        if label is None:
            raise ValueError(f"chosen_setting: no TUNING setting with rows for every mode on seed 0 in {out}")
        overrides = list(overrides) if overrides is not None else TUNING[label]
        data["chosen"], data["overrides"] = label, overrides
        # rows of an earlier choice would mix into the per-seed gains
        data["rows"] = [r for r in data.get("rows", []) if r["mode"] == "none" or r["overrides"] == overrides]
        run_jobs("rows", [(label, overrides, seed, mode) for seed in seeds for mode in MODES])
        oracle = data.setdefault("label_oracle", {})
        teacher_acc = data.setdefault("teacher_stream_accuracy", {})
        for seed in seeds:
            if str(seed) not in oracle:
                oracle[str(seed)] = label_oracle(served, build_stream(test, seed=seed, per_segment=per_segment))
            if str(seed) not in teacher_acc:
                teacher_acc[str(seed)] = stream_accuracy(
                    served, build_stream(test, seed=seed, per_segment=per_segment), teacher=True
                )
        if teacher is None and "headroom" not in data:  # a property of the served model: once, in its own file
            data["headroom"] = norm_headroom(served, test)
        stream = build_stream(test, seed=seeds[0], per_segment=per_segment)
        data["cloud_updates_per_s"] = bench_cloud_updates(served, study_settings(run_dir, overrides), stream.x)
        _save(out, data)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return data


def headroom_study(run_dir: Path, out: Path) -> dict[str, Any]:
    """`norm_headroom` of the served model of `run_dir`, saved to `out` (reused while the model is the same)."""
    from fairedge.common.task import load_task
    from fairedge.server.cloud import load_served_model

    served = load_served_model(run_dir)
    data = _load(out)
    if data.get("model_version") != served.model_version or not data.get("rows"):
        test = load_task(study_settings(run_dir, [])).test
        started = time.time()
        data = {
            "model_version": served.model_version,
            "run_dir": os.path.relpath(run_dir, ROOT),
            "rows": norm_headroom(served, test),
            "seconds": time.time() - started,
        }
        _save(out, data)
    return data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a finished run folder (default: train or reuse one)")
    parser.add_argument("--config", default=str(CONFIG), help="config to train when --run is not given")
    parser.add_argument("--method", default="fedit", help="aggregation method to train (default: %(default)s)")
    parser.add_argument(
        "--teacher",
        choices=TEACHERS,
        default="self",
        help="the cloud's teacher: the served model itself, LoRA trained centrally on the "
        "pooled client data, or that trained longer with colour jitter (trained once with --config, cached) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="overrides of the teacher's training config (e.g. federation.rounds=3)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--per-segment", type=int, default=PER_SEGMENT, help="test images per corruption segment (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="SECTION.FIELD=VALUE",
        help="edge/cloud settings for every seed (default: the TUNING setting chosen on seed 0)",
    )
    parser.add_argument("--tune", action="store_true", help="run the TUNING settings on seed 0 only")
    parser.add_argument(
        "--headroom",
        action="store_true",
        help=f"only measure what the served model's norm parameters gain when fitted to the labels ({HEADROOM})",
    )
    parser.add_argument(
        "--out", default=str(RESULTS), help="folder of the result files and edge.md (default: %(default)s)"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="LABEL",
        help=f"with --tune: only these TUNING settings (default: all of {list(TUNING)})",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the whole study: 2 shared cores, and the cloud's learner runs one thread
    started = time.time()
    cfg = study_config(args.config, args.method)
    run_dir = Path(args.run) if args.run else trained_run(cfg)
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    if args.headroom:
        print(headroom_table(headroom_study(run_dir, results / HEADROOM)["rows"]))
        write_report(args.run, results)
        print(f"done in {time.time() - started:.0f} s")
        return
    teacher = teacher_run(
        args.teacher, load_config(args.config, [f"aggregation.method={args.method}", *args.teacher_set])
    )
    out = results / f"{OUTPUTS[args.teacher]}.json"
    data = run_study(
        run_dir,
        seeds=args.seeds,
        per_segment=args.per_segment,
        overrides=args.set,
        out=out,
        tune=args.tune,
        teacher=teacher,
        settings=args.settings,
    )
    data["invocation"] = {  # what the report's regenerate commands need beyond the folder
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "method": args.method,
        "teacher_set": args.teacher_set,
    }
    _save(out, data)
    if args.tune:
        print(tuning_table(data["tuning"]))
    if data.get("rows"):
        plot(
            data["rows"],
            data["stream_boundaries"],
            data["study"]["segments"],
            results / f"{OUTPUTS[args.teacher]}.png",
            title=f"CEMA on a corrupted digits stream ({data['study']['config_name']}, config "
            f"{data['study']['config_hash']}, teacher {args.teacher}, "
            f"seeds {sorted({r['seed'] for r in data['rows']})})",
        )
        print(gain_table(data["rows"]))
    try:
        write_report(args.run, results)
    except Exception as err:
        print(f"edge.md not written: {err!r}")
    print(f"done in {time.time() - started:.0f} s")


def write_report(run: str | None = None, folder: Path = RESULTS) -> Path | None:
    """`folder/edge.md` from every teacher's result file there (None when there is none): the full report with
    the self-taught study, the brief one (`brief_markdown`) without it."""
    results = {t: _load(folder / f"{name}.json") for t, name in OUTPUTS.items()}
    results = {t: d for t, d in results.items() if d.get("rows")}
    if not results:
        return None
    path = folder / "edge.md"
    command = study_command(run, folder, next(iter(results.values())))
    plots = {t: f"{name}.png" for t, name in OUTPUTS.items()}
    if "self" in results:  # the full report: headroom and reading are measured against the self-taught study
        results = {"self": results.pop("self"), **results}
        text = markdown(results, command=command, plots=plots, latency=RESULTS / "edge_latency.md")
    else:
        headroom = _load(folder / HEADROOM)
        versions = {d["study"]["model_version"] for d in results.values()}
        text = brief_markdown(
            results,
            command=command,
            plots=plots,
            headroom=headroom if versions == {headroom.get("model_version")} else {},
        )
    atomic_write_text(path, text)
    return path


if __name__ == "__main__":
    main()
