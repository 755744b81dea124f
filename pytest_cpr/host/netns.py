"""A private network for one guest: namespace + bridge + tap, addresses only on that bridge.

The harness opens the tap itself (TUNSETIFF) and hands the same fd to the source and the target
QEMU, as libvirt does: QEMU 10.x cannot reopen a tap by name while the old process holds it.
Sockets the harness needs inside the namespace (SSH, probes, TCP stream) are created by a
short-lived thread that has entered it (setns affects only the calling thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from socket import socket as Socket
from typing import Any, TypeVar

from pyroute2 import NetNS, netns

from pytest_cpr import leftovers
from pytest_cpr.errors import CprSettingError
from pytest_cpr.host import inuse
from pytest_cpr.host.hostconfig import HostPaths
from pytest_cpr.procfs import DROP_COUNTERS

T = TypeVar("T")

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
CLONE_NEWNET = 0x40000000
NUD_PERMANENT = 0x80  # linux/neighbour.h
NETNS_DIR = Path("/var/run/netns")
PREFIX = "cprt"

_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Call fn in a thread that has entered namespace `name`; returns its result or raises its error."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def open_tap(name: str, vnet_hdr: bool) -> int:
    """Open /dev/net/tun and create tap `name` in the calling thread's namespace; returns the fd."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise CprSettingError("no permission to open /dev/net/tun (the harness creates the guest's tap): "
                              "run as root, or give this user read/write access to /dev/net/tun "
                              "and CAP_NET_ADMIN") from None
    except FileNotFoundError:
        raise CprSettingError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


class GuestNetwork:
    """Namespace `cprt-<id>` with bridge br0 holding the host address and one tap per guest NIC."""

    def __init__(self, ident: str, subnet: str = "10.77.0.0/24") -> None:
        self.name = f"{PREFIX}-{ident}"
        net = ipaddress.ip_network(subnet)
        hosts = list(net.hosts())
        self.prefixlen = net.prefixlen
        self.host_ip = str(hosts[0])
        self.guest_ips = [str(h) for h in hosts[1:9]]
        self.tap_fds: list[int] = []
        self.adopted: list[str] = []  # host interfaces moved in by adopt_interface()
        self.created = False

    def __enter__(self) -> GuestNetwork:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        if (NETNS_DIR / self.name).exists():
            raise CprSettingError(f"network namespace {self.name} already exists (left by another run?): "
                                  f"delete it with `ip netns delete {self.name}`")
        leftovers.record("netns", self.name, name=self.name)
        try:
            netns.create(self.name)
        except OSError as exc:
            leftovers.forget("netns", self.name)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise CprSettingError("cannot create a network namespace: run as root (CAP_SYS_ADMIN)") from None
            raise
        self.created = True
        with NetNS(self.name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname="br0", kind="bridge")
            br = ns.link_lookup(ifname="br0")[0]
            ns.addr("add", index=br, address=self.host_ip, prefixlen=self.prefixlen)
            ns.link("set", index=br, state="up")

    def add_tap(self, vnet_hdr: bool) -> int:
        """Create the next tap on br0 and return its fd (owned by this object, closed on destroy)."""
        tap = f"tap{len(self.tap_fds)}"
        fd = run_in_netns(self.name, lambda: open_tap(tap, vnet_hdr))
        self.tap_fds.append(fd)
        with NetNS(self.name) as ns:
            br = ns.link_lookup(ifname="br0")[0]
            ns.link("set", index=ns.link_lookup(ifname=tap)[0], master=br, state="up")
        return fd

    def link_counters(self) -> dict[str, dict[str, int]]:
        """The namespace's interfaces' drop counters (DROP_COUNTERS: the bridge, the taps, an adopted
        peer port), by name: the host side of where a probe was dropped."""
        with NetNS(self.name) as ns:
            links = ns.get_links()
        out = {}
        for link in links:
            stats = link.get_attr("IFLA_STATS64")
            if stats is not None:
                out[str(link.get_attr("IFLA_IFNAME"))] = {c: int(stats[c]) for c in DROP_COUNTERS}
        return out

    def pin_neighbor(self, ip: str, mac: str, ifname: str = "br0") -> None:
        """A permanent neighbour entry for the guest on br0 (or an adopted peer port): the probes reach
        the wire while the guest does not answer ARP (a dead link, a long blackout), so the sender's
        count stays a count of requests sent, and ARP on our side never adds to a measured blackout."""
        with NetNS(self.name) as ns:
            br = ns.link_lookup(ifname=ifname)[0]
            ns.neigh("replace", dst=ip, lladdr=mac, ifindex=br, state=NUD_PERMANENT)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> Socket:
        """A socket that lives in this namespace."""
        return run_in_netns(self.name, lambda: socket.socket(family, kind, proto))

    def connect_tcp(self, address: str, port: int, timeout: float) -> Socket:
        def go() -> Socket:
            return socket.create_connection((address, port), timeout=timeout)

        return run_in_netns(self.name, go)

    def adopt_interface(self, ifname: str, cidr: str, paths: HostPaths = HostPaths()) -> None:  # noqa: B008
        """Move host interface `ifname` (e.g. the port cabled to a passthrough NIC) from the root
        namespace into this one, with address `cidr`; destroy() moves it back. Refuses a port the
        host uses (routed, the default route's, UP with addresses, enslaved)."""
        from pyroute2 import IPRoute

        if reason := inuse.interface_use(paths, ifname):
            raise CprSettingError(f"peer interface {ifname} {reason} (host config peer_interface)")

        with IPRoute() as ip:
            found = ip.link_lookup(ifname=ifname)
            if not found:
                raise CprSettingError(f"peer interface {ifname} not found in the root network namespace "
                                      "(in use by another run, or renamed?): check `ip link`")
            leftovers.record("netns", self.name, name=self.name, adopted=[*self.adopted, ifname])
            ip.link("set", index=found[0], state="down")
            ip.link("set", index=found[0], net_ns_fd=self.name)
        self.adopted.append(ifname)
        iface = ipaddress.ip_interface(cidr)
        with NetNS(self.name) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            ns.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ns.link("set", index=idx, state="up")

    def release_interfaces(self) -> None:
        """Move adopted interfaces back to the root namespace (down, without addresses)."""
        while self.adopted:
            ifname = self.adopted.pop()
            with NetNS(self.name) as ns:
                found = ns.link_lookup(ifname=ifname)
                if found:
                    ns.flush_addr(index=found[0])
                    ns.link("set", index=found[0], state="down")
                    ns.link("set", index=found[0], net_ns_pid=1)

    def destroy(self) -> None:
        if self.created:
            with contextlib.suppress(Exception):  # deleting the namespace returns physical ports anyway
                self.release_interfaces()
        for fd in self.tap_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tap_fds.clear()
        if self.created:
            remove_netns(self.name)
            self.created = False
        leftovers.forget("netns", self.name)


def remove_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        netns.remove(name)


def namespaces_of(owner: int) -> list[str]:
    """The network namespaces harness process `owner` created (GuestNetwork names them cprt-<pid>-...)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{PREFIX}-{owner}-"))


def clean_netns(rec: dict[str, Any]) -> str:
    remove_netns(str(rec["name"]))
    return f"deleted stale network namespace {rec['name']}"


def netns_record_problem(rec: dict[str, Any]) -> str | None:
    if rec.get("name") != rec["key"] or not str(rec["key"]).startswith(f"{PREFIX}-"):
        return f"name {rec.get('name')!r} is not a {PREFIX}-* namespace named by key {rec['key']!r}"
    return None
