"""What QEMU said on stderr during a transfer: which lines are news, and the check on them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pytest_cpr import checks
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.qemu import stderr
from pytest_cpr.qemu.bugs import KVM_STATE_NULL_AFTER_CPR

DMABUF = ("-device vfio-pci,host=0000:02:00.0,id=hostdev1,bus=pcie.0,addr=0x11: warning: VFIO dma-buf not "
          "supported in kernel, using mmap fallback, P2P DMA will not work")


def test_lines_since_an_offset_without_the_program_name(tmp_path: Path) -> None:
    log = tmp_path / "qemu-g1.stderr"
    assert stderr.size(log) == 0 and stderr.lines_since(log) == []
    log.write_text(f"qemu-system-x86_64: {DMABUF}\n")
    offset = stderr.size(log)
    with log.open("a") as fh:
        fh.write("/usr/bin/qemu-system-x86_64: vfio_container_dma_map(0x1, 0x0, 0x80000000) = -17 (File exists)\n\n")
    assert stderr.lines_since(log) == [DMABUF, "vfio_container_dma_map(0x1, 0x0, 0x80000000) = -17 (File exists)"]
    assert stderr.lines_since(log, offset) == ["vfio_container_dma_map(0x1, 0x0, 0x80000000) = -17 (File exists)"]


def test_news_leaves_out_start_up_noise_and_chatter() -> None:
    lines = [DMABUF, "terminating on signal 15 from pid 7", "VFIO_MAP_DMA failed: Bad address",
             "VFIO_MAP_DMA failed: Bad address", "info: nothing to see"]
    assert stderr.news(lines, {DMABUF}) == ["VFIO_MAP_DMA failed: Bad address"]
    assert stderr.news(lines, set()) == [DMABUF, "VFIO_MAP_DMA failed: Bad address"]


def test_news_knows_start_up_noise_at_other_addresses() -> None:
    """iommufd cannot map a BAR for peer-to-peer: every QEMU says so while the guest boots, at its own
    addresses (seen in the virtual host: g0 and g1 of one guest)."""
    g0 = "warning: vfio_container_dma_map(0x558448a4f0a0, 0xfeb80000, 0x20000, 0x7f8754d20000) = -14 (Bad address)"
    g1 = "warning: vfio_container_dma_map(0x55ee0e35ec50, 0xfeb80000, 0x20000, 0x7fd908560000) = -14 (Bad address)"
    other = "warning: vfio_container_dma_map(0x55ee0e35ec50, 0x0, 0x80000000, 0x7fd908560000) = -17 (File exists)"
    assert stderr.news([g1, other], {g0}) == [other]
    # once per process, about whichever device's BAR came first (seen: g0 01:00.0, g1 02:00.0)
    p2p = "{}: PCI peer-to-peer transactions on BARs are not supported."
    assert stderr.news([p2p.format("0000:02:00.0")], {p2p.format("0000:01:00.0")}) == []


def test_qemu_quiet_check_names_the_lines_and_known_bugs() -> None:
    result = TransferResult(2, ProcessRef("g1", "11.1.3"), ProcessRef("g2", "11.1.3"), status="completed")
    checks.assert_qemu_quiet(result)  # nothing said: passes
    result.qemu_messages = ["vfio_container_dma_map(0x1, 0x0, 0x80000000) = -17 (File exists)"]
    with pytest.raises(checks.CheckFailed, match=r"transfer 2 \(g1 11.1.3 -> g2 11.1.3\) completed, but QEMU "
                                                 r"reported trouble on stderr during it:\n  vfio_container_dma_map"):
        checks.assert_qemu_quiet(result)
    bug = replace(KVM_STATE_NULL_AFTER_CPR, stderr=r"dma_map.*File exists")
    checks.assert_qemu_quiet(result, [bug])
    assert result.notes == [f"QEMU said {result.qemu_messages[0]!r}: {bug.key} ({bug.summary})"]


def test_news_leaves_out_the_trace_events_asked_for() -> None:
    """The harness's own trace events (e.g. IOAS allocations counted in the vIOMMU test) are not
    QEMU's complaints; an event not asked for, or a real complaint beside them, still is."""
    lines = ["iommufd_backend_alloc_ioas  iommufd=12 ioas=2", "iommufd_cdev_alloc_ioas  iommufd=12 ioas=3",
             "VFIO_MAP_DMA failed: Bad address"]
    events = ("iommufd_backend_alloc_ioas",)
    assert stderr.news(lines, set(), events) == lines[1:]
    assert stderr.traced(lines, "iommufd_backend_alloc_ioas") == ["iommufd=12 ioas=2"]
