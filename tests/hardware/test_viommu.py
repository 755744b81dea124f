"""Passthrough devices behind a guest vIOMMU through cpr-transfer: a container per device for real.

Without a vIOMMU every passed-through device sits in the guest's one address space and QEMU puts
them all in one legacy container / iommufd IOAS (test_passthrough.py's two_groups test asserts
that). With an intel-iommu in the guest (caching mode), each device has its own address space, so
QEMU opens a container (legacy) or allocates an IOAS (iommufd) per device, and the guest's kernel
maps and unmaps DMA through the vIOMMU while it runs. That is what the seed's fixes are about:
"dma_map restored for every container, not just the first" (vioc->dma_map per container) and the
vIOMMU remap on the target (vfio_cpr_giommu_remap).
"""

from __future__ import annotations

import pytest

from pytest_cpr import checks
from pytest_cpr.host import procfds
from pytest_cpr.kinds import Backend
from pytest_cpr.qemu import stderr
from pytest_cpr.vfio_fixtures import PassthroughGuest

pytestmark = pytest.mark.cpr(mode="cpr-transfer")

TRANSFERS = 2


def _containers(guest: PassthroughGuest) -> int:
    """The current QEMU's containers: /dev/vfio/vfio fds (legacy) or IOAS it allocated (iommufd;
    a target reuses its source's IOAS, so counting starts at the first QEMU)."""
    vm = guest.vm
    if guest.devices.backend == Backend.LEGACY:
        return procfds.vfio_containers(procfds.open_files(vm.current.pid))
    first = vm.generations[0] if vm.generations else vm.current
    return len(set(stderr.traced(stderr.lines_since(first.stderr_path), "iommufd_cdev_alloc_ioas")))


def _guest_translates(guest: PassthroughGuest) -> dict[str, str]:
    """Each passed-through device's IOMMU domain type in the guest (DMA / DMA-FQ: the guest maps
    its DMA through the vIOMMU; identity would bypass the remapping QEMU restores)."""
    types = {}
    for _, dev in guest.devices.devices:
        out = guest.vm.run(f"cat /sys/bus/pci/devices/{dev.guest_address}/iommu_group/type").stdout.strip()
        types[dev.guest_address] = out
    return types


# Measured in the virtual host (2026-11-26, host load ~9): blackouts 1.1-4.3 s and 400-1400 lost
# 5 ms probes per transfer, against 0.1-1 s without a vIOMMU (the new QEMU also replays the guest's
# IOMMU mappings, vfio_cpr_giommu_remap; why the blackout grows is not known yet). Bounded at about
# twice that, so a hang still fails.
@pytest.mark.cpr_thresholds(max_blackout_ms=10000, max_lost_probes=3000)
@pytest.mark.viommu
@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
def test_viommu_container_per_device_through_transfers(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict,
                                                       request: pytest.FixtureRequest) -> None:
    """A NIC and an NVMe behind a guest vIOMMU: QEMU holds one container / IOAS per device (2), the
    guest translates both devices' DMA, and NIC traffic plus NVMe DMA run through two transfers with
    every check; after each, the new QEMU still holds 2 containers (legacy) or allocated no IOAS of
    its own (iommufd: it took its source's), and both devices' vectors fire. Control: the two_groups
    test of test_passthrough.py counts 1 container for the same devices without a vIOMMU."""
    guest = cpr_vfio_guest
    vm = guest.vm
    types = _guest_translates(guest)
    request.node.user_properties.append(("cpr_viommu_domains", str(types)))
    assert types and all(t in ("DMA", "DMA-FQ") for t in types.values()), \
        f"the guest does not translate its passthrough devices' DMA through the vIOMMU: {types} (logs {vm.artifacts})"
    counts = [_containers(guest)]
    assert counts[0] == 2, (f"QEMU holds {counts[0]} {guest.devices.backend} containers for two devices behind a "
                            f"vIOMMU: expected one per device (logs {vm.artifacts})")
    dma = guest.nvme_dma()
    dma.find()
    nic_pattern = guest.nic_irq_pattern(guest.nics[0][1])
    dma.start()
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        for i in range(TRANSFERS):
            dma.wait_rounds(2, 120.0)
            result = guest.transfer_checked(traffic, f"{nic_pattern}|{dma.irq_pattern}", watch, **cpr_thresholds)
            dma.wait_rounds(2, 120.0)
            watch.check_log(vm.artifacts)
            watch.check_irqs(vm.artifacts)
            fired = (result.interrupts or {}).get("after", {})
            assert any("nvme" in k for k in fired), f"transfer {i}: NVMe vectors silent after it: {fired}"
            assert any(k for k in fired if "nvme" not in k), f"transfer {i}: NIC vectors silent after it: {fired}"
            counts.append(_containers(guest))
            if guest.devices.backend == Backend.IOMMUFD:
                allocated = stderr.traced(stderr.lines_since(vm.current.stderr_path), "iommufd_cdev_alloc_ioas")
                assert not allocated, (f"transfer {i}: the new QEMU allocated IOAS {allocated} instead of taking "
                                       f"its source's (logs {vm.artifacts})")
    request.node.user_properties.append(("cpr_viommu_containers", ",".join(map(str, counts))))
    assert counts == [2] * (TRANSFERS + 1), f"containers per QEMU generation: {counts}, expected 2 each"
    rounds = dma.stop()
    assert rounds >= 4 * TRANSFERS
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    guest.check_guest_log()
