"""pytest-cpr works when pip-installed from a wheel, not only from a checkout: the wheel holds the
image recipes, and `cpr-image path guest` run from a fresh virtualenv outside the checkout names the
same cached image as the checkout does (same recipe, same hash). The wheel and the virtualenvs come
from tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Venv  # tests/conftest.py, whose fixtures make it

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_image_recipe_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"pytest_cpr/recipes/{p.relative_to(ROOT / 'images').as_posix()}"
               for p in (ROOT / "images").rglob("*") if p.is_file()}
    assert recipes and recipes <= names, sorted(recipes - names)
    assert "pytest_cpr/py.typed" in names
    # the C pieces built where they run: the ioctl fault shim and the TCG plugin
    assert {"pytest_cpr/qemu/ioctl_fault.c", "pytest_cpr/qemu/tcg_discon.c"} <= names, sorted(names)


def test_cpr_image_path_works_from_a_fresh_virtualenv(wheel_venv: Callable[..., Venv], tmp_path: Path) -> None:
    venv = wheel_venv(tmp_path / "venv")
    installed = venv.run("python", "-c", "import pytest_cpr.images as i; print(i.REPO_IMAGES)",
                         cwd=tmp_path).strip()
    assert installed.startswith(str(venv.root)) and installed.endswith("pytest_cpr/recipes"), installed
    from_wheel = venv.run("cpr-image", "path", "guest", cwd=tmp_path).strip()
    from_checkout = subprocess.run([sys.executable, "-m", "pytest_cpr.images", "path", "guest"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=300, check=True).stdout.strip()
    assert from_wheel == from_checkout, "the wheel's recipe must hash like the checkout's"
