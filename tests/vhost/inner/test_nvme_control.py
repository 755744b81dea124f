"""Control experiment, run inside the virtual host on demand (needs its host config):

    python -m pytest_cpr.vhost run --name control -- tests/vhost/inner/test_nvme_control.py -rs

The same NVMe DMA as tests/hardware's test_nvme_dma_through_transfer[iommufd], for about as long,
with no transfer at all. In the virtual host the guest sometimes hangs in that test; when this
control hangs too, the cause is the nested setup (L1's KVM + iommufd + emulated VT-d), not
cpr-transfer (docs/virtual-host.md, "Known limits").
"""

from __future__ import annotations

import pytest

from pytest_cpr.vfio_fixtures import PassthroughGuest

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


@pytest.mark.timeout(1200)
@pytest.mark.vfio(role="nvme", backend="iommufd")
def test_nvme_dma_without_transfer(cpr_vfio_guest: PassthroughGuest) -> None:
    """DMA rounds and guest snapshots keep coming for as long as the transfer test runs."""
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
