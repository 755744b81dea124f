"""Controls for the virtual host's stability runner (`python -m pytest_cpr.vhost_stability`), run
inside L1 on demand (need its host config): the same workload as a tests/hardware test, for about
as long, with the same windows and checks, and NO transfer.

A failure class that the runner sees with transfers and never in these controls is not "nested
emulation": it points at cpr-transfer itself (docs/virtual-host.md, "How often the nested setup
fails"). Not collected by `pytest tests` (no test_ prefix: a hardware runner must not run them);
the runner names this file. By hand:

    python -m pytest_cpr.vhost run --name control -- tests/vhost/inner/controls.py -k long_iommufd_dma
"""

from __future__ import annotations

import pytest

from pytest_cpr import checks
from pytest_cpr.vfio_fixtures import NvmeDma, PassthroughGuest
from pytest_cpr.vm import Traffic

pytestmark = [pytest.mark.cpr(mode="cpr-transfer"), pytest.mark.timeout(1200)]

WINDOW = 100  # answered probes per interrupt window, as CprVM.live_update


def _quiet_cycle(guest: PassthroughGuest, traffic: Traffic, pattern: str, dma: NvmeDma | None) -> None:
    """live_update's windows around a transfer that does not happen: vectors that fired in the
    window before fire in the window after, the guest kept its boot, every probe stream answers."""
    vm = guest.vm
    s0 = vm.snapshot()
    traffic.wait_answers(WINDOW, 120.0)
    s1 = vm.snapshot()
    if dma is not None:
        dma.wait_rounds(2, 120.0)
    s2 = vm.snapshot()
    traffic.wait_answers(WINDOW, 120.0)
    s3 = vm.snapshot()
    checks.assert_same_boot(s1, s2, logs=vm.artifacts)
    checks.assert_interrupts((s0, s1), (s2, s3), pattern, vm.artifacts)


@pytest.mark.vfio(role="nic")
def test_nic_traffic_without_transfer(cpr_vfio_guest: PassthroughGuest) -> None:
    """test_nic_traffic_through_transfer's workload and checks, two cycles, no transfer."""
    guest = cpr_vfio_guest
    pattern = guest.nic_irq_pattern(guest.nics[0][1])
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        for _ in range(2):
            watch.sample()
            _quiet_cycle(guest, traffic, pattern, None)
            watch.sample()
            watch.check_log(guest.vm.artifacts)
    checks.assert_stream_intact(traffic.stream_result, guest.vm.artifacts)
    guest.check_guest_log()


@pytest.mark.vfio(role="nvme")
def test_nvme_dma_without_transfer(cpr_vfio_guest: PassthroughGuest) -> None:
    """test_nvme_dma_through_transfer's workload and checks, no transfer."""
    guest = cpr_vfio_guest
    dma = guest.nvme_dma()
    dma.find()
    dma.start()
    with guest.host_watch() as watch, guest.vm.traffic() as traffic:
        dma.wait_rounds(3, 120.0)
        _quiet_cycle(guest, traffic, dma.irq_pattern, dma)
        dma.wait_rounds(3, 120.0)
        watch.check_log(guest.vm.artifacts)
    assert dma.stop() >= 6
    guest.check_guest_log()


@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
def test_two_groups_without_transfer(cpr_vfio_guest: PassthroughGuest) -> None:
    """test_nic_and_nvme_in_two_groups's workload (NIC probes + TCP stream, NVMe DMA) and checks,
    two cycles, no transfer."""
    guest = cpr_vfio_guest
    dma = guest.nvme_dma()
    dma.find()
    pattern = f"{guest.nic_irq_pattern(guest.nics[0][1])}|{dma.irq_pattern}"
    dma.start()
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        for _ in range(2):
            dma.wait_rounds(2, 120.0)
            _quiet_cycle(guest, traffic, pattern, dma)
            dma.wait_rounds(2, 120.0)
            watch.check_log(guest.vm.artifacts)
    dma.stop()
    checks.assert_stream_intact(traffic.stream_result, guest.vm.artifacts)
    guest.check_guest_log()


@pytest.mark.vfio(role="nvme", backend="iommufd")
def test_long_iommufd_dma_without_transfer(cpr_vfio_guest: PassthroughGuest) -> None:
    """NVMe DMA on iommufd with guest snapshots for as long as the transfer test runs, and longer:
    in the virtual host this hung the guest 1 run in 5 (docs/virtual-host.md, "Known limits")."""
    guest = cpr_vfio_guest
    dma = guest.nvme_dma()
    dma.find()
    dma.start()
    with guest.vm.traffic(tcp=False):
        dma.wait_rounds(3, 120.0)
        for _ in range(6):
            guest.vm.snapshot()
            dma.wait_rounds(3, 120.0)
    assert dma.stop() >= 21
    guest.check_guest_log()
