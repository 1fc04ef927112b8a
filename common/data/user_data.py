"""Load a user's own labelled data into a `TaskData`.

Three formats cover most cases: a folder of class sub-folders of images, a dataset saved
with Hugging Face `datasets`, and a CSV/JSONL table of `text,label` rows. Every loader
fails early with a message that says what it expected, because a bad path or column is
the most common mistake and would otherwise surface deep inside training.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fairedge.common.data.task_data import LabeledData, TaskData, stratified_split
from fairedge.common.pixels import IMAGE_SUFFIXES, image_pixels, normalize_pixels

__all__ = ["IMAGE_SUFFIXES", "load_hf_image_dataset", "load_image_folder", "load_text_table"]


def load_image_folder(
    path: str | Path,
    *,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """`path/<class name>/<image>`: one sub-folder per class; split stratified by class."""
    root = _existing(path, test_fraction)
    _check_channels(channels)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected one sub-folder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    images: list[np.ndarray] = []
    labels: list[int] = []
    classes: list[str] = []
    for class_dir in class_dirs:
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            continue  # a stray folder without images is not a class
        for f in files:
            with Image.open(f) as img:
                images.append(image_pixels(img, image_size, image_size, channels))
        labels += [len(classes)] * len(files)
        classes.append(class_dir.name)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in the class sub-folders of {root}")
    _check_classes(classes, root)
    data = LabeledData(
        x=torch.from_numpy(normalize_pixels(np.stack(images))),
        y=torch.tensor(labels, dtype=torch.int64),
        domain=torch.zeros(len(labels), dtype=torch.int64),
    )
    train, test = stratified_split(data.y, test_fraction, seed)
    return TaskData(data.subset(train), data.subset(test), classes, ["all"], "all", "image")


def load_hf_image_dataset(
    path: str | Path,
    *,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
) -> TaskData:
    """A `Dataset`/`DatasetDict` saved with `save_to_disk`; its "train"/"test" splits are kept.

    Class names come from a `ClassLabel` feature, else from the sorted unique labels. An
    optional `domain` column gives the domains (the first sorted one is `source_domain`).
    """
    # Imported here: `datasets` takes over a second to import and most runs never need it.
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

    root = _existing(path, test_fraction)
    _check_channels(channels)
    loaded = load_from_disk(str(root))
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{root} holds splits {list(loaded)}; expected a 'train' split (and optionally 'test')")
        parts = [loaded["train"]] + ([loaded["test"]] if "test" in loaded else [])
    else:
        assert isinstance(loaded, Dataset)
        parts = [loaded]
    for column in (image_column, label_column):
        if column not in parts[0].column_names:
            raise ValueError(f"{root} has no {column!r} column; columns are {parts[0].column_names}")
    whole = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(whole) == 0:
        raise ValueError(f"{root} holds no rows")

    classes, y = _encode_column(whole.features[label_column], whole[label_column])
    _check_classes(classes, root)
    if "domain" in whole.column_names:
        domains, domain = _encode_column(whole.features["domain"], whole["domain"])
    else:
        domains, domain = ["all"], torch.zeros(len(y), dtype=torch.int64)
    pixels = [image_pixels(_as_image(v), image_size, image_size, channels) for v in whole[image_column]]
    data = LabeledData(x=torch.from_numpy(normalize_pixels(np.stack(pixels))), y=y, domain=domain)

    if len(parts) == 2:
        n_train = len(parts[0])
        train, test = np.arange(n_train), np.arange(n_train, len(whole))
    else:
        train, test = stratified_split(data.y, test_fraction, seed)
    return TaskData(data.subset(train), data.subset(test), classes, domains, domains[0], "image")


def load_text_table(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """A `.csv`, `.jsonl` or `.json` table with `text` and `label` (and optional `domain`) columns."""
    root = _existing(path, test_fraction)
    rows = _read_rows(root)
    if not rows:
        raise ValueError(f"{root} has no rows; expected one row per example with 'text' and 'label'")
    for column in ("text", "label"):
        missing = [i for i, row in enumerate(rows) if row.get(column) is None]
        if missing:
            raise ValueError(
                f"{root}: row {missing[0]} has no {column!r} value (columns of the first row: {sorted(rows[0])}); "
                "expected columns text,label[,domain]"
            )
    classes, y = _encode([row["label"] for row in rows])
    _check_classes(classes, root)
    if all("domain" in row for row in rows):
        domains, domain = _encode([row["domain"] for row in rows])
    else:
        domains, domain = ["all"], torch.zeros(len(rows), dtype=torch.int64)
    data = LabeledData(x=[str(row["text"]) for row in rows], y=y, domain=domain)
    train, test = stratified_split(data.y, test_fraction, seed)
    return TaskData(data.subset(train), data.subset(test), classes, domains, domains[0], "text")


def _existing(path: str | Path, test_fraction: float) -> Path:
    """Check the arguments every loader shares before any file is read."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(path)
    if not root.exists():  # checked here, where the data is read, not when a config is validated
        raise FileNotFoundError(f"data.path {str(root)!r} does not exist on this machine")
    return root


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _check_classes(classes: Sequence[str], where: Path) -> None:
    if len(classes) < 2:
        raise ValueError(
            f"{where} has {len(classes)} class(es) {list(classes)}; a classification task needs at least 2"
        )


def _encode(values: Sequence[Any]) -> tuple[list[str], torch.Tensor]:
    """Values -> (sorted names as strings, int64 ids); numbers and numeric strings sort numerically."""
    names = sorted({str(v) for v in values}, key=lambda s: (0, float(s), s) if _is_number(s) else (1, 0.0, s))
    lookup = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([lookup[str(v)] for v in values], dtype=torch.int64)


def _encode_column(feature: Any, values: Sequence[Any]) -> tuple[list[str], torch.Tensor]:
    """Like `_encode`, but a `datasets.ClassLabel` column keeps its own names and ids."""
    from datasets import ClassLabel

    if isinstance(feature, ClassLabel):
        return list(feature.names), torch.tensor(values, dtype=torch.int64)
    return _encode(values)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _as_image(value: Any) -> Image.Image:
    """A decoded `datasets.Image` is already PIL; arrays and nested lists are converted."""
    if isinstance(value, Image.Image):
        return value
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: every JSON record must be an object with 'text' and 'label'")
        return rows
    raise ValueError(f"{path}: unsupported table format {suffix!r}; expected .csv, .jsonl or .json")
