"""The blackout-interrupt checks (pytest_cpr.blackout) on made-up data, and the eventfd readers they
stand on (host.procfds) on a fake /proc and on a real eventfd: each check passes what it must and
fails, naming why, on what it must not."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from pytest_cpr.blackout import (
    Delivery,
    IrqMode,
    Window,
    assert_delivered_promptly,
    assert_irq_mode,
    assert_raised_in_blackout,
    guest_irq_mode,
    host_irq_modes,
    initrd_member,
)
from pytest_cpr.checks import CheckFailed
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.errors import CprError
from pytest_cpr.host import procfds
from pytest_cpr.kinds import Phase, Role
from pytest_cpr.procfs import parse_interrupts

HOST_INTERRUPTS = """\
            CPU0       CPU1
 40:          5          2  IR-PCI-MSIX-0000:03:00.0    0-edge      vfio-msix[0](0000:03:00.0)
 41:          1          0  IR-PCI-MSIX-0000:03:00.0    1-edge      vfio-msix[1](0000:03:00.0)
 42:          9          0  IR-PCI-MSI-0000:01:00.0    0-edge      vfio-msi[0](0000:01:00.0)
 16:          3          0  IR-IO-APIC   16-fasteoi   vfio-intx(0000:02:00.0)
"""


def test_interrupt_modes_read_from_guest_and_host() -> None:
    """The guest's msi_irqs list gives the mode (none: INTx; a mix: unknown), the host's vfio line
    names give theirs; the e1000e parameter follows the driver's IntMode numbering."""
    assert guest_irq_mode("e1000e\nmsix\nmsix\nmsix\n") == ("e1000e", IrqMode.MSIX)
    assert guest_irq_mode("e1000e\nmsi\n") == ("e1000e", IrqMode.MSI)
    assert guest_irq_mode("e1000e\n") == ("e1000e", IrqMode.INTX)
    assert guest_irq_mode("e1000e\nmsi\nmsix\n") == ("e1000e", None)
    lines = parse_interrupts(HOST_INTERRUPTS)
    assert host_irq_modes({k: v for k, v in lines.items() if "03:00.0" in v.name}) == {"msix"}
    assert host_irq_modes(lines) == {"msix", "msi", "intx"}
    assert [m.e1000e_parameter for m in IrqMode] == ["IntMode=2", "IntMode=1", "IntMode=0"]


def test_irq_mode_check_fails_when_the_mode_is_not_the_one_asked() -> None:
    lines = parse_interrupts(HOST_INTERRUPTS)
    msix = {k: v for k, v in lines.items() if "03:00.0" in v.name}
    assert_irq_mode(IrqMode.MSIX, "e1000e\nmsix\nmsix\n", msix)
    assert_irq_mode(IrqMode.MSIX, "igb\nmsix\nmsix\n", msix)
    with pytest.raises(CheckFailed, match=r"asked for msi, the guest's e1000e uses msix .* vfio lines are \['msix'\]"):
        assert_irq_mode(IrqMode.MSI, "e1000e\nmsix\nmsix\n", msix)
    with pytest.raises(CheckFailed, match=r"the guest's e1000e uses msi and the host's vfio lines are \['msix'\]"):
        assert_irq_mode(IrqMode.MSI, "e1000e\nmsi\n", msix)
    with pytest.raises(CprError, match="guest driver is igb, not e1000e"):
        assert_irq_mode(IrqMode.MSIX, "igb\nmsix\n", msix, driver="e1000e")


def _delivery(replies_after_resume_ms: dict[int, float], window: Window | None = None) -> Delivery:
    result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
    result.timeline[Phase.TARGET_RUNNING] = 1000.0
    window = window or Window(status="completed", sent=[0, 1, 2], host_irqs=1, pending={17: 1})
    return Delivery(result, window, {s: 1000.0 + ms / 1000 for s, ms in replies_after_resume_ms.items()})


def test_prompt_delivery_passes_and_late_or_missing_replies_fail() -> None:
    ok = _delivery({0: 20.0, 1: 21.0, 2: 35.5})
    assert ok.answered_ms == 35.5
    assert_delivered_promptly(ok, bound_ms=500)
    late = _delivery({0: 20.0, 1: 21.0, 2: 1900.0})
    with pytest.raises(CheckFailed, match=r"0 unanswered .* 1 answered later than 500 ms after RESUME \(\{2: 1900"):
        assert_delivered_promptly(late, bound_ms=500)
    missing = _delivery({0: 20.0})
    assert missing.answered_ms is None
    with pytest.raises(CheckFailed, match=r"2 unanswered 10 s after RESUME \(seq \[1, 2\]\)"):
        assert_delivered_promptly(missing, bound_ms=500)


def test_raised_in_blackout_needs_a_host_interrupt_and_a_waiting_event() -> None:
    assert_raised_in_blackout(_delivery({}))
    with pytest.raises(CheckFailed, match="raised no interrupt"):
        assert_raised_in_blackout(_delivery({}, Window(status="completed", sent=[0], host_irqs=0)))
    with pytest.raises(CheckFailed, match="no eventfd of the new QEMU holds the event"):
        assert_raised_in_blackout(_delivery({}, Window(status="completed", sent=[0], host_irqs=2)))
    with pytest.raises(CheckFailed, match="did not complete"):
        assert_raised_in_blackout(_delivery({}, Window(status="failed")))


def test_eventfd_counts_from_a_fake_proc(tmp_path: Path) -> None:
    """Only eventfds count; their fdinfo counter is hexadecimal."""
    fd, info = tmp_path / "42/fd", tmp_path / "42/fdinfo"
    fd.mkdir(parents=True)
    info.mkdir()
    for n, target, text in ((3, "anon_inode:[eventfd]", "pos:\t0\neventfd-count:                1a\neventfd-id: 7\n"),
                            (4, "anon_inode:[eventfd]", "eventfd-count:                0\n"),
                            (5, "/dev/vfio/vfio", "pos:\t0\n")):
        (fd / str(n)).symlink_to(target)
        (info / str(n)).write_text(text)
    assert procfds.eventfd_counts(42, tmp_path) == {3: 0x1A, 4: 0}
    assert procfds.parse_eventfd_count("pos: 0\n") is None


def test_drain_reads_away_the_events_of_a_real_eventfd() -> None:
    """What the control does to the new QEMU's eventfd, done to one of this process: the pending
    count is read (and reset) through pidfd_getfd; an empty one is left alone."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.eventfd_write(efd, 3)
        assert procfds.eventfd_counts(os.getpid())[efd] == 3
        assert procfds.drain_eventfd(os.getpid(), efd) == 3
        assert procfds.eventfd_counts(os.getpid())[efd] == 0
        assert procfds.drain_eventfd(os.getpid(), efd) == 0
    finally:
        os.close(efd)


def test_a_module_is_read_out_of_a_newc_initrd(tmp_path: Path) -> None:
    """initrd_member finds a file in a gzip'd newc cpio archive (what busybox_initrd writes) by its path."""
    def entry(name: str, body: bytes) -> bytes:
        raw = name.encode() + b"\0"
        head = b"070701" + b"".join(b"%08X" % v for v in (1, 0o100644, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(raw), 0))
        out = head + raw
        out += b"\0" * (-len(out) % 4) + body
        return out + b"\0" * (-len(out) % 4)

    archive = (entry("./init", b"#!/bin/sh\n") + entry("./lib/mods/e1000e.ko", b"\x7fELF-module")
               + entry("TRAILER!!!", b""))
    path = tmp_path / "initrd.img"
    path.write_bytes(gzip.compress(archive))
    assert initrd_member(path, "lib/mods/e1000e.ko") == b"\x7fELF-module"
    with pytest.raises(CprError, match=r"holds no lib/mods/igb\.ko"):
        initrd_member(path, "lib/mods/igb.ko")


def test_e1000e_role_is_a_nic() -> None:
    assert Role.NIC.is_nic and Role.NIC_E1000E.is_nic and not Role.NVME.is_nic
