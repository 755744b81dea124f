"""VFIO on the host: IOMMU groups, binding devices to vfio-pci and back, the kernel feature probe
and the QEMU arguments of passed-through devices.

Binding uses driver_override (the kernel's documented way): every non-bridge device of the IOMMU
group goes to vfio-pci, and `restore()` gives each back to the driver it had. A record on disk
(pytest_cpr.leftovers, kind "vfio") lets the next run restore bindings of a run that was killed.
All paths are parameters (HostPaths) so unit tests run against a fake sysfs tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_cpr import leftovers
from pytest_cpr.errors import CprError, CprUnsupported
from pytest_cpr.host import inuse
from pytest_cpr.host.hostconfig import (
    HostPaths,
    describe_device,
    driver_of,
    group_members,
    iommu_group_of,
    is_bridge,
    read_attr,
    write_attr,
)
from pytest_cpr.host.posted import NOT_PROBED, PostedInterrupts, posted_interrupts
from pytest_cpr.kinds import Backend, values
from pytest_cpr.procfs import IrqLine, parse_interrupts

VFIO_DRIVER = "vfio-pci"
CLAIM_WAIT = 60.0  # seconds a claim waits for another run's lock on the same device


# ---- ioctl numbers (linux/vfio.h, linux/iommufd.h): _IO(type, nr) = type << 8 | nr
def _io(kind: str, nr: int) -> int:
    return (ord(kind) << 8) | nr


VFIO_TYPE, VFIO_BASE = ";", 100
VFIO_GET_API_VERSION = _io(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _io(VFIO_TYPE, VFIO_BASE + 1)
VFIO_IOMMU_MAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _io(VFIO_TYPE, VFIO_BASE + 14)
VFIO_SET_IOMMU = _io(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _io(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _io(VFIO_TYPE, VFIO_BASE + 4)
VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10
VFIO_GROUP_FLAGS_VIABLE = 1

IOMMUFD_TYPE = ";"
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMU_IOAS_CHANGE_PROCESS = _io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_CHANGE_PROCESS)


class VfioError(CprError):
    """Binding or restoring a device failed; the message names the device and what to do."""


# ---- binding
@dataclass
class DeviceBinding:
    """One device moved to vfio-pci, with what it had before."""

    address: str
    group: str
    driver: str | None  # original driver (None: none bound)
    override: str | None  # original driver_override ((null) -> None)
    named: bool  # named by the caller (else: a group companion)


def _write(path: Path, text: str) -> None:  # the seam unit tests replace with a fake kernel
    write_attr(path, text, VfioError, "run as root and check that nothing holds the device")


def _override_of(paths: HostPaths, address: str) -> str | None:
    text = read_attr(paths.pci(address) / "driver_override")
    return None if text in (None, "", "(null)") else text


def _wait_driver(paths: HostPaths, address: str, want: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while driver_of(paths, address) != want:
        if time.monotonic() > deadline:
            raise VfioError(f"{address}: driver is {driver_of(paths, address)!r} {timeout:.0f}s after "
                            f"binding, expected {want!r}; see the host's dmesg")
        time.sleep(0.01)


def holders(paths: HostPaths, group: str, proc: Path | None = None) -> list[int]:
    """PIDs holding the group (/dev/vfio/<group>), a member's cdev (/dev/vfio/devices/vfioN) or one of
    a member's sysfs files (config, resourceN) open: unbinding would block until they let go."""
    targets = {str(paths.dev / "vfio" / group)}
    prefixes = []
    for member in group_members(paths, group):
        targets.update(str(paths.dev / "vfio" / "devices" / c.name)
                       for c in (paths.pci(member) / "vfio-dev").glob("vfio*"))
        with contextlib.suppress(OSError):
            prefixes.append(str(paths.pci(member).resolve(strict=True)) + "/")
    pids = []
    for fd_dir in (proc or paths.proc).glob("[0-9]*/fd"):
        if any(t in targets or t.startswith(tuple(prefixes)) for t in _fd_targets(fd_dir)):
            pids.append(int(fd_dir.parent.name))
    return pids


def _fd_targets(fd_dir: Path) -> Iterator[str]:
    """What a process's open files are (fds closing, or a process ending, while read are skipped)."""
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                yield os.readlink(fd)


def bind_device(paths: HostPaths, address: str, timeout: float = 10.0) -> None:
    """driver_override=vfio-pci, unbind from the current driver, reprobe; waits for vfio-pci.
    Refuses a device the host uses (a mount, swap, a holder, the root disk, a routed interface); the
    data-signature check, which the host config's `scratch` relaxes, is done when the config loads."""
    dev = paths.pci(address)
    if driver_of(paths, address) == VFIO_DRIVER:
        return
    if reason := inuse.pci_use(paths, address, data=False):
        raise VfioError(f"not binding {describe_device(paths, address)} to vfio-pci: it {reason}")
    _write(dev / "driver_override", VFIO_DRIVER)
    if driver_of(paths, address) is not None:
        _write(dev / "driver" / "unbind", address)
    _write(paths.sysfs / "bus" / "pci" / "drivers_probe", address)
    _wait_driver(paths, address, VFIO_DRIVER, timeout)


def restore_device(paths: HostPaths, address: str, driver: str | None, override: str | None,
                   timeout: float = 10.0) -> str:
    """Give a device back its original driver_override and driver; returns what was done."""
    dev = paths.pci(address)
    if not dev.exists():
        return f"{address}: gone from the host, nothing to restore"
    current = driver_of(paths, address)
    if current == driver and _override_of(paths, address) == override:
        return f"{address}: already on {driver or 'no driver'}"
    if current is not None and current != driver:
        _write(dev / "driver" / "unbind", address)
    _write(dev / "driver_override", override or "\n")
    if driver is not None and driver_of(paths, address) is None:
        _write(paths.sysfs / "bus" / "pci" / "drivers_probe", address)
        _wait_driver(paths, address, driver, timeout)
    return f"{address}: restored to {driver or 'no driver'}"


def _record_key(address: str) -> str:
    return address.replace(":", "_")


def vfio_record_problem(rec: dict[str, Any]) -> str | None:
    if "address" not in rec or rec["key"] != _record_key(rec["address"]):
        return f"key {rec['key']!r} is not the record key of its address {rec.get('address')!r}"
    return None


def clean_vfio(rec: dict[str, Any]) -> str:
    """Undo a killed run's binding, only from the state the run left (vfio-pci, or no driver with our
    override): a driver bound since is an admin's, and a group someone holds would block the unbind."""
    paths = HostPaths(Path(rec.get("sysfs", "/sys")), Path(rec.get("dev", "/dev")))
    address, driver = rec["address"], rec.get("driver")
    current = driver_of(paths, address)
    ours = current == VFIO_DRIVER or (current is None and _override_of(paths, address) == VFIO_DRIVER)
    if paths.pci(address).exists() and current != driver and not ours:
        return (f"vfio binding of a killed run: {address} left alone: it is on "
                    f"{current or 'no driver'} now (bound since), not on vfio-pci")
    group = iommu_group_of(paths, address)
    if group is not None and current == VFIO_DRIVER and (pids := holders(paths, group)):
        raise VfioError(f"{address}: IOMMU group {group} is held open by pid(s) {pids}: not unbinding it (the "
                        "write would block); stop those processes, then run python -m pytest_cpr.cleanup")
    return "vfio binding of a killed run: " + restore_device(paths, address, driver, rec.get("override"))


class VfioBinding:
    """Context manager: the named devices and their IOMMU group companions on vfio-pci, restored
    on exit (also on an exception or Ctrl-C). Usable without pytest."""

    def __init__(self, addresses: Sequence[str], paths: HostPaths = HostPaths(),  # noqa: B008
                 timeout: float = 10.0, record: bool = True, lock_timeout: float = CLAIM_WAIT) -> None:
        """record: keep a record (a killed run's binding is restored later) and a claim lock per device
        (another run claiming it waits up to `lock_timeout` seconds, then fails naming this pid)."""
        self.addresses = list(addresses)
        self.paths, self.timeout, self.record, self.lock_timeout = paths, timeout, record, lock_timeout
        self.bound: list[DeviceBinding] = []
        self.locks: dict[str, leftovers.ClaimLock] = {}

    def plan(self) -> list[DeviceBinding]:
        """Every device that will move: the named ones and the non-bridge members of their groups."""
        out: dict[str, DeviceBinding] = {}
        for address in self.addresses:
            group = iommu_group_of(self.paths, address)
            if group is None:
                raise VfioError(f"{address} has no IOMMU group: boot with intel_iommu=on iommu=pt "
                                "(or amd_iommu=on iommu=pt)")
            for member in group_members(self.paths, group) or [address]:
                if member in out or is_bridge(self.paths, member):
                    continue
                out[member] = DeviceBinding(member, group, driver_of(self.paths, member),
                                            _override_of(self.paths, member), member in self.addresses)
        return list(out.values())

    def _claim(self, b: DeviceBinding) -> None:
        """Refuse a device another live run has bound; record ours before touching sysfs. A record left
        by a run that could not restore keeps its original driver (the device may be on vfio-pci now)."""
        if self.record and b.address not in self.locks:
            try:
                self.locks[b.address] = leftovers.ClaimLock(f"vfio-{b.address}").acquire(self.lock_timeout)
            except leftovers.LockTimeout as exc:
                raise VfioError(f"{b.address} is claimed by another test run: lock {exc}; run device tests one "
                                "at a time per device (pytest-xdist: --dist loadgroup)") from None
            # the run we waited for has given the device back since plan() looked at it
            b.driver, b.override = driver_of(self.paths, b.address), _override_of(self.paths, b.address)
        for rec in leftovers.records():
            if rec["kind"] != "vfio" or rec.get("address") != b.address:
                continue
            owner = int(rec.get("owner", 0))
            if owner != os.getpid() and not leftovers.is_stale(rec):
                raise VfioError(f"{b.address} is bound for another test run (pid {owner}); run device "
                                "tests one at a time per device (pytest-xdist: --dist loadgroup)")
            b.driver, b.override = rec.get("driver"), rec.get("override")
        if self.record:
            leftovers.record("vfio", _record_key(b.address), address=b.address, driver=b.driver,
                             override=b.override, sysfs=str(self.paths.sysfs), dev=str(self.paths.dev))

    def bind(self) -> list[DeviceBinding]:
        try:
            for b in self.plan():
                self._claim(b)
                self.bound.append(b)
                bind_device(self.paths, b.address, self.timeout)
        except BaseException:
            self.restore()
            self._release_unbound()
            raise
        return self.bound

    def _release_unbound(self) -> None:
        """Locks of devices this binding never got to bind (a failed claim)."""
        for address in [a for a in self.locks if a not in {b.address for b in self.bound}]:
            self.locks.pop(address).release()

    def groups(self) -> list[str]:
        return sorted({b.group for b in self.bound}, key=lambda g: int(g) if g.isdigit() else 0)

    def restore(self) -> list[str]:
        """Every bound device back to its original driver; errors are collected, not raised early,
        so one stuck device does not keep the others on vfio-pci."""
        done, errors = [], []
        for group in self.groups():
            if pids := holders(self.paths, group):
                errors.append(f"IOMMU group {group} is still held open by pid(s) {pids}: not unbinding "
                              "(it would block); stop those QEMU processes")
        while self.bound and not errors:
            b = self.bound.pop()
            try:
                done.append(restore_device(self.paths, b.address, b.driver, b.override, self.timeout))
                if self.record:
                    leftovers.forget("vfio", _record_key(b.address))
                if lock := self.locks.pop(b.address, None):
                    lock.release()
            except VfioError as exc:
                errors.append(str(exc))
        if errors:
            raise VfioError("; ".join(errors))
        return done

    def __enter__(self) -> VfioBinding:
        self.bind()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ---- kernel feature probe
def _ioctl_int(fd: int, request: int, arg: int) -> int:
    return fcntl.ioctl(fd, request, arg)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def container_extensions(dev: Path) -> dict[str, bool | int] | str:
    """API version and extensions of an empty /dev/vfio/vfio container (or why it cannot be asked).
    VFIO_UPDATE_VADDR answers 0 until a group is attached (type1 decides per container)."""
    try:
        with _opened(dev / "vfio" / "vfio") as fd:
            return {"api": _ioctl_int(fd, VFIO_GET_API_VERSION, 0),
                    "type1v2": bool(_ioctl_int(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)),
                    "unmap_all": bool(_ioctl_int(fd, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL))}
    except OSError as exc:
        return f"/dev/vfio/vfio: {exc.strerror}"


def legacy_cpr_missing(group: str, dev: Path = Path("/dev")) -> str | None:
    """Ask the kernel what QEMU asks before allowing cpr-transfer with a legacy container: attach the
    (bound, viable) group to a fresh type1v2 container and check VFIO_UPDATE_VADDR and
    VFIO_UNMAP_ALL. None if both are there, else the reason (QEMU blocks cpr-transfer then)."""
    try:
        with _opened(dev / "vfio" / "vfio") as container, _opened(dev / "vfio" / group) as gfd:
            status = bytearray(struct.pack("II", 8, 0))
            fcntl.ioctl(gfd, VFIO_GROUP_GET_STATUS, status)
            if not struct.unpack("II", status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                return f"IOMMU group {group} is not viable: a member is not bound to vfio-pci"
            fcntl.ioctl(gfd, VFIO_GROUP_SET_CONTAINER, struct.pack("i", container))
            _ioctl_int(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
            missing = [name for name, ext in (("VFIO_UPDATE_VADDR", VFIO_UPDATE_VADDR),
                                              ("VFIO_UNMAP_ALL", VFIO_UNMAP_ALL))
                       if not _ioctl_int(container, VFIO_CHECK_EXTENSION, ext)]
    except OSError as exc:
        return f"cannot ask the legacy VFIO container of group {group}: {exc.strerror} ({exc.filename or ''})"
    if missing:
        return (f"the host kernel's VFIO container lacks {' and '.join(missing)} (e.g. /dev/vfio/vfio "
                "provided by iommufd's compat layer): QEMU blocks cpr-transfer with the legacy backend")
    return None


def iommufd_change_process(dev: Path = Path("/dev")) -> bool | str:
    """IOMMU_IOAS_CHANGE_PROCESS on a fresh /dev/iommu, as QEMU's iommufd_change_process_capable()
    does (a no-op when nothing is mapped): True if the kernel knows it, else the reason."""
    try:
        with _opened(dev / "iommu") as fd:
            fcntl.ioctl(fd, IOMMU_IOAS_CHANGE_PROCESS, struct.pack("II", 8, 0))
    except FileNotFoundError:
        return "/dev/iommu missing (modprobe iommufd; kernel with CONFIG_IOMMUFD)"
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return ("the host kernel lacks IOMMU_IOAS_CHANGE_PROCESS (Linux >= 6.14): QEMU blocks "
                    "cpr-transfer with the iommufd backend")
        return f"/dev/iommu: {exc.strerror}"
    return True


def hugepages(sysfs: Path = Path("/sys")) -> dict[str, int]:
    """Huge page pools: size in kB -> (total, free), read from sysfs."""
    out = {}
    for pool in sorted((sysfs / "kernel" / "mm" / "hugepages").glob("hugepages-*kB")):
        size = pool.name.removeprefix("hugepages-").removesuffix("kB")
        total, free = read_attr(pool / "nr_hugepages"), read_attr(pool / "free_hugepages")
        out[f"{size}kB total"] = int(total or 0)
        out[f"{size}kB free"] = int(free or 0)
    return out


@dataclass
class HostProbe:
    """What the host kernel offers for VFIO CPR, asked once per session."""

    groups: dict[str, list[str]]
    container: dict[str, bool | int] | str
    iommufd: bool  # /dev/iommu exists
    change_process: bool | str  # IOMMU_IOAS_CHANGE_PROCESS works (True), or why not
    vfio_cdev: bool | None  # VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV); None: unknown until a device is bound
    kvm: bool
    hugepages: dict[str, int] = field(default_factory=dict)
    posted: PostedInterrupts = NOT_PROBED

    def missing(self, backend: str) -> str | None:
        """None if the kernel serves `backend`, else the reason."""
        if not self.groups:
            return ("no IOMMU groups on this host: boot with intel_iommu=on iommu=pt "
                    "(or amd_iommu=on iommu=pt)")
        if backend == Backend.LEGACY:
            if isinstance(self.container, str):
                return f"legacy VFIO container unusable: {self.container}"
            if not self.container.get("unmap_all"):
                return "the host kernel's VFIO container lacks VFIO_UNMAP_ALL: QEMU blocks cpr-transfer"
            return None
        if not self.iommufd:
            return "no /dev/iommu: modprobe iommufd (the host kernel needs CONFIG_IOMMUFD)"
        if self.vfio_cdev is False:
            return "the host kernel is built without CONFIG_VFIO_DEVICE_CDEV (no /dev/vfio/devices): iommufd needs it"
        return None  # unknown: checked per device once it is bound (cdev_missing)

    def header_lines(self) -> list[str]:
        ext = self.container if isinstance(self.container, str) else ", ".join(
            f"{k}={v}" for k, v in self.container.items()) + ", update_vaddr=checked per group"
        groups = "; ".join(f"{g}: {' '.join(m)}" for g, m in list(self.groups.items())[:8])
        more = f" (+{len(self.groups) - 8} more)" if len(self.groups) > 8 else ""
        return [f"  IOMMU groups: {len(self.groups)}{': ' + groups + more if groups else ''}",
                f"  /dev/vfio/vfio: {ext}",
                f"  /dev/iommu: {self.iommufd}; IOMMU_IOAS_CHANGE_PROCESS: "
                f"{'supported' if self.change_process is True else self.change_process}"
                f"; VFIO device cdevs: {_cdev_text(self.vfio_cdev)}",
                f"  KVM: {self.kvm}; hugepages: {self.hugepages or 'none'}",
                self.posted.header_line()]


def _cdev_text(cdev: bool | None) -> str:
    if cdev is None:
        return "unknown until a device is bound"
    return "yes" if cdev else "no (CONFIG_VFIO_DEVICE_CDEV off)"


def kernel_config(paths: HostPaths) -> str | None:
    """The running kernel's build config (/proc/config.gz or /boot/config-<release>), if readable."""
    root = paths.sysfs.parent
    with contextlib.suppress(OSError):
        return gzip.decompress((root / "proc/config.gz").read_bytes()).decode(errors="replace")
    with contextlib.suppress(OSError):
        return (root / "boot" / f"config-{os.uname().release}").read_text(errors="replace")
    return None


def vfio_cdev_support(paths: HostPaths) -> bool | None:
    """Whether the kernel makes VFIO device cdevs (iommufd needs them). /dev/vfio/devices only appears
    once a device is bound to a vfio driver, so before that the kernel config answers, if readable."""
    if (paths.dev / "vfio" / "devices").is_dir():
        return True
    config = kernel_config(paths)
    if config is None:
        return None
    return "CONFIG_VFIO_DEVICE_CDEV=y" in config


def iommu_groups(paths: HostPaths) -> dict[str, list[str]]:
    root = paths.sysfs / "kernel" / "iommu_groups"
    if not root.is_dir():
        return {}
    groups = {g.name: group_members(paths, g.name) for g in root.iterdir()}
    return dict(sorted(groups.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))


def probe_host(paths: HostPaths = HostPaths()) -> HostProbe:  # noqa: B008
    return HostProbe(groups=iommu_groups(paths), container=container_extensions(paths.dev),
                     iommufd=(paths.dev / "iommu").exists(), change_process=iommufd_change_process(paths.dev),
                     vfio_cdev=vfio_cdev_support(paths),
                     kvm=os.access(paths.dev / "kvm", os.R_OK | os.W_OK), hugepages=hugepages(paths.sysfs),
                     posted=posted_interrupts(paths))


def cdev_missing(paths: HostPaths, address: str) -> str | None:
    """iommufd needs the device's VFIO cdev (/sys/bus/pci/devices/<addr>/vfio-dev/vfioN)."""
    if not any((paths.pci(address) / "vfio-dev").glob("vfio*")):
        return f"{address} has no VFIO device cdev: the host kernel lacks CONFIG_VFIO_DEVICE_CDEV"
    return None


def cdev_path(paths: HostPaths, address: str) -> Path:
    """The device's VFIO cdev, /dev/vfio/devices/vfioN, named by sysfs (<addr>/vfio-dev/vfioN)."""
    if (missing := cdev_missing(paths, address)) is not None:
        raise VfioError(missing)
    name = sorted(p.name for p in (paths.pci(address) / "vfio-dev").glob("vfio*"))[0]
    return paths.dev / "vfio" / "devices" / name


@dataclass(frozen=True)
class DeviceFds:
    """fds the harness opened for one QEMU launch, as management software does: /dev/iommu and each
    device's VFIO cdev (by PCI address). Close-on-exec: only the QEMU given them (pass_fds) inherits them."""

    iommufd: int
    cdevs: dict[str, int]

    def numbers(self) -> tuple[int, ...]:
        return (self.iommufd, *self.cdevs.values())

    def close(self) -> None:
        for fd in self.numbers():
            with contextlib.suppress(OSError):
                os.close(fd)


def open_device_fds(paths: HostPaths, addresses: Sequence[str]) -> DeviceFds:
    """Open /dev/iommu and the devices' cdevs (nothing stays open if one fails)."""
    opened: list[int] = []
    try:
        for target in [paths.dev / "iommu", *(cdev_path(paths, a) for a in addresses)]:
            try:
                opened.append(os.open(target, os.O_RDWR | os.O_CLOEXEC))
            except OSError as exc:
                raise VfioError(f"cannot open {target} to pass it to QEMU: {exc.strerror}") from None
        cdevs = dict(zip(addresses, opened[1:], strict=True))
        return DeviceFds(opened[0], cdevs)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


# ---- QEMU arguments
GUEST_SLOT_BASE = 0x10  # guest slots 0x10.. on pcie.0: clear of the slots QEMU auto-assigns (1..)


@dataclass(frozen=True)
class Passthrough:
    """A host device as the guest sees it: fixed guest slot, so the guest finds it by PCI address."""

    address: str
    index: int  # position in the host config: fixes the guest slot
    role: str
    qdev_id: str = ""

    @property
    def id(self) -> str:
        return self.qdev_id or f"hostdev{self.index}"

    @property
    def guest_slot(self) -> int:
        return GUEST_SLOT_BASE + self.index

    @property
    def guest_address(self) -> str:
        return f"0000:00:{self.guest_slot:02x}.0"

    def device_arg(self, iommufd_id: str | None, fd: int | None = None) -> str:
        """vfio-pci by host address, or by an fd of its cdev (then QEMU names it by `id`, which CPR
        needs: QEMU blocks cpr-transfer of an fd-passed device without one, hw/vfio/device.c)."""
        source = f"host={self.address}" if fd is None else f"fd={fd}"
        arg = f"vfio-pci,{source},id={self.id},bus=pcie.0,addr=0x{self.guest_slot:x}"
        return arg + (f",iommufd={iommufd_id}" if iommufd_id else "")


def qemu_args(devices: Sequence[Passthrough], backend: str, iommufd_id: str = "iommufd0",
              fds: DeviceFds | None = None) -> list[str]:
    """-device vfio-pci,... per device; with iommufd, one `-object iommufd` shared by all of them.
    With `fds` (iommufd only: QEMU has no fd property for a legacy container or group, and refuses a
    device fd without iommufd) QEMU gets the iommufd and each device as fds the harness opened."""
    if backend not in values(Backend):
        raise CprUnsupported(f"unknown VFIO backend {backend!r}: use legacy or iommufd")
    if fds is not None and backend != Backend.IOMMUFD:
        raise CprUnsupported(f"VFIO devices passed by fd need the iommufd backend, not {backend}: QEMU says "
                             f"{LEGACY_FD_REFUSAL!r}")
    iommufd = f"iommufd,id={iommufd_id}" + (f",fd={fds.iommufd}" if fds is not None else "")
    args = ["-object", iommufd] if backend == Backend.IOMMUFD and devices else []
    for d in devices:
        args += ["-device", d.device_arg(iommufd_id if backend == Backend.IOMMUFD else None,
                                         fds.cdevs[d.address] if fds is not None else None)]
    return args


# QEMU's words for a vfio-pci fd= without iommufd (hw/vfio/device.c, vfio_device_get_name())
LEGACY_FD_REFUSAL = "Use FD passing only with iommufd backend"


@dataclass(frozen=True)
class FdPassing:
    """Passthrough devices handed to QEMU as fds the harness opens, the way management software does
    (iommufd backend). A QEMU the harness starts with the devices gets fresh fds (open(), args(fds),
    pass_fds, then the harness closes its copies); the new QEMU of cpr-transfer or cpr-exec finds them
    in CPR state instead and ignores the fd numbers on its command line (QEMU's cpr_get_fd_param and
    iommufd_backend_complete()), so it gets the same arguments and no fds."""

    devices: tuple[Passthrough, ...]
    paths: HostPaths = field(default_factory=HostPaths)
    iommufd_id: str = "iommufd0"

    def open(self) -> DeviceFds:
        return open_device_fds(self.paths, [d.address for d in self.devices])

    def args(self, fds: DeviceFds) -> list[str]:
        return qemu_args(self.devices, Backend.IOMMUFD, self.iommufd_id, fds)


# ---- host-side observation during a transfer
HOST_LOG_FAILURES = re.compile(
    r"irq bypass consumer .*registration fails|vfio.*(fail|error|timed out)|DMAR: \[DMA (Read|Write)|"
    r"DMAR: .*fault|AMD-Vi: .*(IO_PAGE_FAULT|fault)|iommufd.*(fail|error)|BUG:|WARNING:|Call Trace",
    re.IGNORECASE,
)


class HostKernelLog:
    """Kernel log records written between start() and read(), from /dev/kmsg (no parsing of dmesg
    output, no races with other readers: each opener of /dev/kmsg has its own position)."""

    def __init__(self, dev: Path = Path("/dev")) -> None:
        self.path = dev / "kmsg"
        self.fd: int | None = None
        self.lines: list[str] = []

    def start(self) -> HostKernelLog:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self.fd, 0, os.SEEK_END)
        return self

    def read(self) -> list[str]:
        if self.fd is None:
            return self.lines
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten records: carry on from the next one
                    continue
                raise
            if not record:
                break
            text = record.decode(errors="replace")
            self.lines.append(text.split(";", 1)[-1].split("\n", 1)[0])
        return self.lines

    def failures(self) -> list[str]:
        return [line for line in self.read() if HOST_LOG_FAILURES.search(line)]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> HostKernelLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_vfio_irqs(addresses: Sequence[str] | None, proc: Path = Path("/proc")) -> dict[str, IrqLine]:
    """The host's vfio interrupt lines of the devices (e.g. 'vfio-msix[0](0000:01:00.0)'); None: of
    every device."""
    lines = parse_interrupts((proc / "interrupts").read_text())
    return {k: v for k, v in lines.items()
            if v.name.startswith("vfio") and (addresses is None or any(a in v.name for a in addresses))}


def host_vfio_irq_rates(interval: float = 1.0, proc: Path = Path("/proc")) -> dict[str, float]:
    """Interrupts per second of every host vfio line over `interval` seconds (a measurement window);
    empty when there are none or /proc/interrupts is unreadable."""
    try:
        first = host_vfio_irqs(None, proc)
        if not first:
            return {}
        time.sleep(interval)
        second = host_vfio_irqs(None, proc)
    except OSError:
        return {}
    return {k: (second[k].total - line.total) / interval for k, line in first.items() if k in second}


def device_summary(paths: HostPaths, addresses: Sequence[str]) -> str:
    return "; ".join(describe_device(paths, a) for a in addresses)


def pci_command(paths: HostPaths, address: str) -> int | None:
    """The device's PCI command register (bit 1: memory decode, bit 2: bus master, bit 10: INTx
    disabled) as the host kernel reads it now; None: unreadable."""
    try:
        with (paths.pci(address) / "config").open("rb") as fh:
            fh.seek(4)
            return int.from_bytes(fh.read(2), "little")
    except OSError:
        return None
