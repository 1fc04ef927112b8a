"""Silence the root logger around a library call that logs every step at INFO (ONNX Runtime's quantisers,
onnxscript's rewriter): only its errors matter to our callers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_root_logger(level: int = logging.ERROR) -> Iterator[None]:
    """The root logger at `level` inside the block, at its old level after it."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)
