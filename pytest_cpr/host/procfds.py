"""What a process holds open, read from /proc/<pid>/fd, and the memory it has locked or pinned
(/proc/<pid>/status): the facts behind CPR's promises about file descriptors (the old QEMU closes KVM
after a transfer; each legacy VFIO container is one open /dev/vfio/vfio) and about DMA pins (they
move to the new QEMU)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from pytest_cpr.procfs import LockedMemory, parse_locked_memory

KVM_FILE = re.compile(r"^(/dev/kvm|anon_inode:kvm-vm|anon_inode:kvm-vcpu(:\d+)?)$")


def open_fds(pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """The process's open fds: number -> target (an fd closed while reading is skipped)."""
    folder = proc / str(pid) / "fd"
    targets = {}
    for fd in sorted(folder.iterdir(), key=lambda p: int(p.name)):
        try:
            targets[int(fd.name)] = os.readlink(fd)
        except FileNotFoundError:
            continue
    return targets


def open_files(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The targets of the process's open fds, in fd order."""
    return list(open_fds(pid, proc).values())


IOMMUFD_FILE = re.compile(r"^/dev/(iommu|vfio/devices/vfio\d+)$")


def iommufd_files(fds: dict[int, str]) -> dict[int, str]:
    """The /dev/iommu and VFIO device cdev (/dev/vfio/devices/vfioN) fds among `fds`."""
    return {n: f for n, f in fds.items() if IOMMUFD_FILE.match(f)}


def self_opened(fds: dict[int, str], passed: tuple[int, ...]) -> dict[int, str]:
    """The /dev/iommu and cdev fds a process holds beyond the numbers it was passed: the ones it opened
    itself (an fd inherited through pass_fds keeps its number)."""
    return {n: f for n, f in iommufd_files(fds).items() if n not in passed}


def kvm_files(files: list[str]) -> list[str]:
    """/dev/kvm, the VM fd and vCPU fds among `files`."""
    return [f for f in files if KVM_FILE.match(f)]


def vfio_containers(files: list[str]) -> int:
    """How many legacy VFIO containers the process holds (each is one open /dev/vfio/vfio)."""
    return files.count("/dev/vfio/vfio")


def wait_kvm_closed(pid: int, timeout: float, proc: Path = Path("/proc")) -> list[str]:
    """The KVM files the process still holds after waiting up to `timeout` s for none ([] at once)."""
    deadline = time.monotonic() + timeout
    while True:
        held = kvm_files(open_files(pid, proc))
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def locked_memory(pid: int, proc: Path = Path("/proc")) -> LockedMemory:
    """The process's VmLck and VmPin (/proc/<pid>/status)."""
    return parse_locked_memory((proc / str(pid) / "status").read_text())


EVENTFD = "anon_inode:[eventfd]"
SYS_PIDFD_GETFD = 438  # x86_64 and the generic syscall table alike


def parse_eventfd_count(fdinfo: str) -> int | None:
    """The counter of an eventfd from its /proc/<pid>/fdinfo text ("eventfd-count: <hex>"), or None."""
    match = re.search(r"^eventfd-count:\s*([0-9a-fA-F]+)$", fdinfo, re.M)
    return int(match.group(1), 16) if match else None


def eventfd_counts(pid: int, proc: Path = Path("/proc")) -> dict[int, int]:
    """fd -> counter of every eventfd the process holds: a count above 0 is an event nobody read yet
    (e.g. a device interrupt VFIO signalled while no KVM irqfd and no QEMU handler listened)."""
    counts = {}
    for fd, target in open_fds(pid, proc).items():
        if target != EVENTFD:
            continue
        try:
            count = parse_eventfd_count((proc / str(pid) / "fdinfo" / str(fd)).read_text())
        except FileNotFoundError:  # closed since open_fds read it
            continue
        if count is not None:
            counts[fd] = count
    return counts


def drain_eventfd(pid: int, fd: int, proc: Path = Path("/proc")) -> int:
    """Read (and so reset) an eventfd another process holds, through pidfd_getfd: the events it held
    are gone, as if that process had consumed them. Returns the count read (0: none was pending; then
    nothing is read, so the read cannot block and the file's flags stay as its owner set them)."""
    import ctypes

    if not parse_eventfd_count((proc / str(pid) / "fdinfo" / str(fd)).read_text()):
        return 0
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    try:
        return int.from_bytes(os.read(mine, 8), "little")
    finally:
        os.close(mine)
