"""fd passing like management software, at L0 against a fake sysfs/dev tree (FakeSysfs of
test_vfio_sysfs): the harness finds each device's cdev from sysfs, opens /dev/iommu and the cdevs,
builds `-object iommufd,fd=` / `-device vfio-pci,fd=`, passes the fds to the QEMU it starts with the
devices only (a transfer's new QEMU finds them in CPR state: same arguments, no fds), and closes its
copies; the check that QEMU opened none itself; the setting's bad value; the cpr-exec pinned rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import test_vfio_sysfs
from test_vfio_sysfs import NIC, NVME, FakeSysfs

from pytest_cpr import leftovers
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.errors import CprSettingError
from pytest_cpr.host import procfds, vfio
from pytest_cpr.host.vfio import FdPassing, Passthrough, VfioError
from pytest_cpr.images import GuestImage
from pytest_cpr.kinds import Accel, Backend
from pytest_cpr.machine import Machine, VmConfig
from pytest_cpr.passthrough import exec_pinned_problems
from pytest_cpr.procfs import LockedMemory
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.spec import ExecIncoming, Incoming, RebootIncoming, VmSpec
from pytest_cpr.settings import resolve

fake = test_vfio_sysfs.fake  # the fake kernel (FakeSysfs), as a fixture here too
DEVICES = (Passthrough(NIC, 0, "nic"), Passthrough(NVME, 1, "nvme"))


def _with_cdevs(fake: FakeSysfs) -> FakeSysfs:
    """Both devices with a VFIO cdev (sysfs vfio-dev/vfioN and /dev/vfio/devices/vfioN) and /dev/iommu."""
    fake.device(NIC, group="5")
    fake.device(NVME, ids="1b36:0010", driver="nvme", group="6", cls="0x010802")
    (fake.paths.dev / "vfio" / "devices").mkdir()
    for n, address in enumerate((NIC, NVME), start=3):
        (fake.pci / "devices" / address / "vfio-dev" / f"vfio{n}").mkdir(parents=True)
        (fake.paths.dev / "vfio" / "devices" / f"vfio{n}").touch()
    (fake.paths.dev / "iommu").touch()
    return fake


def _target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_harness_opens_iommu_and_each_cdev_sysfs_names(fake: FakeSysfs) -> None:
    _with_cdevs(fake)
    assert vfio.cdev_path(fake.paths, NVME) == fake.paths.dev / "vfio" / "devices" / "vfio4"
    fds = vfio.open_device_fds(fake.paths, [NIC, NVME])
    try:
        assert _target(fds.iommufd) == str(fake.paths.dev / "iommu")
        assert {a: _target(fd) for a, fd in fds.cdevs.items()} == {
            NIC: str(fake.paths.dev / "vfio/devices/vfio3"), NVME: str(fake.paths.dev / "vfio/devices/vfio4")}
        assert not any(os.get_inheritable(fd) for fd in fds.numbers()), "only the QEMU given them inherits them"
    finally:
        fds.close()
    assert not any(os.path.exists(f"/proc/self/fd/{fd}") and _target(fd).startswith(str(fake.paths.dev))
                   for fd in fds.numbers())


def test_a_device_without_cdev_names_the_kernel_option_and_leaves_nothing_open(fake: FakeSysfs) -> None:
    _with_cdevs(fake)
    (fake.pci / "devices" / NVME / "vfio-dev" / "vfio4").rmdir()
    before = _open_count()
    with pytest.raises(VfioError, match=f"{NVME} has no VFIO device cdev: .*CONFIG_VFIO_DEVICE_CDEV"):
        vfio.open_device_fds(fake.paths, [NIC, NVME])
    (fake.paths.dev / "iommu").unlink()
    with pytest.raises(VfioError, match=r"cannot open .*iommu to pass it to QEMU: No such file"):
        vfio.open_device_fds(fake.paths, [NIC])
    assert _open_count() == before


def test_fd_passing_command_line_iommufd_and_the_legacy_refusal() -> None:
    fds = vfio.DeviceFds(7, {NIC: 8, NVME: 9})
    assert vfio.qemu_args(DEVICES, "iommufd", fds=fds) == [
        "-object", "iommufd,id=iommufd0,fd=7",
        "-device", "vfio-pci,fd=8,id=hostdev0,bus=pcie.0,addr=0x10,iommufd=iommufd0",
        "-device", "vfio-pci,fd=9,id=hostdev1,bus=pcie.0,addr=0x11,iommufd=iommufd0"]
    assert FdPassing(DEVICES).args(fds) == vfio.qemu_args(DEVICES, "iommufd", fds=fds)
    with pytest.raises(vfio.CprUnsupported, match="need the iommufd backend, not legacy: QEMU says 'Use FD passing"):
        vfio.qemu_args(DEVICES, "legacy", fds=fds)


def _machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeSysfs) -> Machine:
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    image = GuestImage(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "rootfs.img", {})
    build = QemuBuild("/usr/bin/qemu-system-x86_64", (11, 1, 3), "", frozenset({"cpr-transfer"}),
                      frozenset(), frozenset())
    m = Machine(VmConfig(name="fd", image=image, source=build, target=build, accel=Accel.KVM,
                         artifacts=tmp_path / "artifacts", fd_passing=FdPassing(DEVICES, fake.paths)))
    m.spec = VmSpec(name="fd", accel=Accel.KVM, memory_mib=512, cpus=1, kernel=None, initrd=None,
                    rootfs=tmp_path / "rootfs.img", extra_fds=(42,))
    return m


def test_only_a_qemu_started_with_the_devices_gets_fds_a_transfer_target_the_same_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeSysfs) -> None:
    _with_cdevs(fake)
    m = _machine(tmp_path, monkeypatch, fake)
    assert m.config.has_vfio_device
    g0 = m.new_generation(0, m.config.source, None)
    fds = m.device_fds
    assert fds is not None and g0.pass_fds == (42, *fds.numbers())
    assert f"iommufd,id=iommufd0,fd={fds.iommufd}" in g0.argv
    assert f"vfio-pci,fd={fds.cdevs[NIC]},id=hostdev0,bus=pcie.0,addr=0x10,iommufd=iommufd0" in g0.argv
    m._close_passed_fds()  # what start_generation does once QEMU started
    assert not [fd for fd in fds.numbers() if os.path.exists(f"/proc/self/fd/{fd}")
                and _target(fd).startswith(str(fake.paths.dev))], "the harness keeps no copy"
    devices = [a for a in g0.argv if a.startswith(("iommufd,", "vfio-pci,"))]
    for gen, incoming in ((1, Incoming(tmp_path / "m.sock", tmp_path / "c.sock")), (2, ExecIncoming(tmp_path / "s"))):
        target = m.new_generation(gen, m.config.target, incoming)  # fds from CPR state: same numbers, none passed
        assert target.pass_fds == (42,)
        assert [a for a in target.argv if a.startswith(("iommufd,", "vfio-pci,"))] == devices
        assert m.device_fds is fds
    rebooted = m.new_generation(3, m.config.target, RebootIncoming(tmp_path / "s"))  # no CPR state: fresh fds
    assert m.device_fds is not fds and m.device_fds is not None
    assert rebooted.pass_fds == (42, *m.device_fds.numbers())
    opened = m.device_fds.numbers()
    m.close()  # a run that ends before that QEMU started: the harness's copies go with the machine
    assert not [fd for fd in opened if os.path.exists(f"/proc/self/fd/{fd}")
                and _target(fd).startswith(str(fake.paths.dev))]


def test_the_check_names_device_files_a_process_opened_beyond_those_passed(tmp_path: Path) -> None:
    fd_dir = tmp_path / "123" / "fd"
    fd_dir.mkdir(parents=True)
    for n, target in {0: "/dev/null", 5: "/dev/iommu", 6: "/dev/vfio/devices/vfio0", 7: "/dev/vfio/vfio",
                      9: "/dev/iommu", 11: "/dev/vfio/devices/vfio0"}.items():
        (fd_dir / str(n)).symlink_to(target)
    fds = procfds.open_fds(123, tmp_path)
    assert procfds.iommufd_files(fds) == {5: "/dev/iommu", 6: "/dev/vfio/devices/vfio0", 9: "/dev/iommu",
                                          11: "/dev/vfio/devices/vfio0"}
    assert procfds.self_opened(fds, (5, 6)) == {9: "/dev/iommu", 11: "/dev/vfio/devices/vfio0"}
    assert procfds.self_opened(fds, (5, 6, 9, 11)) == {}
    assert procfds.open_files(123, tmp_path)[1] == "/dev/iommu"


def test_device_fds_setting_bad_value_names_the_setting_and_the_fix() -> None:
    assert resolve({"device_fds": "on"}, {}, {}).device_fds is True
    assert resolve({}, {"CPR_DEVICE_FDS": "off"}, {"cpr_device_fds": "on"}).device_fds is False
    with pytest.raises(CprSettingError) as err:
        resolve({}, {}, {"cpr_device_fds": "sometimes"})
    assert str(err.value) == ("setting --cpr-device-fds / CPR_DEVICE_FDS / ini cpr_device_fds from ini: 'sometimes' "
                              "is not a boolean; use on or off")


def test_cpr_exec_pinned_rule() -> None:
    result = TransferResult(1, ProcessRef("g0", "11.1.3"), ProcessRef("g1", "11.1.3"), mode="cpr-exec")
    held = LockedMemory(524288, 0)
    assert exec_pinned_problems({"old_before": held, "exec_after": held}, Backend.LEGACY, result) == []
    assert exec_pinned_problems({"old_before": held, "exec_after": LockedMemory(0, 0)}, Backend.LEGACY, result) == [
        "the exec'd QEMU accounts VmLck 0 kB, VmPin 0 kB, the old image held VmLck 524288 kB, VmPin 0 kB"]
    assert "figures missing" in exec_pinned_problems({"old_before": held}, Backend.LEGACY, result)[0]
    unaccounted = LockedMemory(0, 524288, ipc_lock=True)
    assert exec_pinned_problems({"old_before": unaccounted, "exec_after": LockedMemory(0, 0)}, Backend.IOMMUFD,
                                result) == []
    assert "IOPT_PAGES_ACCOUNT_NONE" in result.notes[-1]
