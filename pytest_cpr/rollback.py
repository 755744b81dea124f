"""Rollback with live passthrough devices: what a failed update must leave behind.

QEMU promises that when a cpr-transfer fails the old QEMU runs the guest again. With VFIO devices
that takes work in the old QEMU (its DMA vaddrs re-registered after an unmap-all, its KVM irqfds
attached again), so "runs again" is checked with the devices busy: `LiveDevices` keeps NVMe DMA
running beside the NIC traffic and, around a failed transfer, shows the old QEMU resumed, probes
answered over the passthrough NIC, DMA rounds passing and every NIC and NVMe vector that fired
before firing after. Usable without pytest:

    live = LiveDevices(guest).start()
    with guest.nic_traffic() as traffic:
        before = live.window(traffic)
        outcome = faults.inject(guest.vm, faults.kill_target_after_cpr_state())
        assert_rolled_back(guest.vm, source, outcome)
        live.assert_live_after(traffic, before)
    live.stop()   # every slot written reads back identical
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_cpr import checks
from pytest_cpr.faults import FaultOutcome, wait_status
from pytest_cpr.guest.state import GuestSnapshot
from pytest_cpr.waits import DMA_ROUND_TIMEOUT_S, IRQ_WAIT_S, WINDOW_TIMEOUT_S

if TYPE_CHECKING:
    from pytest_cpr.passthrough import NvmeDma, PassthroughGuest
    from pytest_cpr.probing import Traffic
    from pytest_cpr.qemu.process import QemuProcess
    from pytest_cpr.vm import CprVM

RESUME_WAIT_S = 15.0
WINDOW_ANSWERS = 100
DMA_ROUNDS = 2


def assert_old_qemu_runs(source: QemuProcess, timeout: float = RESUME_WAIT_S, logs: object = None) -> None:
    """The old QEMU is alive and runs the guest (query-status `running`, waited for, bounded)."""
    status = wait_status(source, ("running",), timeout)
    if status != "running":
        raise checks.CheckFailed(f"the old QEMU {source.label} is {status!r} {timeout:g} s after the failed transfer: "
                                 f"QEMU promises it runs the guest again (logs: {logs})")


def assert_rolled_back(vm: CprVM, source: QemuProcess, outcome: FaultOutcome) -> None:
    """The transfer was reported failed, the old QEMU is still the guest's and runs it, the target is gone."""
    logs = vm.artifacts
    if not outcome.failed:
        raise checks.CheckFailed(f"the transfer with fault {outcome.fault} was reported {outcome.result.status}, "
                                 f"expected a failure; {outcome.describe()}")
    if vm.current is not source or not outcome.source_alive:
        raise checks.CheckFailed(f"after fault {outcome.fault} the old QEMU is not the guest's any more (alive: "
                                 f"{outcome.source_alive}, exit: {outcome.source_exit}) (logs: {logs})")
    if outcome.target_exit is None:
        raise checks.CheckFailed(f"the target of the failed transfer (fault {outcome.fault}) still runs (logs: {logs})")
    assert_old_qemu_runs(source, logs=logs)


class LiveDevices:
    """A passthrough guest's NIC and NVMe kept busy: NVMe DMA (NvmeDma) beside the NIC traffic the
    caller runs, and the guest vectors of both."""

    def __init__(self, guest: PassthroughGuest) -> None:
        self.guest = guest
        self.dma: NvmeDma = guest.nvme_dma()
        self.dma.find()
        self.pattern = f"{guest.nic_irq_pattern(guest.nics[0][1])}|{self.dma.irq_pattern}"

    def start(self) -> LiveDevices:
        self.dma.start()
        self.dma.wait_rounds(DMA_ROUNDS, DMA_ROUND_TIMEOUT_S)
        return self

    def window(self, traffic: Traffic) -> tuple[GuestSnapshot, GuestSnapshot]:
        """Guest snapshots around a window of answered probes and passed DMA rounds."""
        vm = self.guest.vm
        first = vm.snapshot()
        traffic.wait_answers(WINDOW_ANSWERS, WINDOW_TIMEOUT_S)
        self.dma.wait_rounds(DMA_ROUNDS, DMA_ROUND_TIMEOUT_S)
        return first, vm.snapshot()

    def assert_live_after(self, traffic: Traffic,
                          before: tuple[GuestSnapshot, GuestSnapshot]) -> dict[str, dict[str, int]]:
        """After a failed transfer: probes answered over the NIC, DMA rounds pass (a failure line or a
        stall raises), and each NIC and NVMe vector that fired in `before` fires again (windows grow
        up to IRQ_WAIT_S for a slow vector, as in a live update)."""
        vm = self.guest.vm
        after = self.window(traffic)
        fired_before = checks.active_vectors(before[0], before[1], self.pattern)
        while (set(fired_before) - set(checks.active_vectors(after[0], after[1], self.pattern))
               and after[1].uptime_s - after[0].uptime_s < IRQ_WAIT_S):
            traffic.wait_answers(WINDOW_ANSWERS, WINDOW_TIMEOUT_S)
            self.dma.wait_rounds(1, DMA_ROUND_TIMEOUT_S)
            after = (after[0], vm.snapshot())
        return checks.assert_interrupts(before, after, self.pattern, vm.artifacts)

    def stop(self) -> int:
        """Stop the DMA and read every slot back: CheckFailed on any slot not as written."""
        return self.dma.stop()
