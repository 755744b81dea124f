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


def open_files(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The targets of the process's open fds (an fd closed while reading is skipped)."""
    folder = proc / str(pid) / "fd"
    targets = []
    for fd in sorted(folder.iterdir(), key=lambda p: int(p.name)):
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            continue
    return targets


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
