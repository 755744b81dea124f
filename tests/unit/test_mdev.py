"""host.mdev against a fake sysfs tree in tmp_path: creating and removing an instance, the record a
killed run leaves and its cleaner, the guest slot and the QEMU arguments. The kernel's reaction to
writes (`create` makes /sys/bus/mdev/devices/<uuid>, `remove` deletes it) is emulated by
FakeMdevSysfs.kernel_write."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from pytest_cpr import leftovers
from pytest_cpr.errors import CprSettingError, CprTimeout
from pytest_cpr.host import mdev
from pytest_cpr.host.hostconfig import HostConfig, HostPaths, MdevConfig
from pytest_cpr.host.mdev import Mdev, MdevError
from pytest_cpr.kinds import Backend
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.vfio_fixtures import NO_MDEV, _mdev_unavailable


class FakeMdevSysfs:
    """The mtty sample driver's parent with types mtty-1 and mtty-2, and a tiny 'kernel'."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(root / "sys", root / "dev")
        self.parent = self.paths.sysfs / "devices" / "virtual" / "mtty" / "mtty"
        for kind, available in (("mtty-1", 24), ("mtty-2", 12)):
            t = self.parent / "mdev_supported_types" / kind
            (t / "devices").mkdir(parents=True)
            (t / "name").write_text(f"Dual port serial {kind}\n")
            (t / "available_instances").write_text(f"{available}\n")
            (t / "device_api").write_text("vfio-pci\n")
            (t / "create").write_text("")
        bus = self.paths.sysfs / "class" / "mdev_bus"
        bus.mkdir(parents=True)
        (bus / "mtty").symlink_to(self.parent)
        (self.paths.sysfs / "bus" / "mdev" / "devices").mkdir(parents=True)
        (self.paths.dev / "vfio").mkdir(parents=True)
        self.writes: list[tuple[str, str]] = []
        self.ignore_create = False  # a parent driver that never makes the instance
        self.next_group = 20

    def kernel_write(self, path: Path, text: str) -> None:
        self.writes.append((path.name, text))
        if path.name == "create" and not self.ignore_create:
            self._create(path.parent, text.strip())
        elif path.name == "remove" and text.strip() == "1":
            self._remove(path.parent.name)
        else:
            path.write_text(text)

    def _create(self, kind_dir: Path, uuid: str) -> None:
        dev = self.parent / uuid
        dev.mkdir()
        (dev / "remove").write_text("")
        (dev / "mdev_type").symlink_to(kind_dir)
        group = str(self.next_group)
        self.next_group += 1
        g = self.paths.sysfs / "kernel" / "iommu_groups" / group
        (g / "devices").mkdir(parents=True)
        (g / "devices" / uuid).symlink_to(dev)
        (dev / "iommu_group").symlink_to(g)
        (self.paths.dev / "vfio" / group).touch()
        (kind_dir / "devices" / uuid).symlink_to(dev)
        (self.paths.sysfs / "bus" / "mdev" / "devices" / uuid).symlink_to(dev)

    def _remove(self, uuid: str) -> None:
        dev = self.parent / uuid
        group = (dev / "iommu_group").readlink().name
        kind_dir = (dev / "mdev_type").readlink()
        for link in (self.paths.sysfs / "bus" / "mdev" / "devices" / uuid, kind_dir / "devices" / uuid,
                     self.paths.sysfs / "kernel" / "iommu_groups" / group / "devices" / uuid):
            link.unlink()
        (self.paths.dev / "vfio" / group).unlink()
        for name in ("remove", "mdev_type", "iommu_group"):
            (dev / name).unlink()
        dev.rmdir()

    def instances(self) -> list[str]:
        return sorted(p.name for p in (self.paths.sysfs / "bus" / "mdev" / "devices").iterdir())


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMdevSysfs:
    sysfs = FakeMdevSysfs(tmp_path)
    monkeypatch.setattr(mdev, "_write", sysfs.kernel_write)
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    return sysfs


def mdev_records() -> list[dict[str, object]]:
    return [r for r in leftovers.records() if r["kind"] == "mdev"]


def orphan_records() -> None:
    """Make every mdev record look like one of a killed run: its owner pid no longer runs."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    for path in leftovers.STATE_DIR.glob("mdev-*.json"):
        rec = json.loads(path.read_text())
        rec.update(owner=dead.pid, owner_start="0")
        path.write_text(json.dumps(rec))


def test_create_and_remove_an_instance(fake: FakeMdevSysfs) -> None:
    with Mdev("mtty", "mtty-2", fake.paths, timeout=1, poll=0.01) as m:
        assert fake.instances() == [m.uuid]
        assert m.sysfsdev == fake.paths.sysfs / "bus" / "mdev" / "devices" / m.uuid
        assert m.sysfsdev.is_dir()
        assert m.iommu_group == "20"
        [rec] = mdev_records()
        assert (rec["key"], rec["parent"], rec["type"], rec["path"]) == (m.uuid, "mtty", "mtty-2",
                                                                         str(m.sysfsdev))
        assert rec["owner"] == os.getpid()
    assert fake.instances() == []
    assert fake.writes == [("create", m.uuid), ("remove", "1")]
    assert mdev_records() == []


def test_each_instance_gets_its_own_uuid(fake: FakeMdevSysfs) -> None:
    with Mdev("mtty", "mtty-1", fake.paths) as a, Mdev("mtty", "mtty-1", fake.paths) as b:
        assert a.uuid != b.uuid
        assert fake.instances() == sorted([a.uuid, b.uuid])
    assert fake.instances() == []


def test_ctrl_c_inside_the_context_removes_the_instance(fake: FakeMdevSysfs) -> None:
    with pytest.raises(KeyboardInterrupt), Mdev("mtty", "mtty-2", fake.paths):
        assert len(fake.instances()) == 1
        raise KeyboardInterrupt
    assert fake.instances() == []
    assert mdev_records() == []


def test_an_instance_that_never_appears_times_out_clearly(fake: FakeMdevSysfs) -> None:
    fake.ignore_create = True
    m = Mdev("mtty", "mtty-2", fake.paths, timeout=0.2, poll=0.01)
    with pytest.raises(CprTimeout, match=rf"mdev {m.uuid} \(mtty/mtty-2\) did not appear at .* within 0.2s"):
        m.create()
    assert mdev_records() == []


def test_an_unknown_type_names_the_host_config(fake: FakeMdevSysfs) -> None:
    with pytest.raises(MdevError, match=r"no mdev type 'mtty-9' under parent 'mtty'; check \[\[mdev\]\]"):
        Mdev("mtty", "mtty-9", fake.paths).create()
    assert mdev_records() == []


def test_a_failed_write_is_one_line_naming_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "create"
    with pytest.raises(MdevError, match=rf"writing 'x' to {target} failed: .*; run as root"):
        mdev._write(target, "x")


def test_the_next_run_removes_the_instance_of_a_killed_run(fake: FakeMdevSysfs) -> None:
    m = Mdev("mtty", "mtty-2", fake.paths).create()  # never removed: the run "dies"
    orphan_records()
    cleaned = leftovers.clean_stale()
    assert cleaned == [f"removed stale mdev {m.uuid} (mtty-2)"]
    assert ("remove", "1") in fake.writes
    assert fake.instances() == []
    assert mdev_records() == []


def test_the_cleaner_of_an_instance_already_gone(fake: FakeMdevSysfs) -> None:
    m = Mdev("mtty", "mtty-2", fake.paths).create()
    fake.kernel_write(m.sysfsdev / "remove", "1")  # removed by hand
    orphan_records()
    assert leftovers.clean_stale() == [f"mdev {m.uuid} already gone"]
    assert mdev_records() == []


def test_an_instance_in_use_is_not_removed(fake: FakeMdevSysfs) -> None:
    m = Mdev("mtty", "mtty-2", fake.paths).create()
    fd = os.open(fake.paths.dev / "vfio" / "20", os.O_RDONLY)  # as QEMU holds the group open
    try:
        with pytest.raises(MdevError, match=rf"group 20 is still held open by pid\(s\) \[{os.getpid()}\]"):
            m.remove()
        assert fake.instances() == [m.uuid]
        assert len(mdev_records()) == 1  # kept: the next run's cleanup removes it
    finally:
        os.close(fd)
    m.remove()
    assert fake.instances() == []
    assert mdev_records() == []


def test_qemu_args_and_guest_address(fake: FakeMdevSysfs) -> None:
    m = Mdev("mtty", "mtty-2", fake.paths, slot=mdev.guest_slot(2))
    assert m.guest_address == "0000:00:12.0"
    assert m.qemu_args("mdev0") == ["-device", f"vfio-pci,sysfsdev={fake.paths.sysfs}/bus/mdev/devices/"
                                               f"{m.uuid},id=mdev0,bus=pcie.0,addr=0x12"]
    assert "host=" not in m.qemu_args()[1] and "iommufd" not in m.qemu_args()[1]
    assert m.qemu_args("mdev0", iommufd_id="fd0") == [
        "-object", "iommufd,id=fd0", "-device",
        f"vfio-pci,sysfsdev={fake.paths.sysfs}/bus/mdev/devices/{m.uuid},id=mdev0,bus=pcie.0,addr=0x12,iommufd=fd0"]


def test_guest_slot_follows_the_passthrough_devices() -> None:
    assert mdev.guest_slot(0) == 0x10
    assert mdev.guest_slot(3, index=1) == 0x14
    assert mdev.guest_slot(14) == 0x1e
    with pytest.raises(CprSettingError, match=r"past 0x1e .* name fewer"):
        mdev.guest_slot(15)


def _build(version: tuple[int, int, int], devices: frozenset[str] = frozenset({"vfio-pci"}),
           objects: frozenset[str] = frozenset()) -> QemuBuild:
    return QemuBuild("/usr/bin/qemu-system-x86_64", version, "", frozenset({"cpr-transfer"}), devices, objects)


def test_why_the_mdev_fixture_skips(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path / "sys", tmp_path / "dev")
    good = _build((10, 1, 0))
    bare = HostConfig(tmp_path / "host.toml", "h", ("legacy",), (), paths=paths)
    assert _mdev_unavailable(bare, good, good) == NO_MDEV.format(path=tmp_path / "host.toml")
    assert f"host config {tmp_path / 'host.toml'} names no [[mdev]];" in NO_MDEV.format(path=bare.path)
    config = dataclasses.replace(bare, mdevs=(MdevConfig("mdev[0]", "mtty", "mtty-2"),))
    assert f"no {paths.dev}/vfio/vfio: an mdev is tested on the legacy VFIO container" in str(
        _mdev_unavailable(config, good, good))
    (paths.dev / "vfio").mkdir(parents=True)
    (paths.dev / "vfio" / "vfio").touch()
    assert _mdev_unavailable(config, good, good) is None
    assert "lacks device vfio-pci" in str(_mdev_unavailable(config, good, _build((10, 1, 0), frozenset())))
    assert "lacks VFIO support in cpr-transfer" in str(_mdev_unavailable(config, _build((10, 0, 0)), good))


def test_mdev_on_iommufd_needs_dev_iommu_and_qemu_iommufd(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path / "sys", tmp_path / "dev")
    good = _build((10, 1, 0), objects=frozenset({"iommufd"}))
    config = HostConfig(tmp_path / "host.toml", "h", ("iommufd",), (), paths=paths,
                        mdevs=(MdevConfig("mdev[0]", "mtty", "mtty-2"),))
    assert f"no {paths.dev}/iommu: run `modprobe iommufd`" in str(
        _mdev_unavailable(config, good, good, Backend.IOMMUFD))
    paths.dev.mkdir(parents=True)
    (paths.dev / "iommu").touch()
    assert _mdev_unavailable(config, good, good, Backend.IOMMUFD) is None  # no legacy /dev/vfio/vfio needed
    assert "lacks object iommufd" in str(_mdev_unavailable(config, good, _build((10, 1, 0)), Backend.IOMMUFD))


def test_mdev_cdev_missing_names_the_kernel_option(fake: FakeMdevSysfs) -> None:
    with Mdev("mtty", "mtty-2", fake.paths) as m:
        assert "has no" in str(m.cdev_missing()) and "vfio-dev/vfio*" in str(m.cdev_missing())
        (m.sysfsdev / "vfio-dev" / "vfio3").mkdir(parents=True)
        assert f"no {fake.paths.dev}/vfio/devices/vfio3: an mdev on iommufd is opened by its vfio cdev" in str(
            m.cdev_missing())
        (fake.paths.dev / "vfio" / "devices").mkdir(parents=True, exist_ok=True)
        (fake.paths.dev / "vfio" / "devices" / "vfio3").touch()
        assert m.cdev_missing() is None
        (m.sysfsdev / "vfio-dev" / "vfio3").rmdir()  # the fake kernel removes only what it made
        (m.sysfsdev / "vfio-dev").rmdir()
