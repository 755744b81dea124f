"""Guests with passed-through devices through cpr-exec (QEMU >= 10.2; the virtual host's QEMU is 11.1.3):
the QEMU process exec's the new QEMU in place (same PID), the VFIO devices, their container or iommufd
and the DMA mappings kept across the exec (QEMU ee1ca09fc1 "vfio: cpr-exec mode"), with the checks of
cpr-transfer (tests/hardware/test_passthrough.py): traffic over the NIC, NVMe DMA going on, vectors
firing, host and guest kernel logs clean, and the pinned memory's accounting carried over to the exec'd
image. Each runs once per backend of the host config.
"""

from __future__ import annotations

import pytest

from pytest_cpr.kinds import Mode
from pytest_cpr.vfio_fixtures import PassthroughGuest

pytestmark = pytest.mark.cpr(mode="cpr-exec")

# cpr-exec pauses the guest for the exec'd QEMU's whole start-up (QEMU's CPR.rst; cpr-transfer starts
# the new QEMU before the guest stops). In the virtual host (TCG L1, KVM L2, 2 cores under load) that
# pause was 1.2-9.4 s and the guest blackout 1.3-9.9 s in 16 cpr-exec's (cpr-transfer of the same guest:
# 0.3-0.9 s, 0.4-1.6 s; load 1-9), so the passthrough default (2000 ms) does not apply; bound: 2x the worst.
CPR_EXEC_MAX_BLACKOUT_MS = 20000.0


# 9-1040 probes lost in pauses of 1.2-8.0 s (200 probes a second): with the capture fixed, still 0-54 per
# exec (the probes sent from ~1 s into the pause to its end, most often in a test's first exec); not
# the guest's RX ring (4096 descriptors lost the same), cause open (docs/virtual-host.md, "Where lost probes
# went"); recorded, not bounded (the TCP stream, retransmitted, must arrive intact)
@pytest.mark.cpr_thresholds(max_blackout_ms=CPR_EXEC_MAX_BLACKOUT_MS, max_lost_probes=None)
@pytest.mark.vfio(role="nic")
def test_cpr_exec_keeps_nic_traffic(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict) -> None:
    """Two cpr-exec's under probes and a TCP stream over the passthrough NIC: the NIC checks of
    test_nic_traffic_through_transfer, one QEMU process throughout (same PID, three generations)."""
    pid = cpr_vfio_guest.vm.current.pid
    results = cpr_vfio_guest.nic_traffic_through_transfers(2, cpr_thresholds)
    assert [(r.mode, r.status) for r in results] == [(str(Mode.CPR_EXEC), "completed")] * 2
    pids = {g.pid for g in cpr_vfio_guest.vm.generations}
    assert pids == {pid}, f"cpr-exec must keep the QEMU's PID {pid}, saw {pids}"


# probes go over the virtio NIC here: through cpr-exec's pause its tap and rx ring overflow as well (0-228
# probes lost in pauses of 3.6-9.4 s): recorded, not bounded
@pytest.mark.cpr_thresholds(max_blackout_ms=CPR_EXEC_MAX_BLACKOUT_MS, max_lost_probes=None)
@pytest.mark.vfio(role="nvme")
def test_cpr_exec_keeps_nvme_dma(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict,
                                 cpr_max_dma_stall_ms: float | None) -> None:
    """One cpr-exec while O_DIRECT writes run on the passthrough NVMe: the checks of
    test_nvme_dma_through_transfer (rounds go on, data reads back identical, vectors fire, the stall
    is bounded), same PID."""
    pid = cpr_vfio_guest.vm.current.pid
    result = cpr_vfio_guest.nvme_transfer(cpr_thresholds, cpr_max_dma_stall_ms)
    assert (result.mode, result.status, result.target_pid) == (str(Mode.CPR_EXEC), "completed", pid)
