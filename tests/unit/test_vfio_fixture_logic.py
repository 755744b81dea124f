"""L0 tests of the fixture-level VFIO logic, without a VM: the backends a test is parametrized over,
device selection and xdist grouping, the blocker logic (what skips, what fails under --cpr-strict),
the host interrupt and kernel-log watchers, and the NVMe DMA script with its parsers. The kernel is
a fake sysfs/dev tree (FakeSysfs of test_vfio_sysfs) and fake ioctl answers; the pytester runs go
through the real plugin, so a change that makes every hardware test skip fails here."""

from __future__ import annotations

import functools
import os
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import test_vfio_sysfs
from test_vfio_sysfs import NIC, NVME, FakeSysfs

from pytest_cpr import leftovers, passthrough, vfio_hooks
from pytest_cpr.checks import CheckFailed
from pytest_cpr.host import hostconfig, vfio
from pytest_cpr.host.hostconfig import DeviceConfig, HostConfig, HostPaths
from pytest_cpr.host.vfio import HostKernelLog, HostProbe, VfioBinding
from pytest_cpr.kinds import Backend, Role
from pytest_cpr.passthrough import (
    HostWatch,
    NvmeDma,
    Unserved,
    VfioDevices,
    Want,
    after_bind,
    build_reasons,
    dma_completions,
    kernel_blockers,
    select,
)
from pytest_cpr.qemu.probe import QemuBuild

pytest_plugins = ["pytester"]

fake = test_vfio_sysfs.fake  # the fake kernel (FakeSysfs behind vfio's writes), as a fixture here too
NIC2, NVME2 = "0000:03:00.0", "0000:04:00.0"
HARDWARE_TESTS = Path(__file__).parents[1] / "hardware" / "test_passthrough.py"


def build(version: tuple[int, int, int] = (10, 1, 0), devices: tuple[str, ...] = ("vfio-pci",),
          objects: tuple[str, ...] = ("iommufd",), binary: str = "qemu-a") -> QemuBuild:
    return QemuBuild(binary, version, "", frozenset({"normal", "cpr-transfer"}), frozenset(devices),
                     frozenset(objects))


def config(*devices: tuple[str, str], backends: tuple[str, ...] = ("legacy", "iommufd")) -> HostConfig:
    return HostConfig(Path("/etc/cpr/host.toml"), "runner", backends,
                      tuple(DeviceConfig(f"device[{i}]", i, a, r) for i, (a, r) in enumerate(devices)))


@dataclass
class Node:
    """What backends_for/wants read of a test item: its markers and node id."""

    marks: list[pytest.Mark]
    nodeid: str = "test_x.py::test_x"

    def iter_markers(self, name: str) -> Iterator[pytest.Mark]:
        return (m for m in self.marks if m.name == name)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return next(self.iter_markers(name), None)


def node(*decorators: pytest.MarkDecorator) -> Node:
    return Node([d.mark for d in decorators])


# ---- backend parametrization


def test_backends_follow_the_host_config() -> None:
    host = config((NIC, "nic"), backends=("iommufd",))
    assert vfio_hooks.backends_for(node(pytest.mark.vfio(role="nic")), host) == [Backend.IOMMUFD]
    both = config((NIC, "nic"))
    assert vfio_hooks.backends_for(node(pytest.mark.vfio(role="nic")), both) == ["legacy", "iommufd"]


def test_backends_without_a_host_config_are_both_so_the_skip_names_each() -> None:
    assert vfio_hooks.backends_for(node(pytest.mark.vfio(role="nic")), None) == ["legacy", "iommufd"]


def test_backends_a_vfio_backend_or_iommufd_marker_narrows_to_one() -> None:
    both = config((NIC, "nic"))
    assert vfio_hooks.backends_for(node(pytest.mark.vfio(role="nic", backend="legacy")), both) == ["legacy"]
    assert vfio_hooks.backends_for(node(pytest.mark.vfio(role="nic"), pytest.mark.iommufd), both) == ["iommufd"]


def test_backends_two_different_backends_on_one_test_is_a_usage_error() -> None:
    n = node(pytest.mark.vfio(role="nic", backend="legacy"), pytest.mark.vfio(role="nvme", backend="iommufd"))
    with pytest.raises(pytest.UsageError, match=r"asks? for backends \['iommufd', 'legacy'\]; one test runs"):
        vfio_hooks.backends_for(n, None)


def test_wants_reads_role_count_backend_and_refuses_unknown_ones() -> None:
    n = node(pytest.mark.vfio("nvme", count=2), pytest.mark.vfio(role="nic", backend="iommufd"))
    assert vfio_hooks.wants(n) == [Want(Role.NVME, 2, None), Want(Role.NIC, 1, Backend.IOMMUFD)]
    assert vfio_hooks.wants(node(pytest.mark.vfio())) == [Want(Role.NIC, 1, None)]
    with pytest.raises(pytest.UsageError, match=r"role='gpu': use one of"):
        vfio_hooks.wants(node(pytest.mark.vfio(role="gpu")))
    with pytest.raises(pytest.UsageError, match=r"backend='mdev': use one of"):
        vfio_hooks.wants(node(pytest.mark.vfio(role="nic", backend="mdev")))


# ---- device selection


def test_select_takes_the_first_devices_of_each_role_once() -> None:
    host = config((NIC, "nic"), (NVME, "nvme"), (NIC2, "nic"), (NVME2, "nvme"))
    chosen = select(host, [Want(Role.NVME, 2, None), Want(Role.NIC, 1, None)])
    assert isinstance(chosen, list) and [d.address for d in chosen] == [NVME, NVME2, NIC]
    chosen = select(host, [Want(Role.NIC, 1, None), Want(Role.NIC, 1, None)])  # two markers: two NICs
    assert isinstance(chosen, list) and [d.address for d in chosen] == [NIC, NIC2]


def test_select_too_few_devices_names_the_role_and_the_count() -> None:
    host = config((NIC, "nic"))
    assert select(host, [Want(Role.NVME, 1, None)]) == ("host config /etc/cpr/host.toml names 0 free device(s) "
                                                         "of role 'nvme'; the test needs 1")
    assert "names 1 free device(s) of role 'nic'; the test needs 2" in str(select(host, [Want(Role.NIC, 2, None)]))


# ---- the blocker logic


def test_build_reasons_a_build_without_vfio_cpr_is_a_blocker_not_unavailable() -> None:
    old = build((10, 0, 2))
    unavailable, blockers = build_reasons(old, old, Backend.LEGACY)
    assert unavailable == []
    assert blockers == ["qemu-a (QEMU 10.0.2) lacks VFIO support in cpr-transfer (QEMU >= 10.1 with vfio-pci)"]


def test_build_reasons_a_capable_pair_has_nothing_and_each_build_is_named_once() -> None:
    assert build_reasons(build(), build(binary="qemu-b"), Backend.IOMMUFD) == ([], [])
    old, new = build((10, 0, 2)), build(binary="qemu-b")
    assert build_reasons(old, new, Backend.LEGACY)[1] == [
        "qemu-a (QEMU 10.0.2) lacks VFIO support in cpr-transfer (QEMU >= 10.1 with vfio-pci)"]


def test_build_reasons_no_vfio_pci_or_no_iommufd_object_is_unavailable() -> None:
    no_vfio = build(devices=())
    unavailable, blockers = build_reasons(no_vfio, no_vfio, Backend.LEGACY)
    assert unavailable == ["qemu-a (QEMU 10.1.0) lacks device vfio-pci"]
    assert blockers, "no vfio-pci: no VFIO CPR either"
    no_iommufd = build(objects=())
    assert build_reasons(no_iommufd, no_iommufd, Backend.LEGACY) == ([], [])
    assert build_reasons(no_iommufd, no_iommufd, Backend.IOMMUFD)[0] == ["qemu-a (QEMU 10.1.0) lacks object iommufd"]


def probe(change_process: bool | str = True) -> HostProbe:
    return HostProbe(groups={"1": [NIC]}, container={"type1v2": True, "unmap_all": True}, iommufd=True,
                     change_process=change_process, vfio_cdev=True, kvm=False)


def test_kernel_blockers_iommufd_is_the_change_process_answer() -> None:
    binding = VfioBinding([NIC], HostPaths())
    assert kernel_blockers(probe(True), binding, Backend.IOMMUFD) == []
    lacks = "the host kernel lacks IOMMU_IOAS_CHANGE_PROCESS (Linux >= 6.14)"
    assert kernel_blockers(probe(lacks), binding, Backend.IOMMUFD) == [lacks]


def test_kernel_blockers_legacy_asks_each_group(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.device(NIC, group="7")
    fake.device(NVME, ids="1b36:0010", driver="nvme", group="8", cls="0x010802")
    asked: list[str] = []

    def answer(group: str, dev: Path) -> str | None:
        asked.append(group)
        return f"group {group} lacks VFIO_UPDATE_VADDR" if group == "8" else None

    monkeypatch.setattr(vfio, "legacy_cpr_missing", answer)
    with VfioBinding([NIC, NVME], fake.paths, timeout=1) as binding:
        assert kernel_blockers(probe(), binding, Backend.LEGACY) == ["group 8 lacks VFIO_UPDATE_VADDR"]
    assert asked == ["7", "8"]


@pytest.fixture
def bound(fake: FakeSysfs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """devices(backend, blockers): a NIC bound to vfio-pci (with its VFIO cdev) as VfioDevices; the
    legacy container answers 'all there' unless a test says otherwise."""
    fake.device(NIC, group="7")
    (fake.pci / "devices" / NIC / "vfio-dev" / "vfio0").mkdir(parents=True)
    monkeypatch.setattr(vfio, "legacy_cpr_missing", lambda group, dev: None)
    binding = VfioBinding([NIC], fake.paths, timeout=1)
    binding.bind()
    host = config((NIC, "nic"))

    def devices(backend: Backend, blockers: tuple[str, ...] = ()) -> VfioDevices:
        return VfioDevices(host, backend, [(host.devices[0], vfio.Passthrough(NIC, 0, Role.NIC))], binding,
                           list(blockers))

    yield devices
    binding.restore()


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_after_bind_a_capable_host_serves_the_test(bound: Any, backend: str) -> None:
    assert after_bind(bound(Backend(backend)), probe(), expects_blocker=False) is None


@pytest.mark.parametrize("backend", ["legacy", "iommufd"])
def test_after_bind_nothing_blocks_is_unserved_but_not_lacking(bound: Any, backend: str) -> None:
    """A vfio_blocker test on a capable host: a skip even under --cpr-strict (lacking=False)."""
    unserved = after_bind(bound(Backend(backend)), probe(), expects_blocker=True)
    assert unserved is not None and unserved.lacking is False
    assert unserved.reason.startswith(f"nothing blocks VFIO cpr-transfer here (backend {backend}")


def test_after_bind_a_build_blocker_serves_only_the_blocker_test(bound: Any) -> None:
    reason = "qemu-a (QEMU 10.0.2) lacks VFIO support in cpr-transfer"
    assert after_bind(bound(Backend.LEGACY, (reason,)), probe(), expects_blocker=True) is None
    assert after_bind(bound(Backend.LEGACY, (reason,)), probe(), expects_blocker=False) == Unserved(reason, True)


def test_after_bind_a_kernel_blocker_is_lacking_for_ordinary_tests(bound: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfio, "legacy_cpr_missing", lambda group, dev: "no VFIO_UNMAP_ALL")
    devices = bound(Backend.LEGACY)
    assert after_bind(devices, probe(), expects_blocker=False) == Unserved("no VFIO_UNMAP_ALL", True)
    lacks = "the host kernel lacks IOMMU_IOAS_CHANGE_PROCESS"
    assert after_bind(bound(Backend.IOMMUFD), probe(lacks), expects_blocker=False) == Unserved(lacks, True)
    assert after_bind(bound(Backend.IOMMUFD), probe(lacks), expects_blocker=True) is None


def test_after_bind_iommufd_without_the_device_cdev_is_lacking(bound: Any, fake: FakeSysfs) -> None:
    (fake.pci / "devices" / NIC / "vfio-dev" / "vfio0").rmdir()
    unserved = after_bind(bound(Backend.IOMMUFD), probe(), expects_blocker=True)
    assert unserved == Unserved(f"{NIC} has no VFIO device cdev: the host kernel lacks CONFIG_VFIO_DEVICE_CDEV")
    assert after_bind(bound(Backend.LEGACY), probe(), expects_blocker=False) is None, "legacy needs no cdev"


# ---- host interrupt watcher


def interrupts(**totals: int) -> str:
    """A /proc/interrupts text with one vfio-msix line per (vector, total), all on the NIC."""
    rows = [f" {40 + i}: {n} 0 IR-PCI-MSIX-{NIC} {i}-edge vfio-msix[{i}]({NIC})"
            for i, n in enumerate(totals.values())]
    return "  CPU0 CPU1\n" + "\n".join(rows) + "\n"


def watch_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *samples: dict[str, int]) -> HostWatch:
    """A HostWatch whose samples read these /proc/interrupts snapshots in turn."""
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    texts = iter(samples)
    real = vfio.host_vfio_irqs

    def read(addresses: Any) -> Any:
        (proc / "interrupts").write_text(interrupts(**next(texts)))
        return real(addresses, proc)

    monkeypatch.setattr(vfio, "host_vfio_irqs", read)
    watch = HostWatch([NIC], tmp_path)
    for _ in samples:
        watch.sample()
    return watch


def test_check_irqs_passes_when_lines_that_counted_still_count(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    watch = watch_with(tmp_path, monkeypatch, {"v0": 10, "v1": 5}, {"v0": 20, "v1": 5},
                       {"v0": 25, "v1": 5}, {"v0": 30, "v1": 5})
    assert watch.check_irqs() == {"before": {f"40:vfio-msix[0]({NIC})": 10}, "after": {f"40:vfio-msix[0]({NIC})": 5}}
    assert watch.notes == []


def test_check_irqs_fails_on_a_host_line_silent_after_the_transfer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    watch = watch_with(tmp_path, monkeypatch, {"v0": 10, "v1": 5}, {"v0": 20, "v1": 9},
                       {"v0": 25, "v1": 9}, {"v0": 30, "v1": 9})
    with pytest.raises(CheckFailed, match=rf"stopped counting after the transfer: \{{'41:vfio-msix\[1\]\({NIC}\)': 4}}"
                                          r".*\(logs: art\)"):
        watch.check_irqs("art")


def test_check_irqs_posted_interrupts_and_absent_lines_are_notes_not_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    still = {"v0": 10}
    watch = watch_with(tmp_path, monkeypatch, still, still, still, still)
    assert watch.check_irqs() == {"before": {}, "after": {}}
    assert watch.notes == ["host vfio lines did not count before the transfer (interrupts posted to the guest)"]
    watch.irqs = [{}, {}, {}, {}]
    watch.notes.clear()
    watch.check_irqs()
    assert watch.notes == [f"no vfio lines in the host's /proc/interrupts for ['{NIC}']"]


def test_check_irqs_needs_four_samples(tmp_path: Path) -> None:
    watch = HostWatch([NIC], tmp_path)
    watch.irqs = [{}, {}, {}]
    with pytest.raises(ValueError, match="four samples"):
        watch.check_irqs()


# ---- host kernel log watcher (a fake /dev/kmsg: one record per read, as the kernel returns them)


class FakeKmsg:
    def __init__(self, dev: Path) -> None:
        self.path = dev / "kmsg"
        dev.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.seq = 0

    def log(self, text: str, level: int = 4) -> None:
        self.seq += 1
        with self.path.open("a") as f:
            f.write(f"{level},{self.seq},{self.seq * 1000},-;{text}\n SUBSYSTEM=pci\n")


def logged(kmsg: FakeKmsg, log: HostKernelLog, *lines: str) -> None:
    for line in lines:
        kmsg.log(line)
        log.read()


def test_host_kernel_log_reads_only_records_written_after_start(tmp_path: Path) -> None:
    kmsg = FakeKmsg(tmp_path / "dev")
    kmsg.log("DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0x1000 (before the test)")
    with HostKernelLog(tmp_path / "dev") as log:
        logged(kmsg, log, "igb 0000:01:00.0: added PHC on eth1", "vfio-pci 0000:01:00.0: enabling device")
        assert log.lines == ["igb 0000:01:00.0: added PHC on eth1", "vfio-pci 0000:01:00.0: enabling device"]
        assert log.failures() == []


def test_check_log_passes_a_clean_host_log(tmp_path: Path) -> None:
    kmsg = FakeKmsg(tmp_path)
    with HostWatch([NIC], tmp_path) as watch:
        logged(kmsg, watch.log, "vfio-pci 0000:01:00.0: enabling device (0000 -> 0002)")
        watch.check_log()


def test_check_log_fails_naming_the_bad_host_lines(tmp_path: Path) -> None:
    kmsg = FakeKmsg(tmp_path)
    bad = "kvm: irq bypass consumer (token 00000000a1b2c3d4) registration fails: -16"
    with HostWatch([NIC], tmp_path) as watch:
        logged(kmsg, watch.log, "igb 0000:01:00.0: added PHC on eth1", bad)
        with pytest.raises(CheckFailed, match=r"host kernel log during the transfer:\n  kvm: irq bypass consumer "
                                              r"\(token 00000000a1b2c3d4\) registration fails: -16 \(logs: art\)"):
            watch.check_log("art")


# ---- the NVMe DMA script and its parsers ("guest": the local shell, the "disk": a file)


class LocalGuest:
    """Runs NvmeDma's guest commands in a local shell, its /tmp/cpr-dma files under `work`."""

    def __init__(self, work: Path) -> None:
        self.work, self.artifacts = work, work / "artifacts"
        self.artifacts.mkdir(parents=True)

    def run(self, command: str, timeout: float = 60) -> SimpleNamespace:
        command = command.replace("/tmp/cpr-dma", str(self.work / "cpr-dma"))
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout, check=True)
        return SimpleNamespace(stdout=out.stdout)


@pytest.fixture
def local_dma(tmp_path: Path) -> Iterator[NvmeDma]:
    disk = tmp_path / "disk"
    with disk.open("wb") as f:
        f.truncate(4 << 20)
    guest = LocalGuest(tmp_path)
    dma = NvmeDma(guest, "0000:00:11.0", area_mib=4)  # type: ignore[arg-type]
    dma.namespace = os.path.relpath(disk, "/dev")
    yield dma
    (tmp_path / "cpr-dma.stop").touch()  # the script ends on its own at the latest here


def test_nvme_dma_script_writes_reads_back_and_verifies_every_slot(local_dma: NvmeDma) -> None:
    local_dma.start()
    assert local_dma.wait_rounds(6, 60.0) >= 6
    rounds = local_dma.stop()
    assert rounds >= 6
    done, failed = local_dma.progress()
    assert failed == [] and done == rounds
    lines = local_dma.log.splitlines()  # each write, then its read-back, with the guest's time
    assert [ln.rsplit(" ", 1)[0] for ln in lines[:4]] == ["W 0 0", "OK 0 0", "W 1 1", "OK 1 1"]
    assert len(dma_completions(local_dma.log)) == 2 * rounds
    assert local_dma.log.splitlines()[-1] == f"DONE {rounds}"
    assert (Path(str(local_dma.vm.artifacts)) / "nvme-dma.log").read_text() == local_dma.log


def test_nvme_dma_script_a_failing_write_stops_it_and_fails_the_check(local_dma: NvmeDma, tmp_path: Path) -> None:
    local_dma.namespace = os.path.relpath(tmp_path, "/dev")  # a directory: dd cannot write it
    local_dma.start()
    with pytest.raises(CheckFailed, match=r"NVMe DMA in the guest failed: FAIL write i=0 slot=0: dd: "):
        local_dma.wait_rounds(1, 30.0)
    with pytest.raises(CheckFailed, match=r"NVMe DMA data not identical:\n  FAIL write i=0 slot=0"):
        local_dma.stop()


class ScriptedLog:
    """A guest whose /tmp/cpr-dma.log reads as given (the parsers on lines the script prints)."""

    def __init__(self, text: str, artifacts: Path) -> None:
        self.text, self.artifacts = text, artifacts

    def run(self, command: str, timeout: float = 60) -> SimpleNamespace:
        return SimpleNamespace(stdout=self.text if command.startswith("cat ") else "")


def test_nvme_dma_parsers_count_ok_rounds_and_collect_fail_lines(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        OK 0 0
        OK 1 1
        OK 2 0
        FAIL read i=3 slot=1 want=aa got=bb
        FAIL verify slot=0 want=cc got=dd
        DONE 3
        """)
    dma = NvmeDma(ScriptedLog(text, tmp_path), "0000:00:11.0", 2)  # type: ignore[arg-type]
    assert dma.progress() == (3, ["FAIL read i=3 slot=1 want=aa got=bb", "FAIL verify slot=0 want=cc got=dd"])
    with pytest.raises(CheckFailed, match=r"FAIL read i=3 slot=1 want=aa got=bb\n  FAIL verify slot=0"):
        dma.stop()
    clean = NvmeDma(ScriptedLog("OK 0 0\nOK 1 1\nDONE 2\n", tmp_path), "x", 2)  # type: ignore[arg-type]
    assert clean.stop() == 2


# ---- through the plugin: a fake host config on a fake host, pytester runs


FAKE_BUILDS = """
import pytest
from pytest_cpr.qemu.probe import QemuBuild

def _build(version):
    return QemuBuild("qemu-fake", version, "", frozenset({"normal", "cpr-transfer"}),
                     frozenset({"vfio-pci"}), frozenset({"iommufd"}))

@pytest.fixture(scope="session")
def cpr_source_build():
    return _build(VERSION)

@pytest.fixture(scope="session")
def cpr_target_build():
    return _build(VERSION)
"""

DEVICE_TESTS = """
import pytest

@pytest.mark.vfio(role="nic")
def test_nic(cpr_vfio):
    assert cpr_vfio.addresses == ["0000:01:00.0"]

@pytest.mark.vfio(role="nvme")
def test_nvme(cpr_vfio):
    assert cpr_vfio.addresses == ["0000:02:00.0"]

@pytest.mark.vfio(role="nic")
@pytest.mark.vfio_blocker
def test_blocker(cpr_vfio):
    assert cpr_vfio.blockers

def test_mdev(cpr_mdev):
    assert cpr_mdev.uuid
"""


@dataclass
class FakeHost:
    sysfs: FakeSysfs
    toml: Path

    def write(self, text: str) -> str:
        self.toml.write_text(text)
        return f"--cpr-host-config={self.toml}"


HOST_TOML = f"""
[host]
name = "fake-runner"
backends = ["legacy", "iommufd"]

[[device]]
address = "{NIC}"
role = "nic"
guest_ip = "10.78.0.2/24"
peer_interface = "enp9s0"
peer_ip = "10.78.0.1/24"

[[device]]
address = "{NVME}"
role = "nvme"
"""


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """A host with an igb NIC (group 7) and an NVMe (group 8) whose kernel has every VFIO CPR feature:
    the sysfs/dev tree is fake, the ioctl answers are 'supported'."""
    root = tmp_path / "host"
    sysfs = FakeSysfs(root)
    sysfs.device(NIC, group="7")
    sysfs.device(NVME, ids="1b36:0010", driver="nvme", group="8", cls="0x010802")
    for address in (NIC, NVME):
        (sysfs.pci / "devices" / address / "vfio-dev" / "vfio0").mkdir(parents=True)
    (sysfs.paths.sysfs / "class" / "net" / "enp9s0").mkdir(parents=True)
    (sysfs.paths.dev / "vfio" / "vfio").touch()
    (sysfs.paths.dev / "iommu").touch()
    (root / "proc").mkdir()
    paths = HostPaths(sysfs.paths.sysfs, sysfs.paths.dev, root / "proc")
    monkeypatch.setattr(hostconfig, "load", functools.partial(hostconfig.load, paths=paths))
    monkeypatch.setattr(vfio, "_write", sysfs.kernel_write)
    monkeypatch.setattr(vfio, "container_extensions", lambda dev: {"type1v2": True, "unmap_all": True})
    monkeypatch.setattr(vfio, "iommufd_change_process", lambda dev: True)
    monkeypatch.setattr(vfio, "legacy_cpr_missing", lambda group, dev: None)
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    return FakeHost(sysfs, tmp_path / "host.toml")


def fake_builds(pytester: pytest.Pytester, version: tuple[int, int, int] = (10, 1, 0)) -> None:
    pytester.makeconftest(FAKE_BUILDS.replace("VERSION", repr(version)))


def test_hardware_tests_collect_once_per_backend_of_the_host_config(pytester: pytest.Pytester,
                                                                    fake_host: FakeHost) -> None:
    """The real tests/hardware file: every device test is collected as [legacy] and [iommufd]."""
    result = pytester.runpytest(fake_host.write(HOST_TOML), "--collect-only", "-q", str(HARDWARE_TESTS))
    ids = {line.split("::")[-1] for line in result.outlines if "::" in line}
    for name in ("test_nic_traffic_through_transfer", "test_nvme_dma_through_transfer",
                 "test_nic_and_nvme_in_two_groups", "test_blocked_transfer_is_refused_and_guest_runs"):
        assert {f"{name}[legacy]", f"{name}[iommufd]"} <= ids, (name, sorted(ids))
    assert "test_mdev_blocks_cpr_transfer" in ids, "mdev: legacy only, not parametrized"


def test_device_tests_reach_their_body_on_both_backends_of_a_capable_fake_host(pytester: pytest.Pytester,
                                                                               fake_host: FakeHost) -> None:
    """A capable host serves every device test on both backends (the fixture binds, the body runs);
    --cpr-strict: nothing here may skip for a host reason, except the blocker test (nothing blocks)
    and the mdev test (no [[mdev]]: the operator chose not to configure one)."""
    fake_builds(pytester)
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    result = pytester.runpytest(fake_host.write(HOST_TOML), "--cpr-strict=on", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, skipped=3)
    result.stdout.fnmatch_lines_random(["*SKIPPED*nothing blocks VFIO cpr-transfer here (backend legacy*",
                                        "*SKIPPED*nothing blocks VFIO cpr-transfer here (backend iommufd*",
                                        "*SKIPPED*names no ??mdev??; to run the mdev tests*"])
    assert [fake_host.sysfs.driver_of(a) for a in (NIC, NVME)] == ["igb", "nvme"], "given back"


def test_strict_a_build_without_vfio_cpr_fails_ordinary_tests_and_serves_the_blocker_test(
        pytester: pytest.Pytester, fake_host: FakeHost) -> None:
    fake_builds(pytester, (10, 0, 2))
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    result = pytester.runpytest(fake_host.write(HOST_TOML), "--cpr-strict=on", "-k", "nic or blocker")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*?cpr-strict? qemu-fake (QEMU 10.0.2) lacks VFIO support in cpr-transfer*"])


def test_strict_no_host_config_fails_and_without_strict_skips(pytester: pytest.Pytester) -> None:
    fake_builds(pytester)
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    strict = pytester.runpytest("--cpr-strict=on", "-k", "nic or mdev")
    strict.assert_outcomes(errors=3)
    strict.stdout.fnmatch_lines(["*?cpr-strict? no host config: this test needs passthrough devices*"])
    lenient = pytester.runpytest("-k", "nic or mdev")
    lenient.assert_outcomes(skipped=3)


def test_strict_a_missing_kernel_feature_fails(pytester: pytest.Pytester, fake_host: FakeHost,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lacks = ("the host kernel lacks IOMMU_IOAS_CHANGE_PROCESS (Linux >= 6.14): QEMU blocks cpr-transfer with "
             "the iommufd backend")
    monkeypatch.setattr(vfio, "iommufd_change_process", lambda dev: lacks)
    fake_builds(pytester)
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    result = pytester.runpytest(fake_host.write(HOST_TOML), "--cpr-strict=on", "-k", "nic or blocker")
    result.assert_outcomes(passed=2, errors=1, skipped=1)  # legacy: nic passes, blocker skips
    result.stdout.fnmatch_lines(["*ERROR*test_nic?iommufd?*", "*?cpr-strict? the host kernel lacks "
                                 "IOMMU_IOAS_CHANGE_PROCESS*"])


MDEV_TOML = """
[host]
backends = ["iommufd"]

[[mdev]]
parent = "mtty"
type = "mtty-2"
"""


def fake_mtty(fake_host: FakeHost) -> None:
    types = fake_host.sysfs.paths.sysfs / "class" / "mdev_bus" / "mtty" / "mdev_supported_types" / "mtty-2"
    types.mkdir(parents=True)
    (types / "available_instances").write_text("12\n")


def test_strict_mdev_configured_on_a_host_without_the_legacy_container_fails(pytester: pytest.Pytester,
                                                                             fake_host: FakeHost) -> None:
    """[[mdev]] given (the operator wants mdev tested) but no /dev/vfio/vfio: a real deficiency."""
    fake_mtty(fake_host)
    (fake_host.sysfs.paths.dev / "vfio" / "vfio").unlink()
    fake_builds(pytester)
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    strict = pytester.runpytest(fake_host.write(MDEV_TOML), "--cpr-strict=on", "-k", "mdev")
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*?cpr-strict? no */dev/vfio/vfio: an mdev is tested on the legacy VFIO container*"])
    lenient = pytester.runpytest(fake_host.write(MDEV_TOML), "-k", "mdev")
    lenient.assert_outcomes(skipped=1)


def test_strict_mdev_on_a_build_without_vfio_cpr_fails(pytester: pytest.Pytester, fake_host: FakeHost) -> None:
    fake_mtty(fake_host)
    fake_builds(pytester, (10, 0, 2))
    pytester.makepyfile(test_devices=DEVICE_TESTS)
    result = pytester.runpytest(fake_host.write(MDEV_TOML), "--cpr-strict=on", "-k", "mdev")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*?cpr-strict? qemu-fake (QEMU 10.0.2) lacks VFIO support in cpr-transfer*"])


def test_xdist_groups_tests_that_share_a_device(pytester: pytest.Pytester, fake_host: FakeHost) -> None:
    pytester.makepyfile("""
import pytest

@pytest.mark.vfio(role="nic")
def test_nic(cpr_vfio_backend): pass

@pytest.mark.vfio(role="nvme")
def test_nvme(): pass

@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
def test_both(): pass

def test_plain(): pass
""")
    items, _ = pytester.inline_genitems(fake_host.write(HOST_TOML))
    groups = {i.name: [m.args[0] for m in i.iter_markers("xdist_group")] for i in items}
    joined = f"vfio-{NIC}+{NVME}"
    assert groups == {"test_nic[legacy]": [joined], "test_nic[iommufd]": [joined], "test_nvme": [joined],
                      "test_both": [joined], "test_plain": []}


def test_xdist_tests_on_separate_devices_get_separate_groups(pytester: pytest.Pytester, fake_host: FakeHost) -> None:
    pytester.makepyfile("""
import pytest

@pytest.mark.vfio(role="nic")
def test_nic(): pass

@pytest.mark.vfio(role="nvme")
def test_nvme(): pass

@pytest.mark.vfio(role="nvme", count=2)
def test_two_nvmes(): pass
""")
    items, _ = pytester.inline_genitems(fake_host.write(HOST_TOML))
    groups = {i.name: [m.args[0] for m in i.iter_markers("xdist_group")] for i in items}
    assert groups == {"test_nic": [f"vfio-{NIC}"], "test_nvme": [f"vfio-{NVME}"],
                      "test_two_nvmes": ["vfio-unassigned"]}


# ---- the passthrough NIC's link across a transfer (no reset, no flap)


class FakeGuestVM:
    """What PassthroughGuest asks of a CprVM: the main NIC, the passthrough NIC's name, live_update."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        self.config = SimpleNamespace(accel="tcg")
        self.live_update_kwargs: dict[str, Any] = {}
        self.dmesg = ""
        self.current = SimpleNamespace(pid=100)  # /proc/100: the old QEMU, /proc/200: the new one
        self.proc = artifacts / "proc"
        self.status(100, 4096)
        self.status(200, 0)
        self.observer: Any = None

    def status(self, pid: int, vmlck_kib: int) -> None:
        (self.proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (self.proc / str(pid) / "status").write_text(f"VmLck:\t{vmlck_kib} kB\nVmPin:\t0 kB\n")

    def ifname_of(self) -> str:
        return "eth0"

    def run(self, command: str, timeout: float = 60) -> SimpleNamespace:
        return SimpleNamespace(stdout="eth1\n" if "/net 2>/dev/null" in command else "up\n12.5\n")

    def observing(self, observer: object) -> Any:
        from contextlib import nullcontext
        self.observer = observer
        return nullcontext(observer)

    def live_update(self, traffic: object, **kwargs: Any) -> Any:
        """A transfer as the watch sees it: the pins move from the old QEMU to the new one."""
        from pytest_cpr.cpr import ProcessRef, TransferResult
        self.live_update_kwargs = kwargs
        self.observer.on_spawned(SimpleNamespace(pid=200))
        self.status(100, 0)
        self.status(200, 4096)
        self.observer.on_before_retire(SimpleNamespace(pid=100))
        result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
        self.observer.on_result(result)
        return result

    def collect_dmesg(self) -> str:
        return self.dmesg


def test_transfer_checked_checks_the_carrier_of_the_main_and_the_passthrough_nic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vfio, "host_vfio_irqs", lambda addresses: {})
    host = config((NIC, "nic"))
    devices = VfioDevices(host, Backend.LEGACY, [(host.devices[0], vfio.Passthrough(NIC, 0, Role.NIC))],
                          VfioBinding([NIC], HostPaths()))
    vm = FakeGuestVM(tmp_path)
    guest = passthrough.PassthroughGuest(vm, devices)  # type: ignore[arg-type]
    guest.transfer_checked(object(), "^eth1", HostWatch([NIC], tmp_path, vm.proc))  # type: ignore[arg-type]
    assert vm.live_update_kwargs["links"] == ("eth0", "eth1")


def test_guest_log_check_spares_only_the_harness_link_down_of_the_peer_setup(tmp_path: Path) -> None:
    host = config((NIC, "nic"))
    vm = FakeGuestVM(tmp_path)
    devices = VfioDevices(host, Backend.LEGACY, [], VfioBinding([], HostPaths()))
    guest = passthrough.PassthroughGuest(vm, devices)  # type: ignore[arg-type]
    guest.link_settled_s = guest._link_settled("eth1")
    assert guest.link_settled_s == 12.5
    vm.dmesg = "[ 10.0] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down\n"
    guest.check_guest_log()
    vm.dmesg += "[ 30.0] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down\n"
    with pytest.raises(CheckFailed, match=r"driver trouble:\n  \[ 30\.0\] igb .*NIC Link is Down"):
        guest.check_guest_log()
