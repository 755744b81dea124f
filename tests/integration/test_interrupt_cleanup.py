"""Ctrl-C, a second Ctrl-C, pytest-timeout and SIGKILL of pytest itself, on a real transfer test run
in a subprocess: whatever stops the run, no QEMU process, namespace (hence tap) or registry record of
it survives; what a killed run left is cleaned and reported by the next run's session start.

Each inner run gets a private registry (CPR_STATE_DIR) so it never touches other runs on the host.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_cpr import leftovers, stopstress
from pytest_cpr.settings import BY_KEY

pytestmark = [pytest.mark.cpr(mode="cpr-transfer"), pytest.mark.timeout(600)]

TRANSFER_LOOP = """
import os, pathlib
import pytest
pytestmark = pytest.mark.cpr(mode="cpr-transfer")
MARK = pathlib.Path(os.environ["CPR_TEST_MARKS"])

@pytest.fixture
def slow_teardown(cpr_vm):
    yield cpr_vm
    (MARK / "teardown").write_text("started")
    release = MARK / "release"
    for _ in range(6000):  # bounded: 60 s, until the outer test releases it
        if release.exists():
            return
        __import__("time").sleep(0.01)

def test_transfers(slow_teardown):
    vm = slow_teardown
    with vm.traffic(tcp=False):
        vm.transfer()
        (MARK / "transferred").write_text(str(vm.current.pid))
        for _ in range(100):
            vm.transfer()

def test_hangs(cpr_vm):
    (MARK / "transferred").write_text(str(cpr_vm.current.pid))
    cpr_vm.run("sleep 600", timeout=700)

def test_transfers_then_hangs(cpr_vm):
    # a still point: no QEMU is quitting when the outer test kills pytest
    with cpr_vm.traffic(tcp=False):
        cpr_vm.transfer()
        cpr_vm.transfer()
    (MARK / "transferred").write_text(str(cpr_vm.current.pid))
    cpr_vm.run("sleep 600", timeout=700)
"""

SETTINGS_ONLY = """
def test_settings(cpr_settings):
    assert cpr_settings.qemu
"""


@dataclass
class Inner:
    """A pytest run in its own session (so signals reach it as a terminal's Ctrl-C would)."""

    proc: subprocess.Popen[str]
    marks: Path
    path: Path

    def wait_mark(self, name: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not (self.marks / name).exists():
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                pytest.fail(f"inner pytest exited ({self.proc.returncode}) before {name!r}:\n{out[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"inner pytest: {name!r} not reached within {timeout:.0f}s (marks {self.marks})")
            time.sleep(0.01)
        return (self.marks / name).read_text()

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the foreground group

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # a CI job's timeout or `kill <pid>`: pytest alone

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate(timeout=30)
            pytest.fail(f"inner pytest did not end within {timeout:.0f}s after the signal:\n{out[-4000:]}")
        return self.proc.returncode, out


@pytest.fixture
def inner(pytester: pytest.Pytester) -> Iterator[Callable[..., Inner]]:
    """Start inner pytest runs in pytester's directory; kill what is left of them at the end."""
    runs: list[Inner] = []
    (pytester.path / "marks").mkdir()
    pytester.makepyfile(test_loop=TRANSFER_LOOP, test_settings_only=SETTINGS_ONLY)

    def start(*args: str) -> Inner:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CPR_", "PYTEST_"))}
        env |= {"CPR_STATE_DIR": str(pytester.path / "state"),
                "CPR_CACHE_DIR": str(BY_KEY["cache_dir"].default),
                "CPR_TEST_MARKS": str(pytester.path / "marks")}
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
                                cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, preexec_fn=stopstress.as_from_a_terminal)
        run = Inner(proc, pytester.path / "marks", pytester.path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.communicate(timeout=30)
    for pid in _qemu_of(pytester.path):  # only if a test failed: never leave them to the next job
        os.kill(pid, signal.SIGKILL)


def _qemu_of(path: Path) -> list[int]:
    """Live QEMU processes of runs in `path` (their console log lives under it)."""
    return [p.pid for p in leftovers.processes()
            if b"qemu-system" in p.cmdline and str(path).encode() in p.cmdline and p.state != "Z"]


def _label(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "gone"
    found = re.search(r"qmp-([\w-]+)\.sock", cmdline)
    return f"generation {found.group(1)}" if found else "unknown generation"


def _namespaces_of(pid: int) -> list[str]:
    netns = Path("/var/run/netns")
    if not netns.is_dir():
        return []
    return sorted(p.name for p in netns.iterdir() if p.name.startswith(f"cprt-{pid}-"))


def _tap_links_of(pid: int) -> list[str]:
    """Taps live in the run's namespace; one outside it would show in the host's link list."""
    out = subprocess.run(["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True,
                         timeout=30).stdout
    return [ln for ln in out.splitlines() if f"cprt-{pid}-" in ln]


def _leftovers(run: Inner) -> list[str]:
    state = run.path / "state"
    left = [f"registry {p.name}" for p in state.glob("*.json")] if state.is_dir() else []
    left += [f"qemu pid {p} ({_label(p)})" for p in _qemu_of(run.path)]
    left += [f"netns {n}" for n in _namespaces_of(run.proc.pid)]
    left += [f"tap {t}" for t in _tap_links_of(run.proc.pid)]
    return left


# how a run is stopped once: Ctrl-C at a terminal (SIGINT to the foreground group), or SIGTERM to
# pytest alone (a CI job's timeout, `kill`), which the plugin handles like one Ctrl-C
STOPS = {"Ctrl-C": Inner.interrupt, "SIGTERM": Inner.terminate}


@pytest.mark.parametrize("how", list(STOPS))
def test_stop_mid_transfer_runs_teardown(how: str, inner: Callable[..., Inner]) -> None:
    """Stopped once while transfers run: pytest reports the interruption, teardown shuts every QEMU
    down and nothing is left for the next run to clean."""
    run = inner("test_loop.py::test_transfers")
    run.wait_mark("transferred", 180)
    (run.marks / "release").write_text("teardown may finish")
    STOPS[how](run)
    code, out = run.finish(120)
    assert code == 2 and "KeyboardInterrupt" in out, f"expected an interrupted run (exit 2):\n{out[-4000:]}"
    assert (run.marks / "teardown").exists(), f"the test's teardown did not run:\n{out[-4000:]}"
    left = _leftovers(run)
    print(f"[interrupt] {how} once: leftovers {len(left)}")
    assert not left, f"left behind after {how}: {left}\n{out[-4000:]}"


def test_second_ctrl_c_kills_what_is_left(inner: Callable[..., Inner]) -> None:
    """Ctrl-C, then Ctrl-C again while teardown is still busy (cut short): the second one kills this
    run's QEMU processes and deletes its namespaces before pytest exits."""
    run = inner("test_loop.py::test_transfers")
    run.wait_mark("transferred", 180)
    run.interrupt()
    run.wait_mark("teardown", 60)
    assert _qemu_of(run.path), "the guest's QEMU should still run while teardown is blocked"
    run.interrupt()
    code, out = run.finish(120)
    # 2: pytest reported the interruption; -SIGINT: the second KeyboardInterrupt ended pytest itself
    assert code in (2, -signal.SIGINT), f"expected an interrupted run, got exit {code}:\n{out[-4000:]}"
    assert "pytest-cpr: second Ctrl-C: killed stale QEMU process" in out, \
        f"no second-Ctrl-C cleanup:\n{out[:6000]}"
    left = _leftovers(run)
    print(f"[interrupt] Ctrl-C twice: leftovers {len(left)}; {re.findall(r'second Ctrl-C: .*', out)}")
    assert not left, f"left behind after a second Ctrl-C: {left}\n{out[-4000:]}"


def test_pytest_timeout_runs_teardown(inner: Callable[..., Inner]) -> None:
    """pytest-timeout (signal method) expires in a guest command: the test fails as a timeout and the
    teardown still shuts everything down."""
    run = inner("test_loop.py::test_hangs", "--timeout=60", "--timeout-method=signal")
    run.wait_mark("transferred", 120)
    code, out = run.finish(180)
    assert code == 1 and "Timeout" in out, f"expected a pytest-timeout failure:\n{out[-4000:]}"
    left = _leftovers(run)
    print(f"[interrupt] pytest-timeout: leftovers {len(left)}")
    assert not left, f"left behind after pytest-timeout: {left}\n{out[-4000:]}"


def test_sigkill_then_next_run_cleans_and_reports(inner: Callable[..., Inner]) -> None:
    """SIGKILL of pytest mid-test leaves QEMU and the namespace behind (nothing can run); the next run's
    session start kills and deletes them and says so in its summary.

    The kill lands after two transfers, at a point where no retired QEMU is still quitting: a source
    killed mid-quit exits by itself, so whether the next run finds it would be a race (CI saw it)."""
    first = inner("test_loop.py::test_transfers_then_hangs")
    first.wait_mark("transferred", 180)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.finish(60)
    orphans = _qemu_of(first.path)
    namespaces = _namespaces_of(first.proc.pid)
    assert orphans and namespaces, f"SIGKILL should leave QEMU {orphans} and a namespace {namespaces} behind"
    private_dirs = [json.loads(r.read_text())["path"] for r in (first.path / "state").glob("rundir-*.json")]
    assert len(private_dirs) >= 2, f"the run dir and the session key dir must be registered: {private_dirs}"
    second = inner("test_settings_only.py")
    code, out = second.finish(120)
    assert code == 0, out[-4000:]
    assert "pytest-cpr: cleaned up after an earlier run" in out, out[-4000:]
    reported = re.findall(r"^(killed stale QEMU process \d+.*|deleted stale network namespace \S+|"
                          r"removed stale run directory \S+ .*)$", out, re.M)
    for d in private_dirs:
        assert not Path(d).exists() and any(d in r for r in reported), f"{d} not removed/reported: {reported}"
    for pid in orphans:
        assert any(f"process {pid} " in r for r in reported), f"QEMU {pid} not reported: {out[-3000:]}"
    assert any(n in r for r in reported for n in namespaces), f"namespace not reported: {out[-3000:]}"
    left = _leftovers(first)
    print(f"[interrupt] SIGKILL + next run: cleaned {len(reported)} ({reported}); leftovers {len(left)}")
    assert not left, f"left behind after the next run's cleanup: {left}"
