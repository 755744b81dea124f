"""Guests with passed-through devices (vfio-pci, legacy container or iommufd) through cpr-transfer.

These tests need a host config (--cpr-host-config): the devices, their roles, the NIC's cabled peer
port. Each runs once per backend the host config lists; where the host or QEMU cannot serve one,
it is skipped with the reason (a failure under --cpr-strict). The mdev test needs an [[mdev]] entry
instead of devices.
"""

from __future__ import annotations

import re

import pytest

from pytest_cpr import checks
from pytest_cpr.checks import CheckFailed
from pytest_cpr.cpr import query_source
from pytest_cpr.errors import TransferFailed
from pytest_cpr.host import procfds
from pytest_cpr.host.mdev import Mdev
from pytest_cpr.kinds import Backend
from pytest_cpr.passthrough import memlock_limited, refusal_problem
from pytest_cpr.qemu.bugs import MDEV_ON_IOMMUFD_ABORTS_SOURCE, known_bugs
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.vfio_fixtures import PassthroughGuest
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


@pytest.mark.vfio(role="nic")
def test_nic_traffic_through_transfer(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict) -> None:
    """Probe + TCP stream over the passed-through NIC (guest_ip <-> its cabled peer port) through two
    transfers: every probe stream recovers, the stream arrives intact, the NIC's MSI-X vectors that
    fired before fire after, the host's vfio lines keep counting, both kernel logs stay clean."""
    cpr_vfio_guest.nic_traffic_through_transfers(2, cpr_thresholds)


# The NVMe test's probes go over the guest's virtio NIC, not a passthrough one: virtio drops the one
# frame in flight at the switchover (1 lost in 12 of 14 virtio transfers seen, the 3 NVMe transfers
# in the virtual host included), a passthrough NIC none (README "Passthrough defaults").
@pytest.mark.cpr_thresholds(max_lost_probes=1)
@pytest.mark.vfio(role="nvme")
def test_nvme_dma_through_transfer(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict,
                                   cpr_max_dma_stall_ms: float | None) -> None:
    """O_DIRECT writes of random data to the NVMe test area, each read back and compared, run through
    a transfer: rounds complete after it, every slot written before reads back identical after it,
    no I/O error or timeout in the guest, the controller's I/O vectors keep firing, and the I/O
    stall across the transfer (dma_stall_ms: the longest gap between completed I/Os) is bounded."""
    cpr_vfio_guest.nvme_transfer(cpr_thresholds, cpr_max_dma_stall_ms)


@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
def test_nic_and_nvme_in_two_groups(cpr_vfio_guest: PassthroughGuest, cpr_thresholds: dict,
                                    cpr_max_dma_stall_ms: float | None, request: pytest.FixtureRequest) -> None:
    """A NIC and an NVMe in two IOMMU groups in one guest, NIC traffic and NVMe DMA through two
    transfers. Without a guest vIOMMU both groups sit in one address space, so QEMU puts them in ONE
    legacy container (type1 takes the second group) and one iommufd IOAS: the count is asserted, so
    this test does not pretend to reach the "dma_map restored for the first container only" bug,
    which needs a container per device (a guest vIOMMU)."""
    guest = cpr_vfio_guest
    groups = guest.devices.groups()
    if len(groups) < 2:
        pytest.skip(f"the host config's NIC and NVMe share IOMMU group {groups}: need two groups")
    dma = guest.nvme_dma()
    dma.find()
    nic_pattern = guest.nic_irq_pattern(guest.nics[0][1])
    if guest.devices.backend == "legacy":
        containers = procfds.vfio_containers(procfds.open_files(guest.vm.current.pid))
        request.node.user_properties.append(("cpr_vfio_containers", containers))
        assert containers == 1, (f"QEMU holds {containers} legacy VFIO containers for two groups in one address "
                                 "space: expected 1 (type1 takes the second group into the first container)")
    dma.start()
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        for _ in range(2):
            dma.wait_rounds(2, 120.0)
            pattern = f"{nic_pattern}|{dma.irq_pattern}"
            before = dma.mark()
            result = guest.transfer_checked(traffic, pattern, watch, **cpr_thresholds)
            dma.wait_rounds(2, 120.0)
            dma.measure_stall(result, before, dma.mark())
            guest.check_host(watch)
            checks.assert_dma_stall(result, cpr_max_dma_stall_ms, guest.vm.artifacts)
            assert result.interrupts is not None
            fired = result.interrupts["after"]
            assert any(k for k in fired if "nvme" in k), f"NVMe vectors silent after the transfer: {fired}"
    dma.stop()
    checks.assert_stream_intact(traffic.stream_result, guest.vm.artifacts)
    guest.check_guest_log()


@pytest.mark.vfio(role="nic")
def test_old_qemu_answers_queries_then_quits_cleanly(cpr_vfio_guest: PassthroughGuest, cpr_source_build: QemuBuild,
                                                     cpr_accel: str, request: pytest.FixtureRequest) -> None:
    """With a passed-through NIC: after a completed transfer the old QEMU (postmigrate) answers what
    management software asks after a migration, stays alive, and `quit` ends it with exit code 0;
    the guest runs on in the new QEMU. On builds with a known bug here (pytest_cpr/qemu/bugs.py) this
    is a strict expected failure, so a fixed build turns it red."""
    bugs = known_bugs(cpr_source_build, cpr_accel, vfio=True)
    if bugs:
        request.applymarker(pytest.mark.xfail(strict=True, raises=CheckFailed,
                                              reason="; ".join(b.describe(cpr_source_build) for b in bugs)))
    vm = cpr_vfio_guest.vm
    answers: dict[str, str] = {}
    result = vm.transfer(before_retire=lambda source: answers.update(query_source(source)))
    checks.assert_completed(result, vm.artifacts)
    print(f"old QEMU's answers: {answers}; it ended: {result.source_exit}")
    vm.run("true")
    checks.assert_old_qemu_answered(answers, vm.artifacts)
    checks.assert_source_quit(result, (), vm.artifacts)


@pytest.mark.vfio(role="nic")
def test_old_qemu_closed_kvm_after_transfer(cpr_vfio_guest: PassthroughGuest, cpr_accel: str) -> None:
    """The irq bypass -16 fix (QEMU 7ed0919119 "migration: close kvm after cpr", seed 001): after a
    completed transfer the old QEMU holds no /dev/kvm, KVM VM or vCPU fd, so the new QEMU's KVM can
    register the irq bypass consumers of the device's interrupts (where device posted interrupts are
    on, a held VM fd shows as "irq bypass consumer ... registration fails: -16" and dead vfio
    networking; this checks the mechanism on every host). Control: the source held them before."""
    if cpr_accel != "kvm":
        pytest.skip(f"the guest runs on {cpr_accel}: no KVM fds to close")
    vm = cpr_vfio_guest.vm
    before = procfds.kvm_files(procfds.open_files(vm.current.pid))
    assert before, f"the source QEMU holds no KVM fd before the transfer: nothing to check; logs {vm.artifacts}"
    with cpr_vfio_guest.host_watch() as watch, vm.observing(watch):
        result = vm.transfer()
    checks.assert_completed(result, vm.artifacts)
    watch.check_kvm_closed(result, vm.artifacts)
    assert result.old_qemu_kvm_fds == 0, f"no count of the old QEMU's KVM fds in the result: {result}"
    target = procfds.kvm_files(procfds.open_files(vm.current.pid))
    assert "anon_inode:kvm-vm" in target, f"the new QEMU holds no KVM VM fd: {target}"
    vm.run("true")


@pytest.mark.vfio_blocker
@pytest.mark.vfio(role="nic")
def test_blocked_transfer_is_refused_and_guest_runs(cpr_vfio_guest: PassthroughGuest) -> None:
    """Where the kernel or QEMU lacks what VFIO CPR needs (cpr_vfio.blockers: e.g. no VFIO_UPDATE_VADDR,
    no IOMMU_IOAS_CHANGE_PROCESS, QEMU < 10.1), cpr-transfer is refused cleanly: `migrate` itself is
    refused with a blocker QEMU lists in query-migrate's blocked-reasons (not any later failure), the
    source QEMU keeps running the guest, SSH and the passthrough NIC keep working."""
    guest = cpr_vfio_guest
    vm = guest.vm
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with guest.nic_traffic(tcp=False) as traffic:
        with pytest.raises(TransferFailed) as refused:
            vm.transfer()
        reasons = vm.current.qmp.execute("query-migrate").get("blocked-reasons", [])
        problem = refusal_problem(refused.value, reasons)
        assert problem is None, f"{problem} (expected blockers: {guest.devices.blockers}; logs {vm.artifacts})"
        guest.check_source_kept(traffic, boot_id, guest.devices.blockers)
    guest.check_guest_log()
    print(f"refused as expected: {refused.value}; blockers: {guest.devices.blockers}")


def test_mdev_blocks_cpr_transfer(cpr_mdev_guest: tuple[CprVM, Mdev]) -> None:
    """A guest with a mediated device (the host config's first [[mdev]] type, e.g. mtty) as vfio-pci on
    the legacy container: QEMU adds a cpr-transfer blocker for it ("CPR does not support vfio mdev
    <uuid>", hw/vfio/container-legacy.c), so `migrate` is refused with that text, the source keeps
    running the guest (same boot, one QEMU generation: the waiting target is gone), the guest still
    sees the device and its kernel log stays clean."""
    vm, mdev = cpr_mdev_guest
    vendor = vm.run(f"cat /sys/bus/pci/devices/{mdev.guest_address}/vendor").stdout.strip()
    assert re.fullmatch(r"0x[0-9a-f]{4}", vendor) and vendor != "0xffff", \
        f"the guest sees no PCI device at the mdev's address {mdev.guest_address}: vendor {vendor!r}"
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with pytest.raises(TransferFailed) as refused:
        vm.transfer()
    reasons = vm.current.qmp.execute("query-migrate").get("blocked-reasons", [])
    assert f"CPR does not support vfio mdev {mdev.uuid}" in reasons, \
        f"QEMU does not list the mdev blocker for cpr-transfer: blocked-reasons {reasons}"
    assert "CPR does not support vfio mdev" in str(refused.value), \
        f"migrate was refused for another reason: {refused.value} (blocked-reasons {reasons})"
    assert isinstance(refused.value.__cause__, QmpError) and refused.value.__cause__.command == "migrate", \
        f"the refusal must be the answer to `migrate`, not a failure later on: {refused.value!r}"
    assert vm.current.qmp.execute("query-status")["status"] == "running", \
        "source must keep running the guest after the refusal"
    assert len(vm.generations) == 1, "the refused target QEMU must be gone"
    assert vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    assert vm.run(f"cat /sys/bus/pci/devices/{mdev.guest_address}/vendor").stdout.strip() == vendor
    checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    print(f"refused as expected: {refused.value}")


def _mdev_seen(vm: CprVM, mdev: Mdev) -> tuple[str, str]:
    """(vendor:device, bound guest driver) of the mdev as the guest sees it."""
    sysfs = f"/sys/bus/pci/devices/{mdev.guest_address}"
    out = vm.run(f"cat {sysfs}/vendor {sysfs}/device; basename $(readlink {sysfs}/driver) 2>/dev/null || true")
    fields = out.stdout.split()
    assert len(fields) >= 2 and re.fullmatch(r"0x[0-9a-f]{4}", fields[0]) and fields[0] != "0xffff", \
        f"the guest sees no PCI device at the mdev's address {mdev.guest_address}: {out.stdout!r}"
    return f"{fields[0]}:{fields[1]}", (fields[2] if len(fields) > 2 else "")


@pytest.mark.parametrize("cpr_mdev_backend", [Backend.IOMMUFD], ids=["iommufd"])
def test_mdev_on_iommufd_goes_through_cpr_transfer(cpr_mdev_guest: tuple[CprVM, Mdev], cpr_source_build: QemuBuild,
                                                   cpr_accel: str, request: pytest.FixtureRequest) -> None:
    """The same mdev as `test_mdev_blocks_cpr_transfer`, opened through its vfio cdev on an iommufd
    (no container; the series makes mdevs possible here: QEMU's mdev blocker belongs to the legacy
    container), so QEMU lists no mdev blocker and two cpr-transfers must complete, after each the guest
    (same boot) still seeing the device with its driver bound, its kernel log clean. QEMU 11.1.3 aborts
    the old QEMU instead (bugs.py: mdev-on-iommufd-aborts-source): a strict expected failure."""
    bug = MDEV_ON_IOMMUFD_ABORTS_SOURCE
    if bug.affects(cpr_source_build, cpr_accel, vfio=True):
        request.applymarker(pytest.mark.xfail(strict=True, raises=CheckFailed, reason=bug.describe(cpr_source_build)))
    vm, mdev = cpr_mdev_guest
    seen = _mdev_seen(vm, mdev)
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    reasons = vm.current.qmp.execute("query-migrate").get("blocked-reasons", [])
    assert not [r for r in reasons if "mdev" in r], f"QEMU blocks CPR for the mdev on iommufd: {reasons}"
    for _ in range(2):
        try:
            result = vm.transfer()
        except TransferFailed as exc:
            if re.search(bug.stderr, str(exc)):  # its signature, nothing else, counts as the bug
                raise CheckFailed(f"{bug.describe(cpr_source_build)}: {exc}") from exc
            raise
        assert result.status == "completed", f"transfer {result.index}: {result.status}: {result.error}"
        assert vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id, "the guest rebooted"
        assert _mdev_seen(vm, mdev) == seen, f"the guest's view of the mdev changed: {seen} before"
    checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    print(f"mdev {mdev.uuid} on iommufd: 2 transfers completed; guest sees {seen[0]}, driver {seen[1] or 'none'}")


# Found in the virtual host (QEMU 11.1.3, legacy container): the new QEMU's VFIO_DMA_MAP_FLAG_VADDR
# fails with ENOMEM only after the old QEMU reported the migration completed (postmigrate, vaddrs
# given up), so the new QEMU aborts ("vfio: DMA mapping failed, unable to continue") and nobody runs
# the guest. docs/hardware-runners.md, "Memlock".
MEMLOCK_AFTER_SWITCHOVER = ("QEMU >= 10.1, legacy container: a target whose RLIMIT_MEMLOCK cannot hold the DMA "
                            "pins fails its VFIO_DMA_MAP_FLAG_VADDR (ENOMEM) after the switchover: the new QEMU "
                            "aborts and the old one stays in postmigrate, the guest is lost (no clean refusal)")


@pytest.mark.vfio(role="nic")
def test_memlock_limited_target_fails_for_memlock_and_pinned_accounting(
        cpr_vfio_guest: PassthroughGuest, cpr_source_build: QemuBuild, cpr_target_build: QemuBuild,
        request: pytest.FixtureRequest) -> None:
    """A target QEMU without CAP_IPC_LOCK whose RLIMIT_MEMLOCK (prlimit) cannot hold the guest's DMA
    pins. Legacy container: the new QEMU's VFIO_DMA_MAP_FLAG_VADDR charges the pins to its
    RLIMIT_MEMLOCK (type1 moves locked_vm to the new mm), so the kernel refuses it: the transfer
    fails, and the new QEMU names the reason (`vfio_container_dma_map ... Cannot allocate memory`);
    the old QEMU must then keep the guest and its NIC (a strict expected failure where QEMU meets the
    limit only after the switchover, MEMLOCK_AFTER_SWITCHOVER). iommufd: pages an old QEMU with
    CAP_IPC_LOCK mapped are charged to no limit, so the transfer completes; IOMMU_IOAS_CHANGE_PROCESS
    leaves their VmPin with the old QEMU (passthrough.IOMMUFD_UNACCOUNTED), which the check holds."""
    guest = cpr_vfio_guest
    vm = guest.vm
    held = procfds.locked_memory(vm.current.pid)
    assert held.total_kib, f"the source QEMU has no locked or pinned memory ({held}): nothing to limit"
    limit = held.total_kib * 1024 // 4
    target = memlock_limited(cpr_target_build, limit, vm.artifacts)
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    print(f"source QEMU holds {held}; target RLIMIT_MEMLOCK {limit} bytes, no CAP_IPC_LOCK")
    if guest.devices.backend == "legacy":
        if cpr_source_build.version >= (10, 1, 0):
            request.applymarker(pytest.mark.xfail(strict=True, raises=CheckFailed, reason=MEMLOCK_AFTER_SWITCHOVER))
        with pytest.raises(TransferFailed) as refused:
            vm.transfer(target=target)
        said = "".join(p.read_text(errors="replace") for p in sorted(vm.artifacts.glob("qemu-g*.stderr"))
                       if p.name != "qemu-g0.stderr")
        assert re.search(r"vfio_container_dma_map\(.*\) = -12 \(Cannot allocate memory\)", said), \
            (f"the memlock-limited target did not fail for want of memlock (ENOMEM on its DMA map): "
             f"{refused.value}; its stderr: {said[:2000]!r}")
        print(f"the target failed for memlock: {refused.value}")
        status = vm.current.qmp.execute("query-status")["status"]
        if status != "running":
            raise CheckFailed(f"the old QEMU does not run the guest after the memlock-limited target failed: "
                              f"{status} (logs: {vm.artifacts})")
        with guest.nic_traffic(tcp=False) as traffic:
            traffic.wait_answers(50, 60.0)
        assert len(vm.generations) == 1, "the refused target QEMU must be gone"
    else:
        with guest.host_watch() as watch, vm.observing(watch):
            watch.before_transfer(vm.current.pid)
            result = vm.transfer(target=target)
        checks.assert_completed(result, vm.artifacts)
        watch.check_pinned_moved(result, vm.artifacts)
        print(f"completed under the memlock limit: {watch.pinned}")
    assert vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    guest.check_guest_log()
