"""Cross-version live update of a guest with a passed-through NIC: build A -> build B with vfio devices,
both ways. The builds are the source build (--cpr-qemu) and a second one (--cpr-cross-qemu /
CPR_CROSS_QEMU; the virtual host shares the cached `cpr-image build qemu-forky` as that), both with
VFIO CPR. Each test runs the older -> the newer build ("upgrade") and the newer -> the older
("downgrade") on each backend, and asserts the outcome QEMU promises for that pair
(pytest_cpr.qemu.cross): a completed update with every check of the passthrough tests, or a failed
transfer whose source QEMU keeps the guest and its NIC.

Here the source and target builds of every fixture (guest, devices, known bugs) are the pair's: this
module overrides cpr_source_build and cpr_target_build.
"""

from __future__ import annotations

import pytest

from pytest_cpr.errors import TransferFailed
from pytest_cpr.fixtures import host_unavailable, one_line_errors, probe_build
from pytest_cpr.qemu.cross import CrossPair, Direction, Outcome, cross_pair
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.settings import CprSettings
from pytest_cpr.vfio_fixtures import PassthroughGuest

pytestmark = pytest.mark.cpr(mode="cpr-transfer")
NO_CROSS = ("no second QEMU build for the cross-version passthrough tests: set --cpr-cross-qemu / CPR_CROSS_QEMU "
            "to a build with VFIO CPR of another version (`cpr-image build qemu-forky`; the virtual host "
            "shares it when cached)")


@pytest.fixture(scope="session", params=list(Direction), ids=str)
def cpr_cross_pair(request: pytest.FixtureRequest, cpr_settings: CprSettings) -> CrossPair:
    """The pair of this direction: --cpr-qemu and --cpr-cross-qemu, the older one first on an upgrade."""
    if not cpr_settings.cross_qemu:  # the operator's choice (like no [[mdev]]): a skip even with --cpr-strict
        host_unavailable(NO_CROSS, cpr_settings, lacking=False)
    first = probe_build(cpr_settings, cpr_settings.qemu, "--cpr-qemu / CPR_QEMU")
    second = probe_build(cpr_settings, cpr_settings.cross_qemu, "--cpr-cross-qemu / CPR_CROSS_QEMU")
    with one_line_errors("cross-version pair"):
        return cross_pair(first, second, request.param)


@pytest.fixture(scope="session")
def cpr_source_build(cpr_cross_pair: CrossPair) -> QemuBuild:
    return cpr_cross_pair.source


@pytest.fixture(scope="session")
def cpr_target_build(cpr_cross_pair: CrossPair) -> QemuBuild:
    return cpr_cross_pair.target


@pytest.mark.vfio(role="nic")
def test_cross_nic_traffic_through_update(cpr_vfio_guest: PassthroughGuest, cpr_cross_pair: CrossPair,
                                          cpr_thresholds: dict, request: pytest.FixtureRequest) -> None:
    """Source build -> target build of the pair with the NIC passed through, under probe + TCP traffic
    over it. Expected completed: the update and a second one (target -> target: the updated guest is
    itself updatable) pass every check of test_nic_traffic_through_transfer, both QEMUs are the
    pair's builds. Expected refused: the transfer fails, the source keeps the guest (running, one QEMU
    generation, same boot) and its NIC answers, the guest log is clean."""
    guest, pair = cpr_vfio_guest, cpr_cross_pair
    request.node.user_properties.append(("cpr_cross", pair.describe()))
    print(pair.describe())
    if pair.expected is Outcome.COMPLETED:
        first, again = guest.nic_traffic_through_transfers(2, cpr_thresholds)
        got = (first.source.version, first.target.version, again.target.version)
        want = (pair.source.short_version, pair.target.short_version, pair.target.short_version)
        assert got == want, f"the transfers ran {got}, not the pair's builds {want}"
        return
    boot_id = guest.vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with guest.nic_traffic(tcp=False) as traffic:
        try:
            result = guest.vm.transfer()
        except TransferFailed as exc:
            guest.check_source_kept(traffic, boot_id, exc)
        else:
            pytest.fail(f"{pair.describe()}, but the transfer completed ({result.status}); logs {guest.vm.artifacts}")
    guest.check_guest_log()
