"""A QEMU that goes away under a QMP command is named with its exit, not as a bare
`ExecInterruptedError: Disconnected` (seen in the virtual host: an L2 guest reset under -no-reboot
ended its QEMU just before a transfer's first `query-status`, and the test said only "Disconnected").
A real QEMU (no guest: -machine none), killed between two commands; the control is the command
before the kill, answered."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.qmp import QmpGone


def test_qemu_killed_under_a_command_is_named_with_its_exit(tmp_path: Path, cpr_source_build: QemuBuild) -> None:
    sock = tmp_path / "qmp.sock"
    argv = [cpr_source_build.binary, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    proc = QemuProcess(cpr_source_build.binary, argv, "g0", tmp_path, tmp_path, sock, tmp_path / "console.sock",
                       tmp_path / "console.log")
    proc.start()
    try:
        proc.wait_for_path(sock, 30, "QMP socket", listening=True)
        proc.qmp.connect(sock, 30)
        assert proc.qmp.execute("query-status")["status"] == "prelaunch"  # control: a live QEMU answers
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(QmpGone, match=r"QMP g0: no answer to query-status, the connection closed .*"
                                          r"QEMU g0 exited \(killed by signal 9\)"):
            proc.qmp.execute("query-status", timeout=30)
    finally:
        proc.shutdown(5)
