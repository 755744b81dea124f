"""QemuProcess.halt_reason: a guest whose QEMU runs but stopped it on a KVM error, or that panicked,
is gone for every wait on it (a `sleep` stands in for the running QEMU: this is about the QMP events
and stderr lines the harness reads, not about QEMU)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_cpr.qemu.process import QemuProcess

KVM_ERROR = ("KVM internal error. Suberror: 3\nextra data[0]: 0x0000000080000b0e\n"
             "RAX=0000000000000000 RBX=ffffffff8e403f00\n")


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[QemuProcess]:
    p = QemuProcess("qemu-system-x86_64", ["qemu-system-x86_64"], "g0", tmp_path, tmp_path,
                    tmp_path / "qmp.sock", tmp_path / "console.sock", tmp_path / "console.log")
    p.popen = subprocess.Popen(["sleep", "30"])
    p.stderr_path.write_text("qemu-system-x86_64: warning: hub 0 is not connected to host network\n")
    yield p
    p.popen.kill()
    p.popen.wait()
    p.qmp.close()


def test_running_guest_has_no_halt_reason(proc: QemuProcess) -> None:
    assert proc.halt_reason() is None


def test_stop_without_kvm_error_is_not_a_halt(proc: QemuProcess) -> None:
    """The source of a transfer stops its guest (STOP) with nothing on stderr: that is the transfer."""
    proc.qmp.events.append({"event": "STOP"})
    assert proc.halt_reason() is None


def test_stop_after_kvm_internal_error_is_a_halt_naming_it(proc: QemuProcess) -> None:
    with proc.stderr_path.open("a") as fh:
        fh.write(KVM_ERROR)
    proc.qmp.events.append({"event": "STOP"})
    reason = proc.halt_reason()
    assert reason is not None and "stopped the guest: KVM internal error. Suberror: 3" in reason
    assert "RAX=" in reason  # the register dump's tail comes with it


def test_resumed_guest_is_not_halted(proc: QemuProcess) -> None:
    with proc.stderr_path.open("a") as fh:
        fh.write(KVM_ERROR)
    proc.qmp.events += [{"event": "STOP"}, {"event": "RESUME"}]
    assert proc.halt_reason() is None


def test_guest_panic_is_a_halt(proc: QemuProcess) -> None:
    proc.qmp.events.append({"event": "GUEST_PANICKED", "data": {"action": "pause"}})
    reason = proc.halt_reason()
    assert reason is not None and "GUEST_PANICKED" in reason


def test_exited_qemu_reports_its_exit(proc: QemuProcess) -> None:
    assert proc.popen is not None
    proc.popen.kill()
    proc.popen.wait()
    reason = proc.halt_reason()
    assert reason is not None and "exited (killed by signal 9" in reason


def test_guest_reset_held_by_shutdown_pause_is_a_halt(proc: QemuProcess) -> None:
    """L1 runs with `-action reboot=shutdown,shutdown=pause`: its triple fault leaves QEMU running with
    the CPUs as they were (for the harness to read) and must count as gone. A host's quit does not."""
    proc.qmp.events.append({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}})
    assert proc.halt_reason() is None
    proc.qmp.events += [{"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-reset"}}, {"event": "STOP"}]
    reason = proc.halt_reason()
    assert reason is not None and "SHUTDOWN by the guest: guest-reset" in reason
