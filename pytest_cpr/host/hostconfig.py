"""The host config file: the passthrough devices of a hardware runner, described once by its admin.

Format (TOML, docs/hardware-runners.md):

    [host]
    name = "runner-01"
    backends = ["legacy", "iommufd"]
    memory = "1G"

    [[device]]
    address = "0000:01:00.0"          # or: match = "8086:10c9" plus count = 1
    role = "nic"                      # nic | nic-e1000e | nvme | other
    guest_ip = "10.78.0.2/24"
    peer_interface = "enp0s5"
    peer_ip = "10.78.0.1/24"

    [[mdev]]                          # a mediated device type (QEMU must refuse cpr-transfer with it)
    parent = "mtty"                   # name under /sys/class/mdev_bus
    type = "mtty-2"                   # directory under its mdev_supported_types

`load()` validates everything before a test starts: each problem is one line naming the key and
the fix. Paths to sysfs and /dev are parameters so the checks run against a fake tree in tests.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprSettingError
from pytest_cpr.host import inuse
from pytest_cpr.kinds import Accel, Backend, Role, values
from pytest_cpr.units import parse_mib

ROLES = values(Role)
NIC_ROLES = tuple(r.value for r in Role if r.is_nic)
BACKENDS = values(Backend)
ACCELS = values(Accel)
HOST_KEYS = ("name", "qemu", "target_qemu", "backends", "memory", "accel")
DEVICE_KEYS = ("address", "match", "count", "role", "guest_ip", "peer_interface", "peer_ip", "test_area_mib",
               "scratch")
MDEV_KEYS = ("parent", "type")
TOP_KEYS = ("host", "device", "mdev")
PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
SYSFS_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # an interface, mdev parent or type: one path component
PCI_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
BRIDGE_CLASS = 0x0604  # PCI-to-PCI bridges may share a group: the kernel lets vfio use the group anyway
# the harness's own guest network (host.netns.GuestNetwork default): passthrough NICs need another
HARNESS_SUBNET = ipaddress.ip_network("10.77.0.0/24")
DEFAULT_TEST_AREA_MIB = 64
SYSFS_WRITE_TIMEOUT = 30.0  # seconds; a bind or unbind normally takes milliseconds


class HostConfigError(CprSettingError):
    """The host config is wrong; one line per problem, each naming the key and the fix."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"host config {path}: {p}" for p in problems))


@dataclass(frozen=True)
class HostPaths:
    """Where the kernel's interfaces live (a fake tree in unit tests)."""

    sysfs: Path = Path("/sys")
    dev: Path = Path("/dev")
    proc: Path = Path("/proc")

    def pci(self, address: str) -> Path:
        return self.sysfs / "bus" / "pci" / "devices" / address


@dataclass(frozen=True)
class DeviceConfig:
    """One passthrough device, resolved to its PCI address."""

    key: str  # "device[0]" (or "device[0]#1" for the second match of a match/count entry)
    index: int  # position among the resolved devices: gives the device its guest PCI slot
    address: str
    role: str
    guest_ip: str | None = None
    peer_interface: str | None = None
    peer_ip: str | None = None
    test_area_mib: int = DEFAULT_TEST_AREA_MIB
    scratch: bool = False  # the admin says the disk holds nothing: a partition table or filesystem is fine


@dataclass(frozen=True)
class MdevConfig:
    """One mediated device type: each test that needs it creates its own instance (host.mdev)."""

    key: str  # "mdev[0]"
    parent: str  # name under /sys/class/mdev_bus (e.g. "mtty", or a PCI address)
    type: str  # directory under the parent's mdev_supported_types (e.g. "mtty-2")


@dataclass(frozen=True)
class HostConfig:
    path: Path
    name: str
    backends: tuple[str, ...]
    devices: tuple[DeviceConfig, ...]
    qemu: str | None = None
    target_qemu: str | None = None
    memory_mib: int | None = None
    accel: str | None = None
    paths: HostPaths = field(default_factory=HostPaths)
    mdevs: tuple[MdevConfig, ...] = ()

    def with_role(self, role: str) -> list[DeviceConfig]:
        return [d for d in self.devices if d.role == role]

    def describe(self) -> str:
        devs = ", ".join(f"{d.address} ({d.role})" for d in self.devices) or "none"
        text = f"{self.name} ({self.path}): backends {', '.join(self.backends)}; devices {devs}"
        if self.mdevs:
            text += "; mdevs " + ", ".join(f"{m.parent}/{m.type}" for m in self.mdevs)
        return text


# ---- sysfs readers (shared with host.vfio)
def read_attr(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write_attr(path: Path, text: str, error: type[Exception], hint: str,
               timeout: float = SYSFS_WRITE_TIMEOUT) -> None:
    """Write a sysfs attribute; a failure raises `error` naming the file, the value and `hint`. The
    write runs in a thread with a deadline: an unbind the kernel holds until a device's user lets go
    would otherwise hang the run (the thread stays blocked in the kernel; it is a daemon)."""
    failed: list[OSError] = []

    def write() -> None:
        try:
            path.write_text(text)
        except OSError as exc:
            failed.append(exc)

    writer = threading.Thread(target=write, name=f"sysfs-write {path.name}", daemon=True)
    writer.start()
    writer.join(timeout)
    if writer.is_alive():
        raise error(f"writing {text.strip()!r} to {path} did not return within {timeout:g}s (the kernel waits "
                    f"for whatever holds the device; see the host's dmesg); {hint}")
    if failed:
        exc = failed[0]
        raise error(f"writing {text.strip()!r} to {path} failed: {exc.strerror or exc}; {hint}") from None


def pci_id(paths: HostPaths, address: str) -> str:
    """'vendor:device' in lower-case hex without 0x, e.g. '8086:10c9'."""
    dev = paths.pci(address)
    vendor, device = read_attr(dev / "vendor") or "", read_attr(dev / "device") or ""
    return f"{vendor.removeprefix('0x')}:{device.removeprefix('0x')}"


def pci_class(paths: HostPaths, address: str) -> int:
    text = read_attr(paths.pci(address) / "class") or "0"
    return int(text, 16) >> 8


def driver_of(paths: HostPaths, address: str) -> str | None:
    link = paths.pci(address) / "driver"
    return Path(link.readlink()).name if link.is_symlink() else None


def iommu_group_of(paths: HostPaths, address: str) -> str | None:
    link = paths.pci(address) / "iommu_group"
    return Path(link.readlink()).name if link.is_symlink() else None


def group_members(paths: HostPaths, group: str) -> list[str]:
    directory = paths.sysfs / "kernel" / "iommu_groups" / group / "devices"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def is_bridge(paths: HostPaths, address: str) -> bool:
    return pci_class(paths, address) == BRIDGE_CLASS


def describe_device(paths: HostPaths, address: str) -> str:
    return f"{address} ({pci_id(paths, address)}, driver {driver_of(paths, address) or 'none'})"


# ---- parsing
def _unknown(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed: {', '.join(allowed)}"


def _interface(text: object, key: str, problems: list[str]) -> ipaddress.IPv4Interface | None:
    try:
        iface = ipaddress.IPv4Interface(str(text))
    except ValueError:
        problems.append(f"{key} = {text!r}: not an IPv4 address with prefix; write e.g. \"10.78.0.2/24\"")
        return None
    if "/" not in str(text):
        problems.append(f"{key} = {text!r}: no prefix length; write e.g. \"{text}/24\"")
        return None
    return iface


class _Parser:
    """Reads the TOML document into plain values, collecting one problem per bad key."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.problems: list[str] = []

    def typed(self, table: dict[str, Any], key: str, where: str, kind: type, example: str) -> Any:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"{where}.{key} = {value!r}: must be a {kind.__name__}; "
                                 f"write e.g. {example}")
            return None
        return value

    def name(self, table: dict[str, Any], key: str, where: str, example: str) -> str | None:
        """A string that becomes one path component under /sys: no '/', no '..', no spaces."""
        value = self.typed(table, key, where, str, example)
        if value is not None and (not SYSFS_NAME.match(value) or value in (".", "..")):
            self.problems.append(f"{where}.{key} = {value!r}: not a plain name (letters, digits, '_', '.', "
                                 f"':', '-'); write e.g. {example}")
            return None
        return value  # type: ignore[no-any-return]

    def host(self) -> dict[str, Any]:
        for key in self.data:
            if key not in TOP_KEYS:
                self.problems.append(f"{key}: {_unknown(key, TOP_KEYS)}")
        host = self.data.get("host", {})
        if not isinstance(host, dict):
            self.problems.append("host: must be a table; write [host] with name = ... below it")
            return {}
        for key in host:
            if key not in HOST_KEYS:
                self.problems.append(f"host.{key}: {_unknown(key, HOST_KEYS)}")
        out: dict[str, Any] = {
            "name": self.typed(host, "name", "host", str, '"runner-01"'),
            "qemu": self.typed(host, "qemu", "host", str, '"/usr/bin/qemu-system-x86_64"'),
            "target_qemu": self.typed(host, "target_qemu", "host", str, '"/opt/qemu/bin/qemu-system-x86_64"'),
        }
        out["backends"] = self.backends(host)
        memory = self.typed(host, "memory", "host", str, '"1G"')
        if memory is not None:
            try:
                out["memory_mib"] = parse_mib(memory)
            except ValueError as exc:
                self.problems.append(f"host.memory = {memory!r}: {exc}; write a size such as \"1G\" "
                                     "or \"2048M\"")
        accel = self.typed(host, "accel", "host", str, '"kvm"')
        if accel is not None and accel not in ACCELS:
            self.problems.append(f"host.accel = {accel!r}: not an accelerator; use one of "
                                 f"{', '.join(ACCELS)}")
            accel = None
        out["accel"] = accel
        return out

    def backends(self, host: dict[str, Any]) -> tuple[str, ...]:
        value = host.get("backends", ["legacy"])
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            self.problems.append(f"host.backends = {value!r}: must be a non-empty list; write e.g. "
                                 '["legacy", "iommufd"]')
            return ()
        bad = [v for v in value if v not in BACKENDS]
        if bad:
            self.problems.append(f"host.backends: unknown backend {bad[0]!r}; use "
                                 f"{' and/or '.join(BACKENDS)}")
        if len(set(value)) != len(value):
            self.problems.append("host.backends: lists a backend twice; name each once")
        return tuple(v for v in dict.fromkeys(value) if v in BACKENDS)

    def devices(self, required: bool = True) -> list[tuple[str, dict[str, Any]]]:
        """The [[device]] entries; `required` is False when the config has [[mdev]] entries instead."""
        entries = self.data.get("device", [])
        if not isinstance(entries, list):
            self.problems.append("device: must be an array of tables; write [[device]] (double brackets)")
            return []
        out = []
        for i, entry in enumerate(entries):
            where = f"device[{i}]"
            if not isinstance(entry, dict):
                self.problems.append(f"{where} = {entry!r}: must be a table; write [[device]] with address = "
                                     "... and role = ... below it")
                continue
            for key in entry:
                if key not in DEVICE_KEYS:
                    self.problems.append(f"{where}.{key}: {_unknown(key, DEVICE_KEYS)}")
            out.append((where, self.device(where, entry)))
        if not entries and required:
            self.problems.append("device: no [[device]] entries; add one per passthrough device")
        return out

    def mdevs(self) -> list[MdevConfig]:
        entries = self.data.get("mdev", [])
        if not isinstance(entries, list):
            self.problems.append("mdev: must be an array of tables; write [[mdev]] (double brackets)")
            return []
        out = []
        for i, entry in enumerate(entries):
            where = f"mdev[{i}]"
            if not isinstance(entry, dict):
                self.problems.append(f"{where}: must be a table; write [[mdev]] with parent = ... and "
                                     "type = ... below it")
                continue
            for key in entry:
                if key not in MDEV_KEYS:
                    self.problems.append(f"{where}.{key}: {_unknown(key, MDEV_KEYS)}")
            parent = self.name(entry, "parent", where, '"mtty"')
            kind = self.name(entry, "type", where, '"mtty-2"')
            if "parent" not in entry:
                self.problems.append(f"{where}.parent: missing; set parent = \"mtty\" (a name under "
                                     "/sys/class/mdev_bus)")
            if "type" not in entry:
                self.problems.append(f"{where}.type: missing; set type = \"mtty-2\" (a directory under "
                                     "/sys/class/mdev_bus/<parent>/mdev_supported_types)")
            if parent is not None and kind is not None:
                out.append(MdevConfig(key=where, parent=parent, type=kind))
        return out

    def device(self, where: str, entry: dict[str, Any]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        role = self.typed(entry, "role", where, str, '"nic"')
        if role is None:
            self.problems.append(f"{where}.role: missing; set role = \"nic\", \"nic-e1000e\", \"nvme\" or "
                                 "\"other\"")
        elif role not in ROLES:
            self.problems.append(f"{where}.role = {role!r}: bad role; use one of {', '.join(ROLES)}")
            role = None
        d["role"] = role
        d.update(self.selector(where, entry))
        if role is not None and Role(role).is_nic:
            d.update(self.nic(where, entry))
        else:
            for key in ("guest_ip", "peer_interface", "peer_ip"):
                if key in entry:
                    self.problems.append(f"{where}.{key}: only a nic takes it (role is {role!r}); remove it")
        area = self.typed(entry, "test_area_mib", where, int, "64")
        if area is not None and role != "nvme":
            self.problems.append(f"{where}.test_area_mib: only an nvme takes it (role is {role!r}); "
                                 "remove it")
        elif area is not None and area < 1:
            self.problems.append(f"{where}.test_area_mib = {area}: must be >= 1 (MiB)")
        d["test_area_mib"] = area or DEFAULT_TEST_AREA_MIB
        scratch = self.typed(entry, "scratch", where, bool, "true")
        if scratch is not None and role != "nvme":
            self.problems.append(f"{where}.scratch: only an nvme takes it (role is {role!r}); remove it")
        d["scratch"] = bool(scratch)
        return d

    def selector(self, where: str, entry: dict[str, Any]) -> dict[str, Any]:
        address = self.typed(entry, "address", where, str, '"0000:01:00.0"')
        match = self.typed(entry, "match", where, str, '"8086:10c9"')
        count = self.typed(entry, "count", where, int, "1")
        if (address is None) == (match is None):
            self.problems.append(f"{where}: give exactly one of address = \"0000:01:00.0\" or match = "
                                 "\"vendor:device\"")
            return {}
        if address is not None:
            address = address.lower()
            if not PCI_ADDRESS.match(address):
                self.problems.append(f"{where}.address = {address!r}: not a PCI address; write "
                                     "domain:bus:slot.function, e.g. \"0000:01:00.0\" (see `lspci -D`)")
                return {}
            if count is not None:
                self.problems.append(f"{where}.count: only with match = \"vendor:device\"; remove it")
            return {"address": address}
        assert match is not None
        match = match.lower()
        if not PCI_ID.match(match):
            self.problems.append(f"{where}.match = {match!r}: not a vendor:device id; write e.g. "
                                 "\"8086:10c9\" (see `lspci -nn`)")
            return {}
        if count is not None and count < 1:
            self.problems.append(f"{where}.count = {count}: must be >= 1")
            return {}
        if count is not None and count > 1 and entry.get("role") in NIC_ROLES:
            self.problems.append(f"{where}.count = {count}: a nic entry names one NIC (one guest_ip and "
                                 "peer); write one [[device]] per NIC")
            return {}
        return {"match": match, "count": count or 1}

    def nic(self, where: str, entry: dict[str, Any]) -> dict[str, Any]:
        for key, example in (("guest_ip", '"10.78.0.2/24"'), ("peer_interface", '"enp0s5"'),
                             ("peer_ip", '"10.78.0.1/24"')):
            if key not in entry:
                self.problems.append(f"{where}.{key}: missing for a nic; set {key} = {example}")
        guest = peer = None
        if "guest_ip" in entry:
            guest = _interface(entry["guest_ip"], f"{where}.guest_ip", self.problems)
        if "peer_ip" in entry:
            peer = _interface(entry["peer_ip"], f"{where}.peer_ip", self.problems)
        if guest and peer:
            if guest.network != peer.network:
                self.problems.append(f"{where}.peer_ip = {entry['peer_ip']!r} is not in the subnet of "
                                     f"guest_ip {entry['guest_ip']!r}; put both on one subnet")
            elif guest.ip == peer.ip:
                self.problems.append(f"{where}.peer_ip equals guest_ip; give the peer its own address")
            if guest.network.overlaps(HARNESS_SUBNET):
                self.problems.append(f"{where}.guest_ip = {entry['guest_ip']!r} overlaps the harness's guest "
                                     f"network {HARNESS_SUBNET}; use another subnet, e.g. 10.78.0.0/24")
        peer_if = self.name(entry, "peer_interface", where, '"enp0s5"')
        return {"guest_ip": str(guest) if guest else None, "peer_ip": str(peer) if peer else None,
                "peer_interface": peer_if}


# ---- checks against the running host
def _resolve(paths: HostPaths, where: str, d: dict[str, Any], taken: set[str],
             problems: list[str]) -> list[str]:
    """PCI addresses an entry names: its address, or the first `count` free devices matching its id."""
    if "address" in d:
        address = d["address"]
        if not paths.pci(address).exists():
            problems.append(f"{where}.address = {address!r}: no such PCI device on this host; check "
                            "`lspci -D` and fix the address")
            return []
        if address in taken:
            problems.append(f"{where}.address = {address!r}: named twice; name each device once")
            return []
        return [address]
    root = paths.sysfs / "bus" / "pci" / "devices"
    candidates = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    found = [a for a in candidates if pci_id(paths, a) == d["match"]]
    free = [a for a in found if a not in taken]
    if len(free) < d["count"]:
        problems.append(f"{where}.match = {d['match']!r}: wants count = {d['count']} but this host has "
                        f"{len(free)} such device(s) not named elsewhere {found}; lower count or fix the id")
        return []
    if len(free) > d["count"]:
        problems.append(f"{where}.match = {d['match']!r}: {len(free)} devices match ({', '.join(free)}) for "
                        f"count = {d['count']}; name the one(s) to use with address = \"...\" (one [[device]] "
                        "each), never a disk or port the host uses")
        return []
    return free


def _check_device(paths: HostPaths, where: str, address: str, problems: list[str],
                  scratch: bool = False) -> None:
    if reason := inuse.pci_use(paths, address, scratch):
        problems.append(f"{where}: {describe_device(paths, address)} {reason}")
        return
    if is_bridge(paths, address):
        problems.append(f"{where}: {address} is a PCI bridge, not a device to pass through; name the "
                        "endpoint behind it")
        return
    if iommu_group_of(paths, address) is None:
        problems.append(f"{where}: {address} has no IOMMU group: boot the host kernel with intel_iommu=on "
                        "iommu=pt (Intel) or amd_iommu=on iommu=pt (AMD) and enable VT-d/AMD-Vi in firmware")


def _check_groups(paths: HostPaths, keyed: dict[str, str], problems: list[str]) -> None:
    """Every non-bridge device sharing a group with a named device must be named too: binding the
    group to vfio-pci takes them all away from the host."""
    seen: set[str] = set()
    for address, where in keyed.items():
        group = iommu_group_of(paths, address)
        if group is None or group in seen:
            continue
        seen.add(group)
        for other in group_members(paths, group):
            if other not in keyed and not is_bridge(paths, other) and (reason := inuse.pci_use(paths, other)):
                problems.append(f"{where}: IOMMU group {group} of {address} also holds "
                                f"{describe_device(paths, other)}, which would be bound to vfio-pci too but "
                                f"{reason.split('; ')[0]}; move the card to a slot with its own group")
            elif other not in keyed and not is_bridge(paths, other):
                problems.append(f"{where}: IOMMU group {group} of {address} also holds "
                                f"{describe_device(paths, other)}, which the config does not name: it would "
                                "be bound to vfio-pci too; move the card to a slot with its own group, or, "
                                "only if the host does not use it, add it as a [[device]] with role = "
                                "\"other\"")


def _check_modules(paths: HostPaths, backends: tuple[str, ...], problems: list[str],
                   pci: bool = True) -> None:
    """pci: the config names PCI devices (bound to vfio-pci); an mdev-only host does not need it."""
    vfio_pci = paths.sysfs / "bus" / "pci" / "drivers" / "vfio-pci"
    if pci and not vfio_pci.is_dir() and not (paths.sysfs / "module" / "vfio_pci").is_dir():
        problems.append("kernel module vfio-pci is not loaded: run `modprobe vfio-pci` (and list it in "
                        "/etc/modules-load.d/ on the runner)")
    if Backend.LEGACY in backends and not (paths.dev / "vfio" / "vfio").exists():
        problems.append("host.backends: legacy needs /dev/vfio/vfio: run `modprobe vfio-pci` (kernel with "
                        "CONFIG_VFIO_CONTAINER) or remove \"legacy\" from host.backends")
    if Backend.IOMMUFD in backends and not (paths.dev / "iommu").exists():
        problems.append("host.backends: iommufd needs /dev/iommu: run `modprobe iommufd` (kernel with "
                        "CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV) or remove \"iommufd\" from "
                        "host.backends")


def _check_peer(paths: HostPaths, where: str, d: dict[str, Any], problems: list[str]) -> None:
    name = d.get("peer_interface")
    if name and not (paths.sysfs / "class" / "net" / name).exists():
        problems.append(f"{where}.peer_interface = {name!r}: no such network interface in the host's root "
                        "namespace; check `ip link` and name the port cabled to the NIC")
    elif name and (reason := inuse.interface_use(paths, name)):
        problems.append(f"{where}.peer_interface = {name!r} {reason}")


def mdev_parent(paths: HostPaths, parent: str) -> Path:
    """The parent device of mediated devices: /sys/class/mdev_bus/<parent> (a symlink to the device)."""
    return paths.sysfs / "class" / "mdev_bus" / parent


def mdev_type_dir(paths: HostPaths, parent: str, kind: str) -> Path:
    return mdev_parent(paths, parent) / "mdev_supported_types" / kind


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _check_mdev(paths: HostPaths, mdev: MdevConfig, problems: list[str]) -> None:
    """The parent is registered with the mdev core, offers the type, and has an instance left."""
    where, bus = mdev.key, paths.sysfs / "class" / "mdev_bus"
    if not mdev_parent(paths, mdev.parent).is_dir():
        problems.append(f"{where}.parent = {mdev.parent!r}: no mdev parent of that name in {bus}: load its "
                        f"driver (e.g. modprobe mtty) or fix the name; present: {_listing(bus)}")
        return
    types = mdev_parent(paths, mdev.parent) / "mdev_supported_types"
    if not mdev_type_dir(paths, mdev.parent, mdev.type).is_dir():
        problems.append(f"{where}.type = {mdev.type!r}: parent {mdev.parent!r} offers no such mdev type; "
                        f"use one of {_listing(types)} (directories in {types})")
        return
    available = read_attr(mdev_type_dir(paths, mdev.parent, mdev.type) / "available_instances")
    if available == "0":
        problems.append(f"{where}.type = {mdev.type!r}: available_instances is 0 (parent {mdev.parent!r} "
                        "has no room for another instance); remove instances made by hand "
                        "(echo 1 > /sys/bus/mdev/devices/<uuid>/remove) or use another type")


def parse(data: dict[str, Any], path: Path, paths: HostPaths = HostPaths()) -> HostConfig:
    """Validate a parsed TOML document against the host; raises HostConfigError listing every problem.
    A host may name only [[mdev]] entries (no [[device]]): the mdev tests need no PCI device."""
    parser = _Parser(data)
    host = parser.host()
    entries = parser.devices(required=not data.get("mdev"))
    mdevs = parser.mdevs()
    problems = parser.problems
    if problems:  # format errors first: the host checks would only repeat them
        raise HostConfigError(path, problems)
    devices: list[DeviceConfig] = []
    keyed: dict[str, str] = {}
    for where, d in entries:
        addresses = _resolve(paths, where, d, set(keyed), problems)
        for n, address in enumerate(addresses):
            key = where if len(addresses) == 1 else f"{where}#{n}"
            keyed[address] = key
            _check_device(paths, key, address, problems, d["scratch"])
            devices.append(DeviceConfig(key=key, index=len(devices), address=address, role=d["role"],
                                        guest_ip=d.get("guest_ip"), peer_interface=d.get("peer_interface"),
                                        peer_ip=d.get("peer_ip"), test_area_mib=d["test_area_mib"],
                                        scratch=d["scratch"]))
        if d["role"] in NIC_ROLES:
            _check_peer(paths, where, d, problems)
    _check_groups(paths, keyed, problems)
    for mdev in mdevs:
        _check_mdev(paths, mdev, problems)
    _check_modules(paths, host["backends"], problems, pci=bool(entries))
    if problems:
        raise HostConfigError(path, problems)
    return HostConfig(path=path, name=host["name"] or path.stem, backends=host["backends"],
                      devices=tuple(devices), qemu=host["qemu"], target_qemu=host["target_qemu"],
                      memory_mib=host.get("memory_mib"), accel=host["accel"], paths=paths,
                      mdevs=tuple(mdevs))


def load(path: Path, paths: HostPaths = HostPaths()) -> HostConfig:
    """Read and validate the host config file at `path` (setting --cpr-host-config)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HostConfigError(path, ["file not found; fix --cpr-host-config / CPR_HOST_CONFIG / ini "
                                     "cpr_host_config"]) from None
    except OSError as exc:
        raise HostConfigError(path, [f"cannot read it: {exc.strerror}; fix its permissions"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise HostConfigError(path, [f"not valid TOML: {exc}; fix the syntax"]) from None
    return parse(data, path, paths)
