"""Packaging: lazy imports, the adapters/ mapping in wheels, the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    return out.stdout.strip()


def test_import_does_not_pull_in_transformers_or_timm():
    code = (
        "import sys, torch, repsim_plugin as rp;"
        "rp.similarity(torch.randn(10, 3), torch.randn(10, 2));"
        "import repsim_plugin.adapters;"
        "print(sorted(m for m in ('transformers', 'timm') if m in sys.modules))"
    )
    assert _python(code) == "[]"


def test_adapters_are_installed_under_the_package():
    assert _python("import repsim_plugin.adapters as a; print(a.__name__)") == "repsim_plugin.adapters"


@pytest.mark.slow
def test_wheel_contains_adapters_as_a_subpackage(tmp_path):
    """Build a wheel from a copy of the sources (no network, no build isolation) and inspect it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("repsim_plugin", "adapters"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("repsim_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "repsim_plugin/adapters/__init__.py" in names
    assert "repsim_plugin/measures/cka.py" in names
    assert not any(n.startswith("adapters/") for n in names)  # no top-level `adapters` package
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "repsim = repsim_plugin.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
