"""The runner's job-started hook on real leftovers: an orphaned QEMU (no harness parent) and a stale
cprt-* network namespace are removed; a QEMU whose harness lives and that harness's namespace stay."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_cpr import cleanup

pyroute2_netns = pytest.importorskip("pyroute2.netns")

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, killing QEMU")


def qemu_argv(rundir: Path, name: str) -> list[str]:
    """The smallest QEMU with a pytest-cpr-style QMP socket: no guest, paused."""
    return [QEMU, "-name", f"{name},debug-threads=on", "-machine", "none", "-nodefaults", "-display", "none",
            "-S", "-chardev", f"socket,id=qmp0,path={rundir}/qmp-g0.sock,server=on,wait=off",
            "-qmp", "chardev:qmp0"]


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f}s")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    return cleanup.read_proc(pid) is not None and not cleanup._is_zombie(pid, cleanup.PROC)


def installed_hook(tmp_path: Path) -> Path:
    """job-started.sh as setup-host.sh installs it (under --root), running this interpreter with a state
    folder of its own: the hook empties the environment, so the wrapper names it (the real records
    in /run/pytest-cpr are other runs')."""
    python = tmp_path / "interp" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexport CPR_STATE_DIR={tmp_path}/state\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = subprocess.run(["bash", str(REPO / "ci" / "runner" / "setup-host.sh"), "--root", str(tmp_path / "root"),
                          "--hook-python", str(python)], capture_output=True, text=True, timeout=60)
    hook = tmp_path / "root" / "opt" / "pytest-cpr" / "hooks" / "job-started.sh"
    # setup-host.sh exits 1 while the host lacks something for passthrough (no IOMMU on a CI machine);
    # the hooks are installed all the same
    assert hook.is_file(), f"setup-host.sh installed no hook (exit {out.returncode}):\n{out.stdout}{out.stderr}"
    return hook


def free_pid() -> int:
    return next(p for p in range(4_000_000, 4_100_000) if not Path(f"/proc/{p}").exists())


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """Two run directories made the way vm.CprVM makes them."""
    paths = tuple(Path(tempfile.mkdtemp(prefix="cpr-", dir="/tmp")) for _ in range(2))
    yield paths[0], paths[1]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def test_job_started_hook_cleans_only_what_no_harness_owns(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    orphan_sock, rundir = dirs
    # QEMU's parent is a shell, not a harness: as after a killed harness whose QEMU was adopted (by
    # init or a subreaper); the shell reaps QEMU once it is killed, so no zombie stays behind
    shell = subprocess.Popen(["bash", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!; wait', "_",
                              *qemu_argv(orphan_sock, "orphan")], stdout=subprocess.PIPE, text=True)
    assert shell.stdout is not None
    orphan = int(shell.stdout.readline())
    kept = subprocess.Popen(qemu_argv(rundir, "kept"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # parent: this (live) pytest process
    stale_ns, live_ns = f"cprt-{free_pid()}-cleanuptest", f"cprt-{os.getpid()}-cleanuptest"
    try:
        wait_for("QMP sockets of both QEMUs", lambda: (orphan_sock / "qmp-g0.sock").exists()
                 and (rundir / "qmp-g0.sock").exists())
        for name in (stale_ns, live_ns):
            pyroute2_netns.create(name)
        result = subprocess.run(["bash", "-e", str(installed_hook(tmp_path))], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"killed orphaned QEMU process {orphan} (qemu-system-x86_64 -name orphan;" in result.stdout, \
            result.stdout
        assert f"deleted stale network namespace {stale_ns}" in result.stdout
        assert "::warning::" in result.stdout
        assert not alive(orphan)
        assert kept.poll() is None, "a QEMU whose harness is alive must survive the cleanup"
        assert live_ns in pyroute2_netns.listnetns() and stale_ns not in pyroute2_netns.listnetns()
    finally:
        kept.kill()
        kept.wait(timeout=10)
        if alive(orphan):
            os.kill(orphan, 9)
        shell.wait(timeout=10)
        for name in (stale_ns, live_ns):
            if name in pyroute2_netns.listnetns():
                pyroute2_netns.remove(name)
