"""pytest-cpr works when pip-installed from a wheel, not only from a checkout: the wheel holds the
image recipes, and `cpr-image path guest` run from a fresh virtualenv outside the checkout names the
same cached image as the checkout does (same recipe, same hash)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "pytest_cpr", "images")


def run(*argv: str | Path, cwd: Path) -> str:
    out = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{argv}: {out.stdout}{out.stderr}"
    return out.stdout


def build_isolation() -> list[str]:
    """Build with the test environment's setuptools when it is new enough (no download)."""
    try:
        import setuptools
    except ImportError:
        return []
    return ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *build_isolation(), "-w", out, src, cwd=src)
    (built,) = out.glob("pytest_cpr-*.whl")
    return built


def test_the_wheel_holds_every_image_recipe_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"pytest_cpr/recipes/{p.relative_to(ROOT / 'images').as_posix()}"
               for p in (ROOT / "images").rglob("*") if p.is_file()}
    assert recipes and recipes <= names, sorted(recipes - names)
    assert "pytest_cpr/py.typed" in names


def test_cpr_image_path_works_from_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel,
        cwd=tmp_path)
    installed = run(venv / "bin" / "python", "-c", "import pytest_cpr.images as i; print(i.REPO_IMAGES)",
                    cwd=tmp_path).strip()
    assert installed.startswith(str(venv)) and installed.endswith("pytest_cpr/recipes"), installed
    from_wheel = run(venv / "bin" / "cpr-image", "path", "guest", cwd=tmp_path).strip()
    from_checkout = run(sys.executable, "-m", "pytest_cpr.images", "path", "guest", cwd=ROOT).strip()
    assert from_wheel == from_checkout, "the wheel's recipe must hash like the checkout's"
