"""Passthrough devices handed to QEMU as file descriptors, the way management software does it: the
harness opens /dev/iommu and the devices' VFIO cdevs itself (-object iommufd,fd=, -device vfio-pci,fd=)
and listens on the cpr channel's socket itself (--cpr-channel-fd), then closes its copies.

What QEMU takes (QEMU source): `-object iommufd,fd=` (backends/iommufd.c, iommufd_backend_complete():
a command-line fd is saved in CPR state; the new QEMU of a transfer takes the value from there and
ignores the number on its command line) and `-device vfio-pci,fd=` (hw/vfio/device.c, vfio_device_set_fd
-> cpr_get_fd_param, the same rule; without id= QEMU blocks cpr-transfer). The legacy backend has
nothing to pass: QEMU has no fd property for a container or group (hw/vfio/container-legacy.c opens
/dev/vfio/vfio and /dev/vfio/<group> itself) and refuses a device fd without iommufd ("Use FD passing
only with iommufd backend", vfio_device_get_name()); there the cpr channel is the one fd passed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from pytest_cpr.cpr import TransferResult
from pytest_cpr.host import procfds, vfio
from pytest_cpr.kinds import Backend, Role
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.settings import CprSettings
from pytest_cpr.vfio_fixtures import PassthroughGuest, VfioDevices, passthrough_vm
from pytest_cpr.vm import CprVM
from pytest_cpr.waits import QEMU_REFUSAL_TIMEOUT_S

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def _legacy_refuses_a_device_fd(devices: VfioDevices, build: QemuBuild) -> str:
    """QEMU started with the NIC's cdev as `-device vfio-pci,fd=` and no iommufd: it must refuse with
    QEMU's words (and exit) before it runs anything. Returns what it said."""
    nic = devices.with_role(Role.NIC)[0][1]
    fd = os.open(vfio.cdev_path(devices.host.paths, nic.address), os.O_RDWR | os.O_CLOEXEC)
    try:
        argv = [build.binary, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                "-device", nic.device_arg(None, fd=fd)]
        try:
            done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True,
                                  timeout=QEMU_REFUSAL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU {build.short_version} took a device fd with the legacy backend and kept "
                                 f"running ({QEMU_REFUSAL_TIMEOUT_S:g} s): {' '.join(argv)}") from None
    finally:
        os.close(fd)
    assert done.returncode != 0 and vfio.LEGACY_FD_REFUSAL in done.stderr, \
        f"QEMU must refuse a vfio-pci fd without iommufd ({vfio.LEGACY_FD_REFUSAL!r}): exit {done.returncode}, " \
        f"stderr {done.stderr.strip()!r}"
    return done.stderr.strip()


@pytest.mark.vfio(role="nic")
def test_fd_passing_transfer_keeps_nic_traffic(cpr_vfio: VfioDevices, cpr_vm_factory: Callable[..., CprVM],
                                               cpr_settings: CprSettings, cpr_target_build: QemuBuild,
                                               cpr_source_build: QemuBuild, cpr_thresholds: dict,
                                               request: pytest.FixtureRequest) -> None:
    """Two transfers of a guest with a passthrough NIC, every fd management software would pass
    passed, the cpr channel as an already-listening socket: NIC traffic and every passthrough check
    as in test_nic_traffic_through_transfer. iommufd: QEMU holds exactly the /dev/iommu and cdev fds
    the harness passed (it opened none itself: the control is
    test_fd_passing_check_names_devices_qemu_opened_itself), the harness holds none once QEMU started,
    and each new QEMU holds the same device files (from CPR state) and no more. legacy: QEMU refuses
    a device fd with its words, so the devices go by path and the cpr channel is the fd passed. Each
    transfer records what was passed (cpr_t<n>_fd_passing)."""
    if (lacking := cpr_target_build.missing("cpr-channel-fd")) is not None:
        pytest.skip(lacking)
    iommufd = cpr_vfio.backend == Backend.IOMMUFD
    if not iommufd:
        said = _legacy_refuses_a_device_fd(cpr_vfio, cpr_source_build)
        print(f"QEMU refused a device fd with the legacy backend: {said}")
    vm = passthrough_vm(cpr_vfio, cpr_vm_factory, cpr_settings, device_fds=iommufd, cpr_channel_fd=True)
    vm.boot()
    passed = vm.machine.device_fds.numbers() if vm.machine.device_fds is not None else ()
    held = procfds.iommufd_files(procfds.open_fds(vm.current.pid))
    if iommufd:
        assert len(passed) == 1 + len(cpr_vfio.devices), f"fds passed: {passed}"
        own = procfds.self_opened(procfds.open_fds(vm.current.pid), passed)
        assert not own, f"QEMU opened {own} itself though the harness passed it fds {passed}"
        assert sorted(held) == sorted(passed), f"QEMU holds {held}, the harness passed {passed}"
        ours = procfds.iommufd_files(procfds.open_fds(os.getpid()))
        assert not ours, f"the harness kept its copies of the fds it passed: {ours}"

    def same_devices(result: TransferResult) -> None:
        now = procfds.iommufd_files(procfds.open_fds(vm.current.pid))
        assert sorted(now.values()) == sorted(held.values()), \
            f"transfer {result.index}: the new QEMU holds {now}, the first one held {held} (fds from CPR state)"

    results = PassthroughGuest(vm, cpr_vfio).nic_traffic_through_transfers(2, cpr_thresholds, same_devices)
    expected = "iommufd,vfio-cdev,cpr-channel" if iommufd else "cpr-channel"
    assert [r.fd_passing for r in results] == [expected] * 2
    props = dict(request.node.user_properties)
    assert props["cpr_t1_fd_passing"] == props["cpr_t2_fd_passing"] == expected


@pytest.mark.vfio(role="nic", backend="iommufd")
def test_fd_passing_check_names_devices_qemu_opened_itself(cpr_vfio: VfioDevices,
                                                           cpr_vm_factory: Callable[..., CprVM],
                                                           cpr_settings: CprSettings) -> None:
    """Control of the fd-passing check: a QEMU started without fd passing (devices by path) opens
    /dev/iommu and the NIC's cdev itself, and the check (procfds.self_opened) names both. QEMU is only
    launched (devices realized, no guest boot waited for)."""
    vm = passthrough_vm(cpr_vfio, cpr_vm_factory, cpr_settings, device_fds=False)
    proc = vm.launch()
    own = procfds.self_opened(procfds.open_fds(proc.pid), ())
    cdev = str(vfio.cdev_path(cpr_vfio.host.paths, cpr_vfio.addresses[0]))
    assert sorted(own.values()) == sorted(["/dev/iommu", cdev]), \
        f"a QEMU given paths must open /dev/iommu and {cdev} itself; the check saw {own}"
