"""Where the studies read their default config and write their results: folders of the source tree."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: run folders (`runs/`) and paths in reports are relative to it."""
RESULTS = ROOT / "simulations" / "results"
CONFIG = ROOT / "simulations" / "configs" / "digits.toml"


def display(path: str | Path) -> str:
    """`path` relative to the repository root when it is inside it (for reports), else absolute."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
