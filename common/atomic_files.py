"""Atomic, durable file writes for run outputs, checkpoints, cloud and edge state.

A reader (or a restart after a crash) sees the old file or the new one, never half of one.

Write to a temporary file in the same folder, fsync it, rename it over the target,
then fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
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


def atomic_write_json(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON, atomically and durably."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


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
    """Delete temporary files left by a write that was interrupted."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
