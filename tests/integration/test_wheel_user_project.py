"""pytest-cpr as a user meets it: the wheel (tests/conftest.py) and its dependencies pip-installed into a
fresh virtualenv outside the checkout, and a small test project of the user's own (its conftest.py
with a fixture over `cpr_vm`, a pytest.ini with the user's settings, one transfer test written like
README's "Writing tests") run with that virtualenv's pytest. A real guest boots (TCG or KVM) and
goes through one cpr-transfer; the run passes, reports the transfer in its JUnit XML and leaves
nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_cpr import leftovers
from pytest_cpr.images import GuestImage
from pytest_cpr.settings import BY_KEY, CprSettings

if TYPE_CHECKING:
    from conftest import Venv  # tests/conftest.py, whose fixtures make it

pytestmark = pytest.mark.timeout(900)

RUN_TIMEOUT = 600  # seconds for the user's pytest run (one boot and one transfer; ~30 s under TCG)
# the settings that name the QEMU builds and the guest image: the user's run gets the suite's own
PASSED_SETTINGS = ("qemu", "target_qemu", "accel", "image", "user_image", "cache_dir")

USER_CONFTEST = '''
import pytest


def pytest_report_header(config):
    return "my-cpr-project: user conftest loaded"


@pytest.fixture
def marked_guest(cpr_vm):
    """A booted guest with a file written before any transfer: the same guest must still have it after."""
    cpr_vm.run("echo written-before-transfer > /tmp/user-mark")
    return cpr_vm
'''

USER_INI = """
[pytest]
addopts = -ra --strict-markers --strict-config
timeout = 600
cpr_artifacts = out/cpr
cpr_keep_artifacts = always
"""

USER_TEST = '''
import pytest
from pytest_cpr import checks


@pytest.mark.cpr(mode="cpr-transfer")
def test_live_update(marked_guest, cpr_thresholds):
    with marked_guest.traffic() as traffic:
        result = marked_guest.live_update(traffic, **cpr_thresholds)
    checks.assert_stream_intact(traffic.stream_result)
    checks.assert_clean_dmesg(marked_guest.collect_dmesg())
    assert result.status == "completed"
    assert marked_guest.run("cat /tmp/user-mark").stdout.strip() == "written-before-transfer"
'''


def _user_project(path: Path) -> Path:
    path.mkdir()
    (path / "conftest.py").write_text(USER_CONFTEST)
    (path / "pytest.ini").write_text(USER_INI)
    (path / "tests").mkdir()
    (path / "tests" / "test_live_update.py").write_text(USER_TEST)
    return path


def _user_env(settings: CprSettings, state: Path) -> dict[str, str]:
    """The caller's environment without anything that points at the checkout or at the suite's own
    run (HOME stays: the image cache is under it), with the QEMU and image settings the suite was
    given (its defaults are the user's too) and a private registry of what the run starts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CPR_", "PYTEST_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for key in PASSED_SETTINGS:
        if settings.source[key] != "default" and (value := settings.value(key)) is not None:
            env[BY_KEY[key].env] = str(value)
    env["CPR_STATE_DIR"] = str(state)
    return env


def _run_pytest(venv: Venv, project: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """The venv's pytest in the project; a hung run is interrupted (SIGINT: the plugin cleans up)."""
    proc = subprocess.Popen([str(venv.python), "-m", "pytest", *args], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the user project's pytest run hung for {RUN_TIMEOUT}s (interrupted):\n{out[-4000:]}")
    return proc.returncode, out


def _processes_naming(text: str) -> list[str]:
    """Processes whose command line or environment names `text` (QEMU inherits the run's environment)."""
    found = []
    for p in leftovers.processes():
        try:
            environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        except OSError:
            environ = b""
        if p.pid != os.getpid() and p.state != "Z" and text.encode() in p.cmdline + environ:
            found.append(f"{p.pid} {p.cmdline[:120]!r}")
    return found


def test_user_project_runs_a_transfer_from_a_wheel_install(
        cpr_image: GuestImage | None, cpr_settings: CprSettings, wheel_venv: Callable[..., Venv],
        tmp_path: Path) -> None:
    """The user's project passes from the wheel's virtualenv: its conftest and ini are used, the
    transfer is in the JUnit XML as cpr_t1_* properties, and no process or record is left."""
    venv = wheel_venv(tmp_path / "venv", dependencies=True)
    for module in ("pytest_cpr", "pytest", "pytest_timeout"):
        where = venv.run("python", "-c", f"import {module}; print({module}.__file__)", cwd=tmp_path).strip()
        assert where.startswith(f"{venv.root}/"), f"{module} must come from the fresh venv, not {where}"
    project = _user_project(tmp_path / "project")
    junit = tmp_path / "junit.xml"
    code, out = _run_pytest(venv, project, _user_env(cpr_settings, tmp_path / "state"),
                            "-p", "no:cacheprovider", f"--junitxml={junit}")
    shown = f"--- the user's pytest run (exit code {code}) ---\n{out[-6000:]}"
    assert code == 0 and " 1 passed" in out, shown
    assert "my-cpr-project: user conftest loaded" in out, f"the user's conftest was not used\n{shown}"

    cases = list(ET.parse(junit).getroot().iter("testcase"))
    assert [c.get("name") for c in cases] == ["test_live_update"], shown
    assert not [e.tag for e in cases[0] if e.tag in ("failure", "error", "skipped")], shown
    props = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    assert props.get("cpr_t1_status") == "completed", props
    for figure in ("qemu_downtime_ms", "blackout_ms", "wall_ms", "lost_probes"):
        value = props.get(f"cpr_t1_{figure}")
        assert value is not None and float(value) >= 0, f"cpr_t1_{figure} = {value!r}"
    assert "cpr_t2_status" not in props, "one transfer, one set of cpr_t<N>_* properties"
    artifacts = Path(str(props["cpr_artifacts"]))
    assert artifacts.is_relative_to(project.resolve() / "out" / "cpr"), f"user's cpr_artifacts not used: {artifacts}"
    assert (artifacts / "transfers.json").is_file()

    state = tmp_path / "state"
    records = sorted(p.name for p in state.glob("*.json")) if state.is_dir() else []
    left = records + _processes_naming(str(tmp_path))
    assert not left, f"the user's run left behind: {left}\n{shown}"
