"""Is the host using this device? Asked before a PCI device is bound to vfio-pci and before a host
interface is adopted into a test namespace, so a host config can never take the host's own disk or
network away from it.

A PCI device is in use when one of its block devices (or a device-mapper / MD / LVM device built on
them) backs a mounted filesystem (the root filesystem included), is swap, has a holder, or carries a
partition table or filesystem signature (data: allowed only on a disk the host config marks
`scratch = true`); or when one of its network interfaces (or an interface named as a peer) is
enslaved, is the default route's device, carries a route, or is UP with a global address.

Everything is read from sysfs, /proc and /dev through HostPaths, so unit tests use a fake tree.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_cpr.host.hostconfig import HostPaths

IFF_UP = 0x1
# (offset, magic, what): partition tables and filesystem signatures at the start of a disk
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "a partition table (MBR)"),
    (512, b"EFI PART", "a partition table (GPT)"),
    (4096, b"EFI PART", "a partition table (GPT, 4K sectors)"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "a swap signature"),
    (536, b"LVM2 001", "an LVM physical volume"),
    (4096, b"\xfc\x4e\x2b\xa9", "an MD RAID member"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (54, b"FAT", "a FAT filesystem"),
    (82, b"FAT32", "a FAT32 filesystem"),
)
SIGNATURE_BYTES = max(off + len(magic) for off, magic, _ in SIGNATURES)
SCRATCH_FIX = ("name another device, or, if this disk holds nothing you need, set scratch = true in its "
               "[[device]] entry (the NVMe test overwrites it)")


@dataclass(frozen=True)
class Block:
    """A block device (disk, partition, dm/md device) as /sys/class/block shows it."""

    name: str
    devnum: str  # "major:minor"
    sys: Path  # /sys/class/block/<name> resolved


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve(strict=True)
    except OSError:
        return None


def _blocks(paths: HostPaths) -> dict[str, Block]:
    out = {}
    root = paths.sysfs / "class" / "block"
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        real = _resolved(entry)
        if real is not None:
            out[entry.name] = Block(entry.name, _read(real / "dev").strip(), real)
    return out


def _under(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def device_blocks(paths: HostPaths, address: str) -> list[Block]:
    """The device's own block devices (namespaces, partitions) and, transitively, their holders."""
    pci = _resolved(paths.pci(address))
    if pci is None:
        return []
    blocks = _blocks(paths)
    found = [b for b in blocks.values() if _under(b.sys, pci)]
    seen = {b.name for b in found}
    todo = list(found)
    while todo:
        holders = todo.pop().sys / "holders"
        for h in sorted(holders.iterdir()) if holders.is_dir() else ():
            if h.name in blocks and h.name not in seen:
                seen.add(h.name)
                found.append(blocks[h.name])
                todo.append(blocks[h.name])
    return found


def _mounts(paths: HostPaths) -> list[tuple[str, str, str]]:
    """(major:minor, source, mount point) of every mount in /proc/self/mountinfo. Both identify the
    device: btrfs shows an anonymous major:minor (0:NN), its source names the real one."""
    out = []
    for line in _read(paths.proc / "self" / "mountinfo").splitlines():
        fields, _, after = line.partition(" - ")
        f, source = fields.split(), after.split()
        if len(f) > 4:
            out.append((f[2], source[1] if len(source) > 1 else "", f[4].replace("\\040", " ")))
    return out


def _swaps(paths: HostPaths) -> list[str]:
    return [line.split()[0] for line in _read(paths.proc / "swaps").splitlines()[1:] if line.split()]


def _names(block: Block, device: str) -> bool:
    """Whether a /dev path (/dev/nvme0n1p2, /dev/mapper/vg-root) is this block device."""
    name = Path(device).name
    if device.startswith("/dev/mapper/"):
        return _read(block.sys / "dm" / "name").strip() == name
    return device.startswith("/dev/") and name == block.name


def _signature(paths: HostPaths, block: Block) -> str | None:
    """What the first bytes of the block device say it holds; None if nothing known (or unreadable:
    a missing node means no device to overwrite either)."""
    try:
        with open(paths.dev / block.name, "rb") as f:
            head = f.read(SIGNATURE_BYTES)
    except OSError:
        return None
    for offset, magic, what in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return what
    return None


def block_use(paths: HostPaths, address: str, scratch: bool = False, data: bool = True) -> str | None:
    """Why the host is using the block devices behind PCI device `address`, or None. `data`: also
    look for partition tables and filesystem signatures (skipped when `scratch`)."""
    blocks = device_blocks(paths, address)
    if not blocks:
        return None
    for devnum, source, mountpoint in _mounts(paths):
        if block := next((b for b in blocks if b.devnum == devnum or _names(b, source)), None):
            name = block.name
            if mountpoint == "/":
                return f"is the root disk (/dev/{name} is mounted on /); name another device"
            return (f"backs a mounted filesystem (/dev/{name} on {mountpoint}); unmount it (and remove it "
                    "from /etc/fstab) or name another device")
    for swap in _swaps(paths):
        for b in blocks:
            if _names(b, swap):
                return f"is swap ({swap} in /proc/swaps); swapoff {swap} and remove it from /etc/fstab, " \
                       "or name another device"
    for b in blocks:
        holders = sorted(h.name for h in (b.sys / "holders").iterdir()) if (b.sys / "holders").is_dir() else []
        if holders:
            return (f"is held by {', '.join(holders)} (/sys/class/block/{b.name}/holders: LVM, MD RAID or "
                    "device-mapper); remove that volume or array first, or name another device")
    if data and not scratch:
        if parts := [b.name for b in blocks if (b.sys / "partition").exists()]:
            return f"has a partition table (/dev/{parts[0]} is a partition); {SCRATCH_FIX}"
        for b in blocks:
            if what := _signature(paths, b):
                return f"holds data (/dev/{b.name} starts with {what}); {SCRATCH_FIX}"
    return None


# ---- network
def _routes(paths: HostPaths) -> list[tuple[str, bool]]:
    """(interface, is default route) of every IPv4 and IPv6 route in the main table (link-local and
    multicast IPv6 routes, which every UP interface has, left out)."""
    out = []
    for line in _read(paths.proc / "net" / "route").splitlines()[1:]:
        f = line.split()
        if len(f) >= 8:
            out.append((f[0], f[1] == "00000000" and f[7] == "00000000"))
    for line in _read(paths.proc / "net" / "ipv6_route").splitlines():
        f = line.split()
        if len(f) >= 10 and f[9] != "lo" and not f[0].startswith(("fe80", "ff")):
            out.append((f[9], f[0] == "0" * 32 and f[1] == "00"))
    return out


def _global_ipv6(paths: HostPaths, ifname: str) -> list[str]:
    out = []
    for line in _read(paths.proc / "net" / "if_inet6").splitlines():
        f = line.split()
        if len(f) >= 6 and f[5] == ifname and f[3] == "00":  # scope 00: global
            out.append(":".join(f[0][i:i + 4] for i in range(0, 32, 4)))
    return out


def interface_use(paths: HostPaths, ifname: str) -> str | None:
    """Why the host is using network interface `ifname`, or None."""
    net = paths.sysfs / "class" / "net" / ifname
    master = net / "master"
    if master.is_symlink():
        return f"is enslaved to {Path(os.readlink(master)).name}; name a port that is in no bond or bridge"
    routes = [(dev, default) for dev, default in _routes(paths) if dev == ifname]
    if any(default for _, default in routes):
        return "is the default route's device (the host's network); name a port used only for the test"
    if routes:
        return (f"carries {len(routes)} route(s) (/proc/net/route, /proc/net/ipv6_route); remove its "
                f"addresses (ip addr flush dev {ifname}) or name a port used only for the test")
    flags = 0
    with contextlib.suppress(ValueError):
        flags = int(_read(net / "flags").strip() or "0", 16)
    if flags & IFF_UP and (addresses := _global_ipv6(paths, ifname)):
        return (f"is UP with address(es) {', '.join(addresses)}; remove them (ip addr flush dev {ifname}) "
                "or name a port used only for the test")
    return None


def device_interfaces(paths: HostPaths, address: str) -> list[str]:
    net = paths.pci(address) / "net"
    return sorted(p.name for p in net.iterdir()) if net.is_dir() else []


def pci_use(paths: HostPaths, address: str, scratch: bool = False, data: bool = True) -> str | None:
    """Why the host uses PCI device `address` (as one line: what uses it and the fix), or None."""
    if reason := block_use(paths, address, scratch, data):
        return reason
    for ifname in device_interfaces(paths, address):
        if reason := interface_use(paths, ifname):
            return f"has network interface {ifname}, which {reason}"
    return None
