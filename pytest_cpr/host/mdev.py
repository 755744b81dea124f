"""Mediated devices (mdev) on the host: one instance of a host config [[mdev]] type per test.

QEMU refuses cpr-transfer (and cpr-exec) of a guest with an mdev on the legacy VFIO container
("CPR does not support vfio mdev <uuid>", hw/vfio/container-legacy.c); tests/hardware checks that
the refusal is clean. The kernel's interface (Documentation/driver-api/vfio-mediated-device.rst):
writing a UUID to /sys/class/mdev_bus/<parent>/mdev_supported_types/<type>/create makes the instance
/sys/bus/mdev/devices/<uuid>; writing 1 to its `remove` file removes it again.

A record on disk (pytest_cpr.leftovers, kind "mdev") lets the next run remove the instance of a run
that was killed. All paths are parameters (HostPaths) so unit tests run against a fake sysfs tree.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_cpr import leftovers
from pytest_cpr.errors import CprError, CprSettingError, CprTimeout
from pytest_cpr.host.hostconfig import HostPaths, mdev_type_dir, write_attr
from pytest_cpr.host.vfio import GUEST_SLOT_BASE, holders

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")  # an instance's name
LAST_GUEST_SLOT = 0x1e  # q35: slot 0x1f is the ICH9 LPC/SATA/SMBus function block


class MdevError(CprError):
    """Creating or removing a mediated device failed; the message names the instance and the fix."""


def mdev_path(paths: HostPaths, uuid: str) -> Path:
    """Where an instance appears: /sys/bus/mdev/devices/<uuid> (QEMU's sysfsdev)."""
    return paths.sysfs / "bus" / "mdev" / "devices" / uuid


def guest_slot(device_count: int, index: int = 0) -> int:
    """Guest PCI slot of mdev `index`: right after the slots of the host config's passthrough devices
    (GUEST_SLOT_BASE + their index), so a guest with both never has two devices on one slot."""
    slot = GUEST_SLOT_BASE + device_count + index
    if slot > LAST_GUEST_SLOT:
        raise CprSettingError(f"mdev {index} would sit at guest PCI slot 0x{slot:x}, past 0x{LAST_GUEST_SLOT:x} "
                              f"(the host config names {device_count} devices): name fewer [[device]] entries")
    return slot


def _write(path: Path, text: str) -> None:  # the seam unit tests replace with a fake kernel
    write_attr(path, text, MdevError, "run as root and check the parent driver's messages in the host's dmesg")


def _wait(done: Callable[[], bool], timeout: float, poll: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise CprTimeout(f"{what} within {timeout:g}s; see the host's dmesg")
        time.sleep(poll)


def remove_instance(paths: HostPaths, uuid: str, timeout: float = 5.0, poll: float = 0.05) -> bool:
    """Remove the instance (write 1 to its `remove`); False if it was already gone. Refuses while a
    process holds its VFIO group open: the kernel would block the write until the holder lets go."""
    path = mdev_path(paths, uuid)
    if not path.exists():
        return False
    group = iommu_group_of_mdev(paths, uuid)
    if group is not None and (pids := holders(paths, group)):
        raise MdevError(f"mdev {uuid}: its VFIO group {group} is still held open by pid(s) {pids}: not "
                        "removing it (the write would block); stop those QEMU processes first")
    _write(path / "remove", "1")
    _wait(lambda: not path.exists(), timeout, poll, f"mdev {uuid} still present after writing 1 to "
          f"{path / 'remove'}")
    return True


def iommu_group_of_mdev(paths: HostPaths, uuid: str) -> str | None:
    link = mdev_path(paths, uuid) / "iommu_group"
    return Path(link.readlink()).name if link.is_symlink() else None


def clean_mdev(rec: dict[str, Any]) -> str:
    paths = HostPaths(Path(rec.get("sysfs", "/sys")), Path(rec.get("dev", "/dev")))
    uuid = str(rec["key"])
    if remove_instance(paths, uuid):
        return f"removed stale mdev {uuid} ({rec.get('type')})"
    return f"mdev {uuid} already gone"


def mdev_record_problem(rec: dict[str, Any]) -> str | None:
    if not UUID.match(str(rec["key"])):
        return f"key {rec['key']!r} is not a UUID"
    return None


class Mdev:
    """Context manager: one new instance of `kind` under `parent`, removed on exit (also on an
    exception or Ctrl-C). Usable without pytest. The guest sees it at `guest_address`: guest PCI
    slot `slot` (default: the last free one on q35, clear of passthrough devices; the pytest fixture
    gives guest_slot(number of passthrough devices))."""

    def __init__(self, parent: str, kind: str, paths: HostPaths = HostPaths(),  # noqa: B008
                 slot: int = LAST_GUEST_SLOT, timeout: float = 5.0, poll: float = 0.05,
                 record: bool = True) -> None:
        self.parent, self.type, self.paths = parent, kind, paths
        self.slot, self.timeout, self.poll, self.record = slot, timeout, poll, record
        self.uuid = str(uuidlib.uuid4())
        self.created = False

    @property
    def sysfsdev(self) -> Path:
        return mdev_path(self.paths, self.uuid)

    @property
    def iommu_group(self) -> str | None:
        """The instance's (emulated) IOMMU group: /dev/vfio/<group> with the legacy container."""
        return iommu_group_of_mdev(self.paths, self.uuid)

    @property
    def guest_address(self) -> str:
        return f"0000:00:{self.slot:02x}.0"

    def cdev_missing(self) -> str | None:
        """Why the instance has no vfio cdev (/dev/vfio/devices/vfioN, which QEMU opens for iommufd), or None."""
        names = [d.name for d in (self.sysfsdev / "vfio-dev").glob("vfio*")]
        if not names:
            return (f"mdev {self.uuid} has no {self.sysfsdev}/vfio-dev/vfio*: no vfio device for it (is its "
                    "parent's vfio driver bound?)")
        if not (cdev := self.paths.dev / "vfio" / "devices" / names[0]).exists():
            return (f"no {cdev}: an mdev on iommufd is opened by its vfio cdev (kernel with "
                    "CONFIG_VFIO_DEVICE_CDEV)")
        return None

    def qemu_args(self, qdev_id: str = "mdev0", iommufd_id: str | None = None) -> list[str]:
        """vfio-pci on the legacy container (no iommufd=: the setup where QEMU blocks CPR), or with
        `iommufd_id` on an `-object iommufd` of its own (the mdev's vfio cdev and an iommufd access)."""
        device = f"vfio-pci,sysfsdev={self.sysfsdev},id={qdev_id},bus=pcie.0,addr=0x{self.slot:x}"
        if iommufd_id is None:
            return ["-device", device]
        return ["-object", f"iommufd,id={iommufd_id}", "-device", f"{device},iommufd={iommufd_id}"]

    def create(self) -> Mdev:
        """Record the instance first (a kill right after the write still leaves a record), then create
        it and wait until the kernel shows it."""
        create = mdev_type_dir(self.paths, self.parent, self.type) / "create"
        if not create.exists():
            raise MdevError(f"{create} does not exist: no mdev type {self.type!r} under parent "
                            f"{self.parent!r}; check [[mdev]] in the host config")
        if self.record:
            leftovers.record("mdev", self.uuid, path=str(self.sysfsdev), parent=self.parent, type=self.type,
                             sysfs=str(self.paths.sysfs), dev=str(self.paths.dev))
        try:
            _write(create, self.uuid)
            self.created = True
            _wait(self.sysfsdev.exists, self.timeout, self.poll,
                  f"mdev {self.uuid} ({self.parent}/{self.type}) did not appear at {self.sysfsdev}")
        except BaseException:
            with contextlib.suppress(CprError):  # the first error says more; a kept record cleans later
                self.remove()
            raise
        return self

    def remove(self) -> str:
        """Remove the instance and its record; what was done. Leaves the record when it cannot remove
        (the next run's cleanup does it)."""
        gone = remove_instance(self.paths, self.uuid, self.timeout, self.poll)
        if self.record:
            leftovers.forget("mdev", self.uuid)
        self.created = False
        return f"removed mdev {self.uuid}" if gone else f"mdev {self.uuid} already gone"

    def __enter__(self) -> Mdev:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Mdev({self.parent}/{self.type} {self.uuid} at guest {self.guest_address})"
