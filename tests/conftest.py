"""Shared by the whole test tree: pytester, and pytest-cpr as a user gets it, a wheel built once per
session and installed into fresh virtualenvs outside the checkout (tests/unit/test_wheel.py,
tests/integration/test_wheel_user_project.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
WHEEL_SOURCES = ("pyproject.toml", "README.md", "pytest_cpr", "images")


def run(*argv: str | Path, cwd: Path) -> str:
    """Run a command to completion; its stdout, or a failure that shows everything it printed."""
    out = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{argv}: {out.stdout}{out.stderr}"
    return out.stdout


def _build_isolation() -> list[str]:
    """Build with the test environment's setuptools when it is new enough (no download)."""
    try:
        import setuptools
    except ImportError:
        return []
    return ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []


@dataclass(frozen=True)
class Venv:
    """A virtualenv made by the `wheel_venv` fixture, with pytest-cpr installed from the wheel."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, program: str, *args: str | Path, cwd: Path) -> str:
        """Run one of the venv's programs (python, cpr-image, ...) to completion; its stdout."""
        return run(self.root / "bin" / program, *args, cwd=cwd)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in WHEEL_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_build_isolation(), "-w", out, src, cwd=src)
    (built,) = out.glob("pytest_cpr-*.whl")
    return built


@pytest.fixture
def wheel_venv(wheel: Path) -> Callable[..., Venv]:
    """Make a fresh virtualenv at a path (outside the checkout) with the wheel installed:
    `wheel_venv(tmp_path / "venv", dependencies=True)` also installs its dependencies (pip, from the
    package index as a user would); without, only pytest-cpr itself (quick, no index needed)."""

    def make(root: Path, dependencies: bool = False) -> Venv:
        run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent)
        no_deps = [] if dependencies else ["--no-deps"]
        run(sys.executable, "-m", "pip", "--python", root / "bin" / "python", "install", "-q", *no_deps, wheel,
            cwd=root.parent)
        return Venv(root)

    return make
