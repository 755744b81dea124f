"""host.vfio against a fake sysfs tree in tmp_path: binding to vfio-pci, restoring, records for
killed runs, holders, the probe and the QEMU arguments. The kernel's reaction to writes
(unbind, drivers_probe with driver_override) is emulated by FakeSysfs.kernel_write."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_cpr import leftovers
from pytest_cpr.host import vfio
from pytest_cpr.host.hostconfig import HostPaths
from pytest_cpr.host.vfio import Passthrough, VfioBinding, VfioError

NIC, NIC_FN1, NVME, BRIDGE = "0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0000:00:1c.0"


class FakeSysfs:
    """/sys/bus/pci, /sys/kernel/iommu_groups and /dev/vfio in tmp_path, with a tiny 'kernel'."""

    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(root / "sys", root / "dev")  # the real /proc: holders() finds this process
        self.pci = self.paths.sysfs / "bus" / "pci"
        (self.pci / "devices").mkdir(parents=True)
        (self.pci / "drivers_probe").write_text("")
        (self.paths.dev / "vfio").mkdir(parents=True)
        self.native: dict[str, str | None] = {}
        self.broken: set[str] = set()  # devices vfio-pci refuses to bind
        self.driver("vfio-pci")

    def driver(self, name: str) -> Path:
        d = self.pci / "drivers" / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("bind", "unbind"):
            (d / f).touch()
        return d

    def device(self, address: str, ids: str = "8086:10c9", driver: str | None = "igb",
               group: str | None = "1", cls: str = "0x020000") -> None:
        d = self.pci / "devices" / address
        d.mkdir(parents=True)
        vendor, device = ids.split(":")
        (d / "vendor").write_text(f"0x{vendor}\n")
        (d / "device").write_text(f"0x{device}\n")
        (d / "class").write_text(cls + "\n")
        (d / "driver_override").write_text("(null)\n")
        self.native[address] = driver
        if driver:
            (d / "driver").symlink_to(self.driver(driver))
        if group is not None:
            g = self.paths.sysfs / "kernel" / "iommu_groups" / group
            (g / "devices").mkdir(parents=True, exist_ok=True)
            (g / "devices" / address).symlink_to(d)
            (d / "iommu_group").symlink_to(g)
            (self.paths.dev / "vfio" / group).touch()

    def kernel_write(self, path: Path, text: str) -> None:
        """What the kernel does on these writes (path as the code under test names it)."""
        if path.name == "driver_override":
            path.write_text((text.strip() or "(null)") + "\n")
        elif path.name == "unbind":
            (self.pci / "devices" / text.strip() / "driver").unlink()
        elif path.name == "drivers_probe":
            dev = self.pci / "devices" / text.strip()
            if (dev / "driver").is_symlink():
                return
            override = (dev / "driver_override").read_text().strip()
            want = self.native[dev.name] if override == "(null)" else override
            if want and not (want == "vfio-pci" and dev.name in self.broken):
                (dev / "driver").symlink_to(self.driver(want))
        else:
            path.write_text(text)

    def driver_of(self, address: str) -> str | None:
        return vfio.driver_of(self.paths, address)

    def override_of(self, address: str) -> str:
        return (self.pci / "devices" / address / "driver_override").read_text().strip()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    sysfs = FakeSysfs(tmp_path)
    monkeypatch.setattr(vfio, "_write", sysfs.kernel_write)
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    return sysfs


def vfio_records() -> list[dict]:
    return [r for r in leftovers.records() if r["kind"] == "vfio"]


def test_bind_moves_the_whole_group_and_restore_gives_every_device_back(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    fake.device(NIC_FN1, group="7")
    fake.device(NVME, ids="1b36:0010", driver="nvme", group="8", cls="0x010802")
    binding = VfioBinding([NIC, NVME], fake.paths, timeout=1)
    bound = binding.bind()
    assert {b.address for b in bound} == {NIC, NIC_FN1, NVME}
    assert [b.named for b in bound if b.address == NIC_FN1] == [False]
    assert all(fake.driver_of(a) == "vfio-pci" for a in (NIC, NIC_FN1, NVME))
    assert binding.groups() == ["7", "8"]
    assert {r["address"]: r["driver"] for r in vfio_records()} == {NIC: "igb", NIC_FN1: "igb", NVME: "nvme"}
    done = binding.restore()
    assert len(done) == 3
    assert [fake.driver_of(a) for a in (NIC, NIC_FN1, NVME)] == ["igb", "igb", "nvme"]
    assert {fake.override_of(a) for a in (NIC, NIC_FN1, NVME)} == {"(null)"}
    assert vfio_records() == []


def test_bridges_in_the_group_stay_with_their_driver(fake: FakeSysfs) -> None:
    fake.device(BRIDGE, ids="8086:a110", driver="pcieport", group="3", cls="0x060400")
    fake.device(NIC, group="3")
    with VfioBinding([NIC], fake.paths, timeout=1) as binding:
        assert [b.address for b in binding.bound] == [NIC]
        assert fake.driver_of(BRIDGE) == "pcieport"
    assert fake.driver_of(NIC) == "igb"


def test_device_without_driver_and_existing_override_come_back_as_they_were(fake: FakeSysfs) -> None:
    fake.device(NIC, driver=None, group="4")
    (fake.pci / "devices" / NIC / "driver_override").write_text("igb\n")
    with VfioBinding([NIC], fake.paths, timeout=1):
        assert fake.driver_of(NIC) == "vfio-pci"
    assert fake.driver_of(NIC) is None
    assert fake.override_of(NIC) == "igb"


def test_failed_bind_restores_what_was_already_bound(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    fake.device(NVME, ids="1b36:0010", driver="nvme", group="8")
    fake.broken.add(NVME)
    with pytest.raises(VfioError, match=rf"{NVME}: driver is None .* expected 'vfio-pci'"):
        VfioBinding([NIC, NVME], fake.paths, timeout=0.2).bind()
    assert fake.driver_of(NIC) == "igb"
    assert fake.driver_of(NVME) == "nvme"
    assert vfio_records() == []


def test_ctrl_c_inside_the_binding_restores(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    with pytest.raises(KeyboardInterrupt), VfioBinding([NIC], fake.paths, timeout=1):
        assert fake.driver_of(NIC) == "vfio-pci"
        raise KeyboardInterrupt
    assert fake.driver_of(NIC) == "igb"


def test_the_next_run_restores_bindings_of_a_killed_run(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    VfioBinding([NIC], fake.paths, timeout=1).bind()  # never restored: the run "dies"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for path in leftovers.STATE_DIR.glob("vfio-*.json"):
        rec = json.loads(path.read_text())
        rec.update(owner=dead.pid, owner_start="0")
        path.write_text(json.dumps(rec))
    cleaned = leftovers.clean_stale()
    assert any(NIC in line and "restored to igb" in line for line in cleaned), cleaned
    assert fake.driver_of(NIC) == "igb"
    assert vfio_records() == []


def test_a_device_bound_by_another_live_run_is_refused(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    leftovers.record("vfio", "0000_01_00.0", address=NIC, driver="igb", override=None)
    path = leftovers.STATE_DIR / "vfio-0000_01_00.0.json"
    rec = json.loads(path.read_text())
    rec.update(owner=os.getppid(), owner_start=leftovers._proc_start_time(os.getppid()))
    path.write_text(json.dumps(rec))
    with pytest.raises(VfioError, match=f"{NIC} is bound for another test run"):
        VfioBinding([NIC], fake.paths, timeout=1).bind()
    assert fake.driver_of(NIC) == "igb"


def test_restore_refuses_to_unbind_a_group_a_process_holds_open(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    binding = VfioBinding([NIC], fake.paths, timeout=1)
    binding.bind()
    fd = os.open(fake.paths.dev / "vfio" / "7", os.O_RDONLY)
    try:
        assert vfio.holders(fake.paths, "7") == [os.getpid()]
        with pytest.raises(VfioError, match=rf"group 7 is still held open by pid\(s\) \[{os.getpid()}\]"):
            binding.restore()
        assert fake.driver_of(NIC) == "vfio-pci"
    finally:
        os.close(fd)
    binding.restore()
    assert fake.driver_of(NIC) == "igb"


def test_device_without_iommu_group_is_refused(fake: FakeSysfs) -> None:
    fake.device(NIC, group=None)
    with pytest.raises(VfioError, match="no IOMMU group: boot with intel_iommu=on"):
        VfioBinding([NIC], fake.paths).bind()


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_CHECK_EXTENSION == 0x3B65
    assert vfio.VFIO_SET_IOMMU == 0x3B66
    assert vfio.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vfio.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert vfio.IOMMU_IOAS_CHANGE_PROCESS == 0x3B92
    assert (vfio.VFIO_UNMAP_ALL, vfio.VFIO_UPDATE_VADDR) == (9, 10)


def test_probe_of_a_host_without_iommu(fake: FakeSysfs) -> None:
    probe = vfio.probe_host(fake.paths)
    assert probe.groups == {}
    assert "intel_iommu=on" in (probe.missing("legacy") or "")
    fake.device(NIC, group="5")
    probe = vfio.probe_host(fake.paths)
    assert probe.groups == {"5": [NIC]}
    assert "legacy VFIO container unusable: /dev/vfio/vfio" in (probe.missing("legacy") or "")
    assert "no /dev/iommu" in (probe.missing("iommufd") or "")
    assert "/dev/iommu missing" in str(probe.change_process)
    assert any("IOMMU groups: 1: 5: " + NIC in line for line in probe.header_lines())
    reason = vfio.legacy_cpr_missing("5", fake.paths.dev) or ""
    assert "cannot ask the legacy VFIO container of group 5" in reason


def test_hugepages_and_cdev(fake: FakeSysfs) -> None:
    pool = fake.paths.sysfs / "kernel" / "mm" / "hugepages" / "hugepages-2048kB"
    pool.mkdir(parents=True)
    (pool / "nr_hugepages").write_text("512\n")
    (pool / "free_hugepages").write_text("500\n")
    assert vfio.hugepages(fake.paths.sysfs) == {"2048kB total": 512, "2048kB free": 500}
    fake.device(NIC, group="5")
    assert "CONFIG_VFIO_DEVICE_CDEV" in (vfio.cdev_missing(fake.paths, NIC) or "")
    (fake.pci / "devices" / NIC / "vfio-dev" / "vfio0").mkdir(parents=True)
    assert vfio.cdev_missing(fake.paths, NIC) is None


def test_qemu_args_legacy_and_iommufd() -> None:
    devs = [Passthrough(NIC, 0, "nic"), Passthrough(NVME, 1, "nvme")]
    assert devs[1].guest_address == "0000:00:11.0"
    assert vfio.qemu_args(devs, "legacy") == [
        "-device", f"vfio-pci,host={NIC},id=hostdev0,bus=pcie.0,addr=0x10",
        "-device", f"vfio-pci,host={NVME},id=hostdev1,bus=pcie.0,addr=0x11"]
    assert vfio.qemu_args(devs, "iommufd") == [
        "-object", "iommufd,id=iommufd0",
        "-device", f"vfio-pci,host={NIC},id=hostdev0,bus=pcie.0,addr=0x10,iommufd=iommufd0",
        "-device", f"vfio-pci,host={NVME},id=hostdev1,bus=pcie.0,addr=0x11,iommufd=iommufd0"]
    with pytest.raises(vfio.CprUnsupported, match="unknown VFIO backend 'mdev'"):
        vfio.qemu_args(devs, "mdev")


def test_host_vfio_interrupt_lines(tmp_path: Path) -> None:
    (tmp_path / "interrupts").write_text(
        "           CPU0       CPU1\n"
        " 40:        10         5  DMAR-MSI  0-edge  dmar0\n"
        " 41:       100        50  IR-PCI-MSIX-0000:01:00.0  0-edge  vfio-msix[0](0000:01:00.0)\n"
        " 42:         7         0  IR-PCI-MSIX-0000:02:00.0  0-edge  vfio-msix[0](0000:02:00.0)\n")
    lines = vfio.host_vfio_irqs([NIC], tmp_path)
    assert [(v.name, v.total) for v in lines.values()] == [("vfio-msix[0](0000:01:00.0)", 150)]
    assert len(vfio.host_vfio_irqs(None, tmp_path)) == 2
    assert vfio.host_vfio_irq_rates(0.01, tmp_path) == {"41:vfio-msix[0](0000:01:00.0)": 0.0,
                                                        "42:vfio-msix[0](0000:02:00.0)": 0.0}
    assert vfio.host_vfio_irq_rates(0.01, tmp_path / "missing") == {}


@pytest.mark.parametrize("line", [
    "kvm: irq bypass consumer (token 00000000a1b2c3d4) registration fails: -16",
    "DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0x1000",
    "vfio-pci 0000:01:00.0: timed out waiting for pending transaction",
    "AMD-Vi: Event logged [IO_PAGE_FAULT domain=0x0000 address=0x1000 flags=0x0000]",
    "iommufd: IOMMU_IOAS_MAP failed: -14",
    "vfio_iommu_type1: vfio_pin_pages_remote failed",
    "DMAR: DRHD: handling fault status reg 3",
    "BUG: unable to handle page fault for address: ffff888000000000",
    "WARNING: CPU: 3 PID: 4242 at drivers/vfio/vfio_iommu_type1.c:1234 vfio_dma_do_unmap+0x1/0x2",
    "Call Trace:",
])
def test_host_log_failures_are_recognised(line: str) -> None:
    assert vfio.HOST_LOG_FAILURES.search(line)


@pytest.mark.parametrize("line", ["vfio-pci 0000:01:00.0: enabling device (0000 -> 0002)",
                                  "igb 0000:01:00.0: added PHC on eth1", "vfio-pci 0000:01:00.0: resetting",
                                  "iommufd: module loaded", "kvm: enabling virtualization on CPU3",
                                  "igb 0000:01:00.0 enp1s0: igb: enp1s0 NIC Link is Up 1000 Mbps Full Duplex"])
def test_ordinary_host_log_lines_pass(line: str) -> None:
    assert not vfio.HOST_LOG_FAILURES.search(line)


def test_cdev_support_before_any_device_is_bound(fake: FakeSysfs) -> None:
    """/dev/vfio/devices appears only once a device is bound: before that the kernel config decides,
    and without a readable config the question stays open (checked per device after binding)."""
    fake.device(NIC, group="5")
    (fake.paths.dev / "iommu").touch()
    assert vfio.vfio_cdev_support(fake.paths) is None
    proc = fake.paths.sysfs.parent / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "config.gz").write_bytes(gzip.compress(b"CONFIG_IOMMUFD=y\n# CONFIG_VFIO_DEVICE_CDEV is not set\n"))
    probe = vfio.probe_host(fake.paths)
    assert probe.vfio_cdev is False and "CONFIG_VFIO_DEVICE_CDEV" in (probe.missing("iommufd") or "")
    (proc / "config.gz").write_bytes(gzip.compress(b"CONFIG_IOMMUFD=y\nCONFIG_VFIO_DEVICE_CDEV=y\n"))
    probe = vfio.probe_host(fake.paths)
    assert probe.vfio_cdev is True and probe.missing("iommufd") is None
    (proc / "config.gz").unlink()
    (fake.paths.dev / "vfio" / "devices").mkdir(parents=True)
    assert vfio.vfio_cdev_support(fake.paths) is True


def test_procfds_reads_kvm_and_container_files(tmp_path: Path) -> None:
    """The fd facts behind the close-KVM-after-CPR check and the container count, on a fake /proc."""
    from pytest_cpr.host import procfds

    fd = tmp_path / "42" / "fd"
    fd.mkdir(parents=True)
    for n, target in enumerate(["/dev/null", "/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0",
                                "anon_inode:kvm-vcpu:1", "/dev/vfio/vfio", "/dev/vfio/7", "/dev/vfio/vfio",
                                "anon_inode:[eventfd]"]):
        (fd / str(n)).symlink_to(target)
    files = procfds.open_files(42, tmp_path)
    assert procfds.kvm_files(files) == ["/dev/kvm", "anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0",
                                        "anon_inode:kvm-vcpu:1"]
    assert procfds.vfio_containers(files) == 2
    assert procfds.wait_kvm_closed(42, 0.2, tmp_path) == procfds.kvm_files(files)
    for n in (1, 2, 3, 4):
        (fd / str(n)).unlink()
    assert procfds.wait_kvm_closed(42, 5.0, tmp_path) == []


def _orphan_binding(fake: FakeSysfs, address: str) -> None:
    """A run binds `address` and is killed: its record stays, with an owner that is gone (and the
    kernel drops its claim lock)."""
    binding = VfioBinding([address], fake.paths, timeout=1)
    binding.bind()
    for lock in binding.locks.values():
        lock.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    for path in leftovers.STATE_DIR.glob("vfio-*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "owner": dead.pid, "owner_start": "0"}))


def test_held_device_of_a_killed_run_is_not_unbound(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    _orphan_binding(fake, NIC)
    fd = os.open(fake.paths.dev / "vfio" / "7", os.O_RDONLY)  # an orphan QEMU still holds the group
    try:
        [line] = leftovers.clean_stale()
        assert line == (f"could not clean vfio 0000_01_00.0: {NIC}: IOMMU group 7 is held open by pid(s) "
                        f"[{os.getpid()}]: not unbinding it (the write would block); stop those processes, "
                        "then run python -m pytest_cpr.cleanup")
        assert fake.driver_of(NIC) == "vfio-pci" and len(vfio_records()) == 1
    finally:
        os.close(fd)
    assert "restored to igb" in leftovers.clean_stale()[0]


def test_held_device_files_count_as_holders(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    (fake.pci / "devices" / NIC / "resource0").write_bytes(b"\0" * 64)
    with open(fake.pci / "devices" / NIC / "resource0", "rb"):  # as a user-space driver maps a BAR
        assert vfio.holders(fake.paths, "7") == [os.getpid()]
    assert vfio.holders(fake.paths, "7") == []


def test_held_by_an_admin_driver_bound_since_is_left_alone(fake: FakeSysfs) -> None:
    fake.device(NIC, group="7")
    _orphan_binding(fake, NIC)
    fake.kernel_write(fake.pci / "devices" / NIC / "driver" / "unbind", NIC)  # the admin rebinds it
    fake.kernel_write(fake.pci / "devices" / NIC / "driver_override", "e1000e")
    fake.kernel_write(fake.pci / "drivers_probe", NIC)
    assert leftovers.clean_stale() == [f"vfio binding of a killed run: {NIC} left alone: it is on e1000e now "
                                       "(bound since), not on vfio-pci"]
    assert fake.driver_of(NIC) == "e1000e" and vfio_records() == []


def test_poison_a_new_claim_keeps_the_original_driver_of_a_stale_record(fake: FakeSysfs,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake.device(NIC, group="7")
    _orphan_binding(fake, NIC)  # left on vfio-pci; the record says igb
    monkeypatch.setattr(leftovers, "clean_stale", lambda: [])  # say the cleanup could not run
    binding = VfioBinding([NIC], fake.paths, timeout=1)
    binding.bind()
    assert [r["driver"] for r in vfio_records()] == ["igb"], "never overwritten with vfio-pci"
    binding.restore()
    assert fake.driver_of(NIC) == "igb"


def _claim_and_hold(fake: FakeSysfs, claimed: Any, release: Any) -> None:
    """Another test run (a forked process): claims NIC, holds it until told, restores it."""
    with VfioBinding([NIC], fake.paths, timeout=1):
        claimed.set()
        release.wait(30)


@pytest.fixture
def other_run(fake: FakeSysfs) -> Iterator[tuple[Any, Any, Any]]:
    ctx = multiprocessing.get_context("fork")  # inherits the fake kernel and the state dir
    claimed, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_claim_and_hold, args=(fake, claimed, release))
    fake.device(NIC, group="7")
    proc.start()
    assert claimed.wait(10), "the other run did not claim the device"
    yield proc, claimed, release
    release.set()
    proc.join(10)


def test_lock_a_second_claim_fails_naming_the_holder(fake: FakeSysfs, other_run: tuple[Any, Any, Any]) -> None:
    proc, _, _ = other_run
    lock = leftovers.STATE_DIR / "locks" / f"vfio-{NIC}.lock"
    start = time.monotonic()
    with pytest.raises(VfioError) as err:
        VfioBinding([NIC], fake.paths, timeout=1, lock_timeout=0.5).bind()
    assert 0.5 <= time.monotonic() - start < 5, "waited its bounded time"
    assert str(err.value) == (f"{NIC} is claimed by another test run: lock held by pid {proc.pid} ({lock}) for "
                              "more than 0.5s; run device tests one at a time per device (pytest-xdist: --dist "
                              "loadgroup)")
    assert fake.driver_of(NIC) == "vfio-pci", "the other run's binding is untouched"


def test_lock_a_second_claim_waits_for_the_first_to_end(fake: FakeSysfs,
                                                        other_run: tuple[Any, Any, Any]) -> None:
    _, _, release = other_run
    threading.Timer(0.3, release.set).start()  # the other run ends its test soon
    with VfioBinding([NIC], fake.paths, timeout=1, lock_timeout=10) as binding:
        assert [b.driver for b in binding.bound] == ["igb"], "the first run restored before the second bound"
        assert fake.driver_of(NIC) == "vfio-pci"
    assert fake.driver_of(NIC) == "igb" and vfio_records() == []


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm to hold open")
def test_host_watch_fails_an_old_qemu_that_kept_kvm_open() -> None:
    """HostWatch reads the old QEMU's fds before it is retired: a process still holding /dev/kvm is
    counted on the result and fails check_kvm_closed (a real process holds the fd, as a QEMU would)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from pytest_cpr.checks import CheckFailed
    from pytest_cpr.cpr import ProcessRef, TransferResult
    from pytest_cpr.passthrough import HostWatch

    code = "import os, time; fd = os.open('/dev/kvm', os.O_RDWR); print('open', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        watch = HostWatch([])
        watch.KVM_CLOSE_WAIT_S = 0.2
        watch.on_before_retire(SimpleNamespace(pid=holder.pid))  # type: ignore[arg-type]
        result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
        watch.on_result(result)
        assert (result.old_qemu_kvm_fds, result.vfio_containers) == (1, 0)
        assert result.numbers()["old_qemu_kvm_fds"] == 1
        with pytest.raises(CheckFailed, match=r"transfer 1: the old QEMU still held \['/dev/kvm'\]"):
            watch.check_kvm_closed(result)
    finally:
        holder.kill()
        holder.wait()
    watch.on_before_retire(SimpleNamespace(pid=os.getpid()))  # type: ignore[arg-type]
    watch.check_kvm_closed(result)  # this process holds no KVM fd: passes
