"""ci/bootstrap.sh builds the guest image with the system python3 while pip installs the plugin into
.venv: pytest_cpr.images must run from the checkout with the standard library alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_command_runs_on_the_base_python_without_the_virtualenv(tmp_path: Path) -> None:
    base = Path(sys.base_prefix) / "bin" / "python3"
    env = {"PATH": os.environ.get("PATH", ""), "CPR_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([str(base), "-s", "-m", "pytest_cpr.images", "path", "guest"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{tmp_path}/images/guest-"), out.stdout
