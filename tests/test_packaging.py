"""The installed package: one `fairedge` namespace, every package folder listed, entry points that resolve."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ROLES = ("common", "server", "client", "simulations")


def test_every_package_folder_is_listed_for_setuptools():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        "fairedge." + ".".join(init.parent.relative_to(ROOT).parts)
        for role in ROLES
        for init in (ROOT / role).rglob("__init__.py")
    }
    data_only = {"fairedge.simulations.configs", "fairedge.simulations.templates"}  # folders of data files
    on_disk |= {p for p in data_only if (ROOT / p.removeprefix("fairedge.").replace(".", "/")).is_dir()}
    assert on_disk == listed, f"missing from pyproject: {on_disk - listed}; listed but absent: {listed - on_disk}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {f"fairedge.{r}": r for r in ROLES}


def test_only_the_fairedge_namespace_is_importable(tmp_path):
    """Outside the checkout, the generic folder names are not top-level packages."""
    code = (
        "import importlib.util, fairedge.common.config, fairedge.server, fairedge.client, fairedge.simulations\n"
        f"print([n for n in {ROLES!r} if importlib.util.find_spec(n) is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _resolve(target: str) -> None:
    module, _, attr = target.partition(":")
    code = f"import importlib; m = importlib.import_module({module!r}); assert callable(getattr(m, {attr!r})) or getattr(m, {attr!r}) is not None"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.slow
def test_console_scripts_and_flower_components_point_at_fairedge_modules():
    scripts = PYPROJECT["project"]["scripts"]
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    targets = [*scripts.values(), *components.values()]
    assert set(scripts) == {"fairedge-sim", "fairedge-server", "fairedge-edge"}
    for target in targets:
        assert target.startswith("fairedge."), target
    # importing resolves each entry point (the Flower apps build their objects at import)
    for target in targets:
        _resolve(target)
