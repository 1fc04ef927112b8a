"""Where a device's samples come from: a folder, a dataset file, or any Python iterable.

Every source yields `StreamBatch`es of raw samples (images as float arrays `(n, C, H, W)` on the
tasks' pixel scale, or texts) with optional integer labels, for accuracy bookkeeping only: labels
never leave the device. `fairedge.common.edge_format.model_inputs` turns raw samples into model feeds
(tokenizing texts), so the edge prepares inputs exactly as the export and the cloud do.

Formats:
- folder: image files (PNG, JPEG, ... via Pillow) or `.npy` files (one sample each), sorted by
  path; files in a sub-folder named like one of the model's labels get that label.
- `.npz`: `x` (images `(N, C, H, W)` or a string array of texts) and optionally `y` (int labels).
- `.csv` / `.jsonl`: a `text` column and optionally `label` (a label name or id), for text models.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fairedge.common.edge_format import EdgeModelInfo
from fairedge.common.pixels import IMAGE_SUFFIXES, image_pixels, normalize_pixels


@dataclass(frozen=True)
class StreamBatch:
    """Raw samples and, if known, their labels (int class ids)."""

    x: np.ndarray | list[str]
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)


def as_stream_batch(item: Any) -> StreamBatch:
    """Accept a StreamBatch, an `(x, y)` pair, or a bare batch `x` (an array or a list of strings)."""
    if isinstance(item, StreamBatch):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        x, y = item
        return StreamBatch(_batch_x(x), None if y is None else np.asarray(y, dtype=np.int64).reshape(-1))
    return StreamBatch(_batch_x(item))


def _batch_x(x: Any) -> np.ndarray | list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, list) and all(isinstance(t, str) for t in x):
        return x
    if hasattr(x, "detach"):  # a torch tensor, e.g. LabeledData.x
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def batched(samples: Iterable[Any], batch_size: int) -> Iterator[StreamBatch]:
    """Group single samples (an array, a string, or a `(sample, label)` pair) into batches."""
    it = iter(samples)
    while chunk := list(islice(it, batch_size)):
        pairs = [s if isinstance(s, tuple) else (s, None) for s in chunk]
        xs = [p[0] for p in pairs]
        labels = [p[1] for p in pairs]
        x = xs if all(isinstance(v, str) for v in xs) else np.stack([np.asarray(v) for v in xs])
        y = None if any(v is None for v in labels) else np.asarray(labels, dtype=np.int64)
        yield StreamBatch(x, y)


def open_stream(path: str | Path, info: EdgeModelInfo, batch_size: int) -> Iterator[StreamBatch]:
    """The samples at `path` (folder, .npz, .csv/.jsonl), in batches of `batch_size`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    if path.is_dir():
        return batched(_folder_samples(path, info), batch_size)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz_batches(path, batch_size)
    if suffix in (".csv", ".jsonl"):
        if info.task != "text":
            raise ValueError(f"{path}: a text table is input for a text model, this model takes {info.task}s")
        return batched(_table_samples(path, info), batch_size)
    raise ValueError(f"--input {str(path)!r}: expected a folder, a .npz file or a .csv/.jsonl table")


def _npz_batches(path: Path, batch_size: int) -> Iterator[StreamBatch]:
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data.files:
            raise ValueError(f"{path}: no array 'x' (arrays: {data.files}); expected x[, y]")
        x = data["x"]
        y = data["y"].astype(np.int64) if "y" in data.files else None
    if y is not None and len(y) != len(x):
        raise ValueError(f"{path}: x has {len(x)} samples, y has {len(y)}")
    is_text = x.dtype.kind == "U"
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        yield StreamBatch([str(t) for t in xb] if is_text else xb, None if y is None else y[start : start + batch_size])


def _folder_samples(root: Path, info: EdgeModelInfo) -> Iterator[tuple[np.ndarray, int | None]]:
    if info.task != "image":
        raise ValueError(f"{root}: a folder of images or .npy files is input for an image model, not {info.task}")
    spec = info.inputs[0]
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))
    if not files:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) or .npy files")
    label_ids = {name: i for i, name in enumerate(info.labels)}
    for f in files:
        parent = f.parent.name if f.parent != root else None
        label = label_ids.get(parent) if parent is not None else None
        if f.suffix.lower() == ".npy":
            sample = np.load(f, allow_pickle=False).astype(np.float32)
            if sample.shape != spec.shape:
                raise ValueError(f"{f}: shape {sample.shape}, the model takes {spec.shape} (C, H, W) per sample")
        else:
            sample = read_image(f, spec.shape)
        yield sample, label


def read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An image file -> float32 (C, H, W) on the tasks' pixel scale, read exactly as training reads images."""
    channels, height, width = shape
    with Image.open(path) as img:
        return normalize_pixels(image_pixels(img, height, width, channels))


def _table_samples(path: Path, info: EdgeModelInfo) -> Iterator[tuple[str, int | None]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    label_ids = {name: i for i, name in enumerate(info.labels)}
    for i, row in enumerate(rows):
        if row.get("text") is None:
            raise ValueError(f"{path}: row {i} has no 'text' value; expected columns text[,label]")
        label = row.get("label")
        if label is not None and str(label) not in label_ids:
            raise ValueError(f"{path}: row {i} has label {label!r}, the model's labels are {info.labels[:10]}")
        yield str(row["text"]), None if label is None else label_ids[str(label)]
