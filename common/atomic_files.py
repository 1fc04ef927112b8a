"""Atomic, durable file writes for run outputs, study results, checkpoints, cloud and edge state.

A reader (or a restart after a crash) sees the old file or the new one, never half of one.

Write to a temporary file in the same folder, fsync it, rename it over the target,
then fsync the folder so the rename itself survives a power cut. Everything a run or a
study writes goes through here: bytes, text, JSON, a matplotlib figure, a whole folder
(a PEFT adapter, a trained run). Serialisers that produce bytes (safetensors, `torch.save`
into a buffer) hand them to `atomic_write_bytes`; this module imports neither torch nor
matplotlib, so the edge runtime can use it.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Replace `path` with `obj` as indented JSON (and a final newline), atomically and durably.

    The whole document is serialised before anything touches the disk, so an object that cannot be
    written as JSON leaves the old file as it was.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_save_figure(path: Path, figure: Any, **savefig: Any) -> None:
    """Save a matplotlib figure to `path` atomically; the format is the file's suffix (`.png`, `.svg`, ...)."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"figure path {path}: needs a suffix that names the format (.png, .svg, .pdf)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix[1:], **savefig)
    atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Fill a temporary sibling folder, then put it in place of `path` when the block ends without error.

    For writers that make a whole folder (PEFT's `save_pretrained`, a training run): a reader sees the
    old folder or the complete new one. A failed block removes the temporary folder and leaves `path`
    as it was; a crash leaves a `.<name>.*.tmp` folder that `remove_stale_temps` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_folder(path)
    try:
        yield tmp
        old = None
        if path.exists():
            old = _new_temp_folder(path)
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_temp_folder(path: Path) -> Path:
    """An empty `.<name>.<random>.tmp` folder next to `path` (made with `mkdir`, so the umask applies)."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    return tmp


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, deletions) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files and folders left by a write that was interrupted."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
