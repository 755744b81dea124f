"""The in-use guard on a fake host (sysfs, /proc and /dev in tmp_path): a device or port the host uses
is refused at config load, at bind and at adopt, one line naming the device, what uses it and the fix;
`match=` never picks among several candidates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_cpr.errors import CprSettingError
from pytest_cpr.host import hostconfig, inuse, vfio
from pytest_cpr.host.hostconfig import HostConfigError, HostPaths
from pytest_cpr.host.netns import GuestNetwork

NIC, NIC_FN1, NVME, NVME2 = "0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0000:03:00.0"
NVME_ID = "144d:a80a"
ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


class FakeHost:
    """PCI devices with their block and net children, /proc/self/mountinfo, swaps and routes."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(root / "sys", root / "dev", root / "proc")
        (self.paths.proc / "self").mkdir(parents=True)
        (self.paths.proc / "net").mkdir()
        (self.paths.proc / "self" / "mountinfo").write_text("22 1 0:21 / /proc rw - proc proc rw\n")
        (self.paths.proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
        (self.paths.proc / "net" / "route").write_text(ROUTE_HEADER)
        (self.paths.sysfs / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True)
        (self.paths.sysfs / "class" / "block").mkdir(parents=True)
        (self.paths.sysfs / "class" / "net").mkdir(parents=True)
        (self.paths.dev / "vfio").mkdir(parents=True)
        (self.paths.dev / "vfio" / "vfio").touch()

    def pci(self, address: str, ids: str, group: str, cls: str, driver: str) -> Path:
        d = self.paths.pci(address)
        d.mkdir(parents=True)
        vendor, device = ids.split(":")
        for name, value in (("vendor", f"0x{vendor}"), ("device", f"0x{device}"), ("class", cls),
                            ("driver_override", "(null)")):
            (d / name).write_text(value + "\n")
        drv = self.paths.sysfs / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        (d / "driver").symlink_to(drv)
        g = self.paths.sysfs / "kernel" / "iommu_groups" / group / "devices"
        g.mkdir(parents=True)
        (g / address).symlink_to(d)
        (d / "iommu_group").symlink_to(g.parent)
        (self.paths.dev / "vfio" / group).touch()
        return d

    def block(self, parent: Path, name: str, devnum: str, partition: bool = False) -> Path:
        b = parent / name
        b.mkdir(parents=True)
        (b / "dev").write_text(devnum + "\n")
        (b / "holders").mkdir()
        if partition:
            (b / "partition").write_text("1\n")
        (self.paths.sysfs / "class" / "block" / name).symlink_to(b)
        (self.paths.dev / name).write_bytes(b"\0" * 70000)
        return b

    def nvme(self, address: str, group: str) -> Path:
        """An NVMe controller with namespace nvme<group>n1 (major 259, minor = group)."""
        d = self.pci(address, NVME_ID, group, "0x010802", "nvme")
        return self.block(d / "nvme" / f"nvme{group}", f"nvme{group}n1", f"259:{group}")

    def nic(self, address: str, group: str, ifname: str) -> Path:
        d = self.pci(address, "8086:10c9", group, "0x020000", "igb")
        return self.port(ifname, d / "net")

    def port(self, ifname: str, parent: Path | None = None) -> Path:
        n = (parent or self.paths.sysfs / "devices" / "virtual" / "net") / ifname
        n.mkdir(parents=True)
        (n / "flags").write_text("0x1002\n")  # down
        (self.paths.sysfs / "class" / "net" / ifname).symlink_to(n)
        return n

    def mount(self, devnum: str, where: str) -> None:
        with (self.paths.proc / "self" / "mountinfo").open("a") as f:
            f.write(f"30 1 {devnum} / {where} rw,relatime shared:1 - ext4 /dev/x rw\n")

    def route(self, ifname: str, default: bool = False) -> None:
        dest, mask = ("00000000", "00000000") if default else ("0000A8C0", "00FFFFFF")
        with (self.paths.proc / "net" / "route").open("a") as f:
            f.write(f"{ifname}\t{dest}\t0100A8C0\t0003\t0\t0\t100\t{mask}\t0\t0\t0\n")

    def config(self, body: str) -> hostconfig.HostConfig:
        path = self.paths.sysfs.parent / "host.toml"
        path.write_text(body)
        return hostconfig.load(path, self.paths)

    def problems(self, body: str) -> list[str]:
        with pytest.raises(HostConfigError) as err:
            self.config(body)
        return err.value.problems


def nvme_entry(address: str = NVME, extra: str = "") -> str:
    return f'[[device]]\naddress = "{address}"\nrole = "nvme"\n{extra}'


def nic_entry(peer: str = "enp9s0") -> str:
    return (f'[[device]]\naddress = "{NIC}"\nrole = "nic"\nguest_ip = "10.78.0.2/24"\n'
            f'peer_interface = "{peer}"\npeer_ip = "10.78.0.1/24"\n')


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_in_use_an_unused_nvme_and_nic_are_accepted(host: FakeHost) -> None:
    host.nvme(NVME, "2")
    host.nic(NIC, "1", "eno1")
    host.port("enp9s0")
    config = host.config(nvme_entry() + nic_entry())
    assert [d.address for d in config.devices] == [NVME, NIC]


def test_in_use_a_mounted_nvme_is_refused(host: FakeHost) -> None:
    ns = host.nvme(NVME, "2")
    host.block(ns, "nvme2n1p1", "259:7", partition=True)
    host.mount("259:7", "/srv/data")
    [p] = host.problems(nvme_entry(extra="scratch = true\n"))
    assert p == (f"device[0]: {NVME} ({NVME_ID}, driver nvme) backs a mounted filesystem (/dev/nvme2n1p1 on "
                 "/srv/data); unmount it (and remove it from /etc/fstab) or name another device")


def test_in_use_the_root_disk_is_refused(host: FakeHost) -> None:
    host.nvme(NVME, "2")
    host.mount("259:2", "/")
    [p] = host.problems(nvme_entry())
    assert "is the root disk (/dev/nvme2n1 is mounted on /)" in p


def test_in_use_a_btrfs_root_is_found_by_its_mount_source(host: FakeHost) -> None:
    host.nvme(NVME, "2")
    with (host.paths.proc / "self" / "mountinfo").open("a") as f:  # btrfs: an anonymous major:minor
        f.write("30 1 0:27 /@ / rw,relatime shared:1 - btrfs /dev/nvme2n1 rw,subvol=/@\n")
    [p] = host.problems(nvme_entry())
    assert "is the root disk (/dev/nvme2n1 is mounted on /)" in p


def test_in_use_a_swap_holder_is_refused(host: FakeHost) -> None:
    ns = host.nvme(NVME, "2")
    host.block(ns, "nvme2n1p2", "259:8", partition=True)
    (host.paths.proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n"
                                           "/dev/nvme2n1p2 partition 8388604 0 -2\n")
    [p] = host.problems(nvme_entry())
    assert "is swap (/dev/nvme2n1p2 in /proc/swaps); swapoff /dev/nvme2n1p2" in p


def test_in_use_a_dm_holder_is_refused_and_its_mount_found_through_it(host: FakeHost) -> None:
    ns = host.nvme(NVME, "2")
    dm = host.block(host.paths.sysfs / "devices" / "virtual" / "block", "dm-0", "253:0")
    (ns / "holders" / "dm-0").symlink_to(dm)
    [p] = host.problems(nvme_entry())
    assert p.endswith("is held by dm-0 (/sys/class/block/nvme2n1/holders: LVM, MD RAID or device-mapper); "
                      "remove that volume or array first, or name another device")
    host.mount("253:0", "/home")
    [p] = host.problems(nvme_entry())
    assert "backs a mounted filesystem (/dev/dm-0 on /home)" in p
    assert [b.name for b in inuse.device_blocks(host.paths, NVME)] == ["nvme2n1", "dm-0"]


def test_in_use_a_partition_table_or_filesystem_needs_scratch(host: FakeHost) -> None:
    ns = host.nvme(NVME, "2")
    disk = host.paths.dev / "nvme2n1"
    disk.write_bytes(b"\0" * 1080 + b"\x53\xef" + b"\0" * 70000)
    [p] = host.problems(nvme_entry())
    assert "holds data (/dev/nvme2n1 starts with an ext2/3/4 filesystem); name another device, or, if " \
           "this disk holds nothing you need, set scratch = true" in p
    assert host.config(nvme_entry(extra="scratch = true\n")).devices[0].scratch
    host.block(ns, "nvme2n1p1", "259:7", partition=True)
    [p] = host.problems(nvme_entry())
    assert "has a partition table (/dev/nvme2n1p1 is a partition)" in p


def test_in_use_scratch_is_only_for_an_nvme(host: FakeHost) -> None:
    host.nic(NIC, "1", "eno1")
    host.port("enp9s0")
    assert host.problems(nic_entry() + "scratch = true\n") == [
        "device[0].scratch: only an nvme takes it (role is 'nic'); remove it"]


def test_in_use_a_nic_carrying_the_default_route_is_refused(host: FakeHost) -> None:
    host.nic(NIC, "1", "eno1")
    host.port("enp9s0")
    host.route("eno1", default=True)
    [p] = host.problems(nic_entry())
    assert p == ("device[0]: 0000:01:00.0 (8086:10c9, driver igb) has network interface eno1, which is the "
                 "default route's device (the host's network); name a port used only for the test")


def test_in_use_a_management_port_named_as_peer_is_refused(host: FakeHost) -> None:
    host.nic(NIC, "1", "eno1")
    host.port("eno2")
    host.route("eno2")
    [p] = host.problems(nic_entry(peer="eno2"))
    assert p.startswith("device[0].peer_interface = 'eno2' carries 1 route(s)")
    assert "ip addr flush dev eno2" in p


def test_in_use_a_port_up_with_a_global_ipv6_address_or_in_a_bridge(host: FakeHost) -> None:
    port = host.port("eno2")
    (port / "flags").write_text("0x1003\n")
    (host.paths.proc / "net" / "if_inet6").write_text(
        "fe800000000000000000000000000001 03 40 20 80 eno2\n20010db8000000000000000000000001 03 40 00 80 eno2\n")
    assert inuse.interface_use(host.paths, "eno2") == (
        "is UP with address(es) 2001:0db8:0000:0000:0000:0000:0000:0001; remove them (ip addr flush dev "
        "eno2) or name a port used only for the test")
    (port / "flags").write_text("0x1002\n")
    assert inuse.interface_use(host.paths, "eno2") is None
    bridge = host.port("br0")
    (port / "master").symlink_to(bridge)
    assert inuse.interface_use(host.paths, "eno2") == (
        "is enslaved to br0; name a port that is in no bond or bridge")


def test_in_use_a_used_group_companion_is_refused(host: FakeHost) -> None:
    host.nic(NIC, "1", "eno1")
    d = host.pci(NIC_FN1, "8086:10c9", "9", "0x020000", "igb")
    host.port("eno2", d / "net")
    host.route("eno2", default=True)
    host.port("enp9s0")
    problems = host.problems(nic_entry() + f'[[device]]\naddress = "{NIC_FN1}"\nrole = "other"\n')
    assert problems == [f"device[1]: {NIC_FN1} (8086:10c9, driver igb) has network interface eno2, which is "
                        "the default route's device (the host's network); name a port used only for the test"]


def test_in_use_an_unnamed_group_companion_the_host_uses_is_named(host: FakeHost) -> None:
    host.nic(NIC, "1", "eno1")
    d = host.pci(NIC_FN1, "8086:10c9", "9", "0x020000", "igb")
    (host.paths.sysfs / "kernel" / "iommu_groups" / "1" / "devices" / NIC_FN1).symlink_to(d)
    host.port("eno2", d / "net")
    host.route("eno2", default=True)
    host.port("enp9s0")
    assert host.problems(nic_entry()) == [
        f"device[0]: IOMMU group 1 of {NIC} also holds {NIC_FN1} (8086:10c9, driver igb), which would be bound "
        "to vfio-pci too but has network interface eno2, which is the default route's device (the host's "
        "network); move the card to a slot with its own group"]


def test_in_use_match_never_picks_among_several_devices(host: FakeHost) -> None:
    host.nvme(NVME, "2")
    host.nvme(NVME2, "3")
    [p] = host.problems(f'[[device]]\nmatch = "{NVME_ID}"\nrole = "nvme"\n')
    assert p == (f"device[0].match = '{NVME_ID}': 2 devices match ({NVME}, {NVME2}) for count = 1; name the "
                 "one(s) to use with address = \"...\" (one [[device]] each), never a disk or port the host uses")


def test_in_use_bind_refuses_a_device_mounted_since_the_config_loaded(host: FakeHost) -> None:
    host.nvme(NVME, "2")
    host.config(nvme_entry())
    host.mount("259:2", "/mnt")
    binding = vfio.VfioBinding([NVME], host.paths, record=False)
    with pytest.raises(vfio.VfioError) as err:
        binding.bind()
    assert str(err.value) == (f"not binding {NVME} ({NVME_ID}, driver nvme) to vfio-pci: it backs a mounted "
                              "filesystem (/dev/nvme2n1 on /mnt); unmount it (and remove it from /etc/fstab) "
                              "or name another device")
    assert os.readlink(host.paths.pci(NVME) / "driver").endswith("/nvme")
    assert (host.paths.pci(NVME) / "driver_override").read_text() == "(null)\n"


def test_in_use_adopt_refuses_a_routed_peer_before_touching_it(host: FakeHost) -> None:
    host.port("eno2")
    host.route("eno2", default=True)
    with pytest.raises(CprSettingError, match=r"^peer interface eno2 is the default route's device .*"
                                              r"\(host config peer_interface\)$"):
        GuestNetwork("inuse-test").adopt_interface("eno2", "10.78.0.1/24", host.paths)
