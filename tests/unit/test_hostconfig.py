"""The host config loader: a valid file against a fake host, and every error a runner admin can make,
each one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_cpr.host import hostconfig
from pytest_cpr.host.hostconfig import HostConfigError, HostPaths

NIC, NIC_FN1, NVME, BRIDGE = "0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0000:00:1c.0"

GOOD = f"""
[host]
name = "runner-01"
qemu = "/usr/bin/qemu-system-x86_64"
backends = ["legacy", "iommufd"]
memory = "1G"
accel = "kvm"

[[device]]
address = "{NIC}"
role = "nic"
guest_ip = "10.78.0.2/24"
peer_interface = "enp0s5"
peer_ip = "10.78.0.1/24"

[[device]]
address = "{NVME}"
role = "nvme"
test_area_mib = 32
"""


def make_device(paths: HostPaths, address: str, ids: str, group: str | None, cls: str = "0x020000") -> None:
    d = paths.sysfs / "bus" / "pci" / "devices" / address
    d.mkdir(parents=True)
    vendor, device = ids.split(":")
    (d / "vendor").write_text(f"0x{vendor}\n")
    (d / "device").write_text(f"0x{device}\n")
    (d / "class").write_text(cls + "\n")
    if group is not None:
        g = paths.sysfs / "kernel" / "iommu_groups" / group / "devices"
        g.mkdir(parents=True, exist_ok=True)
        (g / address).symlink_to(d)
        (d / "iommu_group").symlink_to(g.parent)


@pytest.fixture
def host(tmp_path: Path) -> HostPaths:
    """A host with an igb (group 1), an NVMe (group 2), vfio-pci and iommufd loaded, port enp0s5."""
    paths = HostPaths(tmp_path / "sys", tmp_path / "dev", tmp_path / "proc")  # no mounts, swaps, routes
    make_device(paths, NIC, "8086:10c9", "1")
    make_device(paths, NVME, "1b36:0010", "2", "0x010802")
    (paths.sysfs / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True)
    (paths.sysfs / "class" / "net" / "enp0s5").mkdir(parents=True)
    (paths.dev / "vfio").mkdir(parents=True)
    (paths.dev / "vfio" / "vfio").touch()
    (paths.dev / "iommu").touch()
    return paths


def load(tmp_path: Path, paths: HostPaths, text: str) -> hostconfig.HostConfig:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return hostconfig.load(path, paths)


def problems(tmp_path: Path, paths: HostPaths, text: str) -> list[str]:
    with pytest.raises(HostConfigError) as err:
        load(tmp_path, paths, text)
    lines = str(err.value).splitlines()
    assert lines == [f"host config {tmp_path / 'host.toml'}: {p}" for p in err.value.problems]
    return err.value.problems


def test_valid_config(tmp_path: Path, host: HostPaths) -> None:
    config = load(tmp_path, host, GOOD)
    assert config.name == "runner-01"
    assert config.backends == ("legacy", "iommufd")
    assert (config.memory_mib, config.accel, config.qemu) == (1024, "kvm", "/usr/bin/qemu-system-x86_64")
    nic, nvme = config.devices
    assert (nic.address, nic.role, nic.guest_ip, nic.peer_ip, nic.index) == (NIC, "nic", "10.78.0.2/24",
                                                                           "10.78.0.1/24", 0)
    assert (nvme.address, nvme.role, nvme.test_area_mib, nvme.index) == (NVME, "nvme", 32, 1)
    assert config.with_role("nvme") == [nvme]
    assert "runner-01" in config.describe()


def test_match_with_count_resolves_addresses(tmp_path: Path, host: HostPaths) -> None:
    make_device(host, "0000:03:00.0", "1b36:0010", "3", "0x010802")
    config = load(tmp_path, host, '[host]\n[[device]]\nmatch = "1B36:0010"\ncount = 2\nrole = "nvme"\n')
    assert [d.address for d in config.devices] == [NVME, "0000:03:00.0"]
    assert [d.key for d in config.devices] == ["device[0]#0", "device[0]#1"]
    assert config.backends == ("legacy",)
    assert config.name == "host"


def test_match_with_too_few_devices(tmp_path: Path, host: HostPaths) -> None:
    [p] = problems(tmp_path, host, '[[device]]\nmatch = "1b36:0010"\ncount = 2\nrole = "nvme"\n')
    assert p.startswith("device[0].match = '1b36:0010': wants count = 2 but this host has 1")


@pytest.mark.parametrize(("text", "expected"), [
    ('device = ["x"]', "device[0] = 'x': must be a table; write [[device]] with address = ... and role = ... "
     "below it"),
    ("device = [1]", "device[0] = 1: must be a table; write [[device]] with address = ... and role = ... below it"),
    (f'[[device]]\naddress = "{NIC}"\nrole = "nic"\nguest_ip = "10.78.0.2/24"\npeer_ip = "10.78.0.1/24"\n'
     'peer_interface = "../eth0"\n', "device[0].peer_interface = '../eth0': not a plain name (letters, digits, "
     "'_', '.', ':', '-'); write e.g. \"enp0s5\""),
    ('[[mdev]]\nparent = ".."\ntype = "mtty-2"\n', "mdev[0].parent = '..': not a plain name (letters, digits, "
     "'_', '.', ':', '-'); write e.g. \"mtty\""),
    (f'[[device]]\naddress = "{NVME}"\nrole = "nvme"\nscratch = "yes"\n',
     "device[0].scratch = 'yes': must be a bool; write e.g. true"),
    ('[hots]\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "hots: unknown key; did you mean 'host'?"),
    ('[host]\nbackend = ["legacy"]\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.backend: unknown key; did you mean 'backends'?"),
    ('[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\ntest_area = 4\n',
     "device[0].test_area: unknown key; did you mean 'test_area_mib'?"),
    ('[[device]]\naddress = "0000:02:00.0"\nrole = "gpu"\n',
     "device[0].role = 'gpu': bad role; use one of nic, nic-e1000e, nvme, other"),
    ('[[device]]\naddress = "0000:02:00.0"\n',
     'device[0].role: missing; set role = "nic", "nic-e1000e", "nvme" or "other"'),
    ('[[device]]\naddress = "02:00.0"\nrole = "nvme"\n',
     "device[0].address = '02:00.0': not a PCI address; write domain:bus:slot.function"),
    ('[[device]]\naddress = "0000:02:00.0"\nmatch = "1b36:0010"\nrole = "nvme"\n',
     "device[0]: give exactly one of address"),
    ('[[device]]\nmatch = "1b36"\nrole = "nvme"\n', "device[0].match = '1b36': not a vendor:device id"),
    ('[host]\nbackends = ["vfio"]\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.backends: unknown backend 'vfio'; use legacy and/or iommufd"),
    ('[host]\nbackends = []\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.backends = []: must be a non-empty list"),
    ('[host]\nmemory = "12"\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.memory = '12': '12' is below 64 MiB"),
    ('[host]\naccel = "xen"\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.accel = 'xen': not an accelerator"),
    ('[host]\nname = 5\n[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\n',
     "host.name = 5: must be a str"),
    ('[[device]]\naddress = "0000:01:00.0"\nrole = "nic"\npeer_interface = "enp0s5"\n'
     'peer_ip = "10.78.0.1/24"\n',
     'device[0].guest_ip: missing for a nic; set guest_ip = "10.78.0.2/24"'),
    ('[[device]]\naddress = "0000:01:00.0"\nrole = "nic"\nguest_ip = "10.78.0.2"\npeer_interface = "enp0s5"\n'
     'peer_ip = "10.78.0.1/24"\n', "device[0].guest_ip = '10.78.0.2': no prefix length"),
    ('[[device]]\naddress = "0000:01:00.0"\nrole = "nic"\nguest_ip = "10.78.0.2/24"\npeer_interface = "e"\n'
     'peer_ip = "10.79.0.1/24"\n', "device[0].peer_ip = '10.79.0.1/24' is not in the subnet of guest_ip"),
    ('[[device]]\naddress = "0000:01:00.0"\nrole = "nic"\nguest_ip = "10.77.0.9/24"\npeer_interface = "e"\n'
     'peer_ip = "10.77.0.8/24"\n', "overlaps the harness's guest network 10.77.0.0/24"),
    ('[[device]]\naddress = "0000:02:00.0"\nrole = "other"\ntest_area_mib = 8\n',
     "device[0].test_area_mib: only an nvme takes it (role is 'other')"),
    ('[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\nguest_ip = "10.78.0.2/24"\n',
     "device[0].guest_ip: only a nic takes it (role is 'nvme')"),
    ("[host]\n", "device: no [[device]] entries"),
    ('device = "x"\n', "device: must be an array of tables"),
])
def test_format_errors_name_the_key_and_the_fix(tmp_path: Path, host: HostPaths, text: str,
                                                expected: str) -> None:
    assert any(expected in p for p in problems(tmp_path, host, text)), expected


def test_every_format_problem_is_reported_at_once(tmp_path: Path, host: HostPaths) -> None:
    found = problems(tmp_path, host, '[host]\nbogus = 1\n[[device]]\naddress = "x"\nrole = "disk"\n')
    keys = [p.split(":")[0].split(" ")[0] for p in found]
    assert keys == ["host.bogus", "device[0].role", "device[0].address"]


def test_device_not_present(tmp_path: Path, host: HostPaths) -> None:
    [p] = problems(tmp_path, host, GOOD.replace(NVME, "0000:05:00.0"))
    assert p == ("device[1].address = '0000:05:00.0': no such PCI device on this host; check `lspci -D` and "
                 "fix the address")


def test_group_with_a_device_the_config_does_not_name(tmp_path: Path, host: HostPaths) -> None:
    make_device(host, NIC_FN1, "8086:10c9", "1")
    [p] = problems(tmp_path, host, GOOD)
    assert p.startswith(f"device[0]: IOMMU group 1 of {NIC} also holds {NIC_FN1} (8086:10c9, driver none), "
                        "which the config does not name: it would be bound to vfio-pci too; move the card to a "
                        "slot with its own group, or, only if the host does not use it, add it as a [[device]] "
                        "with role = \"other\"")


def test_bridge_in_a_group_is_fine_and_naming_the_companion_fixes_the_group(tmp_path: Path,
                                                                           host: HostPaths) -> None:
    make_device(host, BRIDGE, "8086:a110", "1", "0x060400")
    make_device(host, NIC_FN1, "8086:10c9", "1")
    text = GOOD + f'\n[[device]]\naddress = "{NIC_FN1}"\nrole = "other"\n'
    assert [d.address for d in load(tmp_path, host, text).devices] == [NIC, NVME, NIC_FN1]


def test_device_without_iommu_group(tmp_path: Path, host: HostPaths) -> None:
    make_device(host, "0000:04:00.0", "8086:1533", None)
    [p] = problems(tmp_path, host, '[[device]]\naddress = "0000:04:00.0"\nrole = "other"\n')
    assert "has no IOMMU group: boot the host kernel with intel_iommu=on iommu=pt" in p


def test_same_device_twice(tmp_path: Path, host: HostPaths) -> None:
    text = f'[[device]]\naddress = "{NVME}"\nrole = "nvme"\n[[device]]\naddress = "{NVME}"\nrole = "other"\n'
    [p] = problems(tmp_path, host, text)
    assert p == f"device[1].address = '{NVME}': named twice; name each device once"


def test_missing_kernel_modules(tmp_path: Path, host: HostPaths) -> None:
    (host.sysfs / "bus" / "pci" / "drivers" / "vfio-pci").rmdir()
    (host.dev / "iommu").unlink()
    found = problems(tmp_path, host, GOOD)
    assert found[0].startswith("kernel module vfio-pci is not loaded: run `modprobe vfio-pci`")
    assert found[1].startswith("host.backends: iommufd needs /dev/iommu: run `modprobe iommufd`")
    assert len(found) == 2


def test_peer_interface_not_present(tmp_path: Path, host: HostPaths) -> None:
    [p] = problems(tmp_path, host, GOOD.replace("enp0s5", "enp9s9"))
    assert p.startswith("device[0].peer_interface = 'enp9s9': no such network interface")


def test_file_errors(tmp_path: Path, host: HostPaths) -> None:
    with pytest.raises(HostConfigError, match="file not found; fix --cpr-host-config"):
        hostconfig.load(tmp_path / "nope.toml", host)
    [p] = problems(tmp_path, host, "[host\n")
    assert p.startswith("not valid TOML:") and p.endswith("; fix the syntax")


def test_bad_config_stops_pytest_before_any_test(pytester: pytest.Pytester, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nbackends = ["legacy"]\nnmae = "x"\n'
                   '[[device]]\naddress = "0000:99:00.0"\nrole = "nic"\n')
    pytester.makepyfile("def test_never(): pass\n")
    result = pytester.runpytest_subprocess(f"--cpr-host-config={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*host config {bad}: host.nmae: unknown key; did you mean 'name'?*"])
    assert "test_never" not in result.stdout.str()


# ---- [[mdev]]: a mediated device type (QEMU must refuse cpr-transfer with one)
MDEV = '\n[[mdev]]\nparent = "mtty"\ntype = "mtty-2"\n'


def make_mdev_parent(paths: HostPaths, parent: str = "mtty", types: dict[str, int] | None = None) -> Path:
    """/sys/class/mdev_bus/<parent> (a symlink to the device, as the kernel makes it) with its types."""
    device = paths.sysfs / "devices" / "virtual" / parent / parent
    for kind, available in (types or {"mtty-1": 24, "mtty-2": 12}).items():
        t = device / "mdev_supported_types" / kind
        (t / "devices").mkdir(parents=True)
        (t / "available_instances").write_text(f"{available}\n")
        (t / "device_api").write_text("vfio-pci\n")
        (t / "create").touch()
    bus = paths.sysfs / "class" / "mdev_bus"
    bus.mkdir(parents=True, exist_ok=True)
    (bus / parent).symlink_to(device)
    return device


def test_valid_config_with_an_mdev(tmp_path: Path, host: HostPaths) -> None:
    make_mdev_parent(host)
    config = load(tmp_path, host, GOOD + MDEV)
    assert config.mdevs == (hostconfig.MdevConfig(key="mdev[0]", parent="mtty", type="mtty-2"),)
    assert len(config.devices) == 2
    assert config.describe().endswith("; mdevs mtty/mtty-2")


def test_a_host_with_only_mdevs_is_valid(tmp_path: Path, host: HostPaths) -> None:
    make_mdev_parent(host)
    (host.sysfs / "bus" / "pci" / "drivers" / "vfio-pci").rmdir()  # not needed without PCI devices
    config = load(tmp_path, host, '[host]\nname = "mdev-host"\n' + MDEV + MDEV.replace("mtty-2", "mtty-1"))
    assert config.devices == ()
    assert [(m.key, m.type) for m in config.mdevs] == [("mdev[0]", "mtty-2"), ("mdev[1]", "mtty-1")]
    assert "devices none; mdevs mtty/mtty-2, mtty/mtty-1" in config.describe()


def test_a_config_without_mdevs_has_none(tmp_path: Path, host: HostPaths) -> None:
    config = load(tmp_path, host, GOOD)
    assert config.mdevs == ()
    assert config.describe().endswith("0000:02:00.0 (nvme)")


@pytest.mark.parametrize(("text", "expected"), [
    ('[[mdev]]\ntype = "mtty-2"\n', 'mdev[0].parent: missing; set parent = "mtty" (a name under '
                                     "/sys/class/mdev_bus)"),
    ('[[mdev]]\nparent = "mtty"\n', 'mdev[0].type: missing; set type = "mtty-2" (a directory under '
                                     "/sys/class/mdev_bus/<parent>/mdev_supported_types)"),
    ('[[mdev]]\nparent = "mtty"\ntype = "mtty-2"\ntyp = "x"\n',
     "mdev[0].typ: unknown key; did you mean 'type'? allowed: parent, type"),
    ('[[mdev]]\nparent = 1\ntype = "mtty-2"\n', 'mdev[0].parent = 1: must be a str; write e.g. "mtty"'),
    ('mdev = "mtty"\n', "mdev: must be an array of tables; write [[mdev]] (double brackets)"),
    ('mdev = ["mtty"]\n', "mdev[0]: must be a table; write [[mdev]] with parent = ... and type = ..."),
    ('[[mdevs]]\nparent = "mtty"\n', "mdevs: unknown key; did you mean 'mdev'?"),
])
def test_mdev_format_errors_name_the_key_and_the_fix(tmp_path: Path, host: HostPaths, text: str,
                                                     expected: str) -> None:
    make_mdev_parent(host)
    found = problems(tmp_path, host, text)
    assert any(expected in p for p in found), found


def test_mdev_parent_not_loaded(tmp_path: Path, host: HostPaths) -> None:
    make_mdev_parent(host, "0000:00:02.0", {"i915-GVTg_V5_4": 1})
    [p] = problems(tmp_path, host, MDEV)
    assert p == (f"mdev[0].parent = 'mtty': no mdev parent of that name in {host.sysfs}/class/mdev_bus: "
                 "load its driver (e.g. modprobe mtty) or fix the name; present: ['0000:00:02.0']")


def test_mdev_parent_without_mdev_bus_at_all(tmp_path: Path, host: HostPaths) -> None:
    [p] = problems(tmp_path, host, MDEV)
    assert p.endswith("load its driver (e.g. modprobe mtty) or fix the name; present: []")


def test_mdev_type_not_offered(tmp_path: Path, host: HostPaths) -> None:
    device = make_mdev_parent(host)
    [p] = problems(tmp_path, host, MDEV.replace("mtty-2", "mtty-3"))
    assert p == (f"mdev[0].type = 'mtty-3': parent 'mtty' offers no such mdev type; use one of "
                 f"['mtty-1', 'mtty-2'] (directories in {host.sysfs}/class/mdev_bus/mtty/mdev_supported_types)")
    assert device.is_dir()


def test_mdev_type_without_available_instances(tmp_path: Path, host: HostPaths) -> None:
    make_mdev_parent(host, types={"mtty-1": 24, "mtty-2": 0})
    [p] = problems(tmp_path, host, MDEV)
    assert p.startswith("mdev[0].type = 'mtty-2': available_instances is 0 (parent 'mtty' has no room for "
                        "another instance); remove instances made by hand")


def test_mdev_problems_and_device_problems_are_reported_together(tmp_path: Path, host: HostPaths) -> None:
    found = problems(tmp_path, host, GOOD.replace(NVME, "0000:05:00.0") + MDEV)
    assert [p.split(" ")[0] for p in found] == ["device[1].address", "mdev[0].parent"]
