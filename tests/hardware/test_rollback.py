"""Failed live updates of a guest with live passthrough devices (igb NIC + NVMe, each backend): the
old QEMU must run the guest again with its devices working, and a next transfer must complete.

Two ways to fail: the fault points of pytest_cpr.faults (the target killed or the migration
cancelled at a precise point), and kernel calls that fail inside a QEMU process (an LD_PRELOAD shim
of ours fails one ioctl once: pytest_cpr.ioctl_faults), which run the VFIO CPR series' own failure
and recovery paths: the old QEMU's unmap-all of its DMA vaddrs failing, or the new QEMU's
re-registration of them. Throughout, a TCP stream and probes run over the passthrough NIC and O_DIRECT
writes with read-back over the NVMe; at the end the stream arrived intact, every slot written reads
back identical and the guest's kernel log is clean. `test_rollback_checks_catch_*` are the controls:
each rollback check fails when its behaviour breaks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_cpr import checks, faults
from pytest_cpr.checks import CheckFailed
from pytest_cpr.errors import CprError
from pytest_cpr.faults import Fault, FaultOutcome
from pytest_cpr.fixtures import host_unavailable
from pytest_cpr.guest.state import GuestSnapshot
from pytest_cpr.ioctl_faults import (
    IOAS_CHANGE_PROCESS,
    MAP_DMA_VADDR,
    UNMAP_DMA_VADDR_ALL,
    IoctlCall,
    IoctlFault,
    shim_library,
)
from pytest_cpr.probing import Traffic
from pytest_cpr.qemu.bugs import TARGET_VADDR_MAP_FAILURE_LOSES_GUEST
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.rollback import DMA_ROUND_TIMEOUT_S, DMA_ROUNDS, LiveDevices, assert_old_qemu_runs, assert_rolled_back
from pytest_cpr.settings import CprSettings
from pytest_cpr.vfio_fixtures import HostWatch, PassthroughGuest

pytestmark = pytest.mark.cpr(mode="cpr-transfer")

# fault point -> (factory, the source's migration status after it)
ROLLBACK_FAULTS: dict[str, tuple[Callable[[], Fault], tuple[str, ...]]] = {
    # the target dies while the cpr state (the device, container and iommufd fds) is in flight
    "kill-reading-cpr-state": (faults.kill_target_reading_cpr_state, ("failed",)),
    # the target holds the fds and waits for the main stream; killed there, the source goes on:
    # it unmaps its DMA vaddrs (legacy) in the device state save, meets the closed channel and must
    # restore them (the series' unmap-all recovery)
    "kill-after-cpr-state": (faults.kill_target_after_cpr_state, ("failed",)),
    "cancel-at-switchover": (faults.cancel_at_switchover, ("cancelled",)),
}


@pytest.fixture(scope="session")
def ioctl_shim(cpr_settings: CprSettings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ioctl fault shim: --cpr-ioctl-shim / CPR_IOCTL_SHIM, else built now with cc."""
    try:
        return shim_library(cpr_settings.ioctl_shim, tmp_path_factory.mktemp("ioctl-shim"))
    except CprError as exc:
        host_unavailable(str(exc), cpr_settings)


@pytest.fixture
def live(cpr_vfio_guest: PassthroughGuest) -> Iterator[LiveDevices]:
    """NVMe DMA running on the guest's passthrough NVMe (stopped at the end if the test did not)."""
    devices = LiveDevices(cpr_vfio_guest)
    yield devices
    if not devices.dma.log:
        try:
            devices.guest.vm.run("touch /tmp/cpr-dma.stop", timeout=10)
        except CprError:
            pass


def _save(guest: PassthroughGuest, outcome: FaultOutcome) -> None:
    (guest.vm.artifacts / f"fault-{outcome.fault}.json").write_text(outcome.describe())


def _next_transfer_and_end(guest: PassthroughGuest, live: LiveDevices, traffic: Traffic, watch: HostWatch,
                           thresholds: dict) -> None:
    """A next transfer completes with every live-update check; DMA rounds pass after it; the host's
    vfio lines and kernel log stay fine."""
    guest.transfer_checked(traffic, live.pattern, watch, **thresholds)
    live.dma.wait_rounds(DMA_ROUNDS, DMA_ROUND_TIMEOUT_S)
    watch.check_log(guest.vm.artifacts)
    watch.check_irqs(guest.vm.artifacts)


def _rolled_back_then_next_transfer(guest: PassthroughGuest, live: LiveDevices, traffic: Traffic, watch: HostWatch,
                                    source: QemuProcess, outcome: FaultOutcome,
                                    before: tuple[GuestSnapshot, GuestSnapshot], thresholds: dict) -> None:
    """The failed transfer left the old QEMU running the guest with both devices live (probes, DMA
    rounds, every NIC and NVMe vector), the host's kernel log clean; then a next transfer completes."""
    vm = guest.vm
    assert_rolled_back(vm, source, outcome)
    fired = live.assert_live_after(traffic, before)
    watch.check_log(vm.artifacts)
    print(f"{outcome.fault}: transfer {outcome.result.status}: {outcome.error}; vectors after: {fired['after']}")
    _next_transfer_and_end(guest, live, traffic, watch, thresholds)


def _end_checks(guest: PassthroughGuest, live: LiveDevices, traffic: Traffic) -> None:
    rounds = live.stop()
    checks.assert_stream_intact(traffic.stream_result, guest.vm.artifacts)
    guest.check_guest_log()
    print(f"NVMe DMA rounds: {rounds}")


@pytest.mark.vfio(role="nic")
@pytest.mark.vfio(role="nvme")
@pytest.mark.parametrize("fault", list(ROLLBACK_FAULTS))
def test_rollback_with_live_nic_and_nvme(fault: str, cpr_vfio_guest: PassthroughGuest, live: LiveDevices,
                                         cpr_thresholds: dict) -> None:
    """The fault fails the transfer; the old QEMU runs the guest again; over the passthrough devices
    probes are answered, DMA rounds pass and every NIC and NVMe vector that fired before fires
    after; a next transfer completes with every check; the TCP stream and the DMA data are intact."""
    guest = cpr_vfio_guest
    vm = guest.vm
    factory, statuses = ROLLBACK_FAULTS[fault]
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        live.start()
        source = vm.current
        before = live.window(traffic)
        outcome = faults.inject(vm, factory())
        _save(guest, outcome)
        assert outcome.result.status in statuses, (f"fault {fault}: status {outcome.result.status}, expected one "
                                                   f"of {statuses}; {outcome.describe()}")
        _rolled_back_then_next_transfer(guest, live, traffic, watch, source, outcome, before, cpr_thresholds)
    _end_checks(guest, live, traffic)


def _ioctl_fault_in_old_qemu(guest: PassthroughGuest, live: LiveDevices, shim: Path, call: IoctlCall,
                             thresholds: dict) -> None:
    """A first transfer starts the new QEMU with the shim (unarmed: it completes with every check);
    armed, that QEMU's `call` fails once in the next transfer, which must fail cleanly with the
    devices live in it; then a transfer without the fault completes."""
    vm = guest.vm
    fault = IoctlFault(shim, call, vm.rundir, vm.artifacts)
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        live.start()
        with faults.target_args(vm, env=fault.env()):
            guest.transfer_checked(traffic, live.pattern, watch, **thresholds)
        source = vm.current
        assert fault.loaded_in(source.pid), f"the shim is not loaded in {source.label}: {fault.lines()}"
        assert fault.strikes() == 0, f"the unarmed shim failed a call: {fault.lines()}"
        before = live.window(traffic)
        fault.arm()
        outcome = faults.inject(vm, Fault(f"ioctl-{call.request:#x}", f"in the old QEMU: {fault.describe()}"))
        _save(guest, outcome)
        assert fault.strikes(source.pid) == 1, (f"the shim did not fail {call.name} in the old QEMU {source.label} "
                                                f"(pid {source.pid}): {fault.lines()}; {outcome.describe()}")
        _rolled_back_then_next_transfer(guest, live, traffic, watch, source, outcome, before, thresholds)
        assert fault.strikes() == 1, f"the shim struck again: {fault.lines()}"
    _end_checks(guest, live, traffic)


@pytest.mark.vfio(role="nic", backend="legacy")
@pytest.mark.vfio(role="nvme", backend="legacy")
def test_ioctl_unmap_vaddr_all_fails_in_old_qemu(cpr_vfio_guest: PassthroughGuest, live: LiveDevices,
                                                ioctl_shim: Path, cpr_thresholds: dict) -> None:
    """Legacy container: the old QEMU's VFIO_IOMMU_UNMAP_DMA with VADDR|ALL (its device state save
    abandons the DMA vaddrs) fails: the transfer fails, the old QEMU runs the guest with DMA and
    vectors working, a next transfer completes."""
    _ioctl_fault_in_old_qemu(cpr_vfio_guest, live, ioctl_shim, UNMAP_DMA_VADDR_ALL, cpr_thresholds)


@pytest.mark.vfio(role="nic", backend="iommufd")
@pytest.mark.vfio(role="nvme", backend="iommufd")
def test_ioctl_change_process_fails_in_old_qemu(cpr_vfio_guest: PassthroughGuest, live: LiveDevices,
                                               ioctl_shim: Path, cpr_thresholds: dict) -> None:
    """iommufd: the old QEMU's IOMMU_IOAS_CHANGE_PROCESS (its device state save tries it, so a
    mapping the new process could not take fails the update before the switch) fails: the transfer
    fails, the old QEMU runs the guest with DMA and vectors working, a next transfer completes."""
    _ioctl_fault_in_old_qemu(cpr_vfio_guest, live, ioctl_shim, IOAS_CHANGE_PROCESS, cpr_thresholds)


@pytest.mark.vfio(role="nic", backend="legacy")
@pytest.mark.vfio(role="nvme", backend="legacy")
def test_ioctl_map_vaddr_fails_in_new_qemu(cpr_vfio_guest: PassthroughGuest, live: LiveDevices, ioctl_shim: Path,
                                           cpr_thresholds: dict, cpr_source_build: QemuBuild, cpr_accel: str,
                                           request: pytest.FixtureRequest) -> None:
    """Legacy container: the new QEMU's VFIO_IOMMU_MAP_DMA with VADDR (it re-registers the guest
    RAM's new addresses while loading the container's state) fails: the transfer must fail and the
    old QEMU run the guest again with DMA and vectors working; then a transfer completes. QEMU 11.1.3
    loses the guest here (bugs.py: target-vaddr-map-failure-loses-guest): a strict expected failure."""
    bug = TARGET_VADDR_MAP_FAILURE_LOSES_GUEST
    if bug.affects(cpr_source_build, cpr_accel, vfio=True):
        request.applymarker(pytest.mark.xfail(strict=True, raises=CheckFailed, reason=bug.describe(cpr_source_build)))
    guest, vm = cpr_vfio_guest, cpr_vfio_guest.vm
    fault = IoctlFault(ioctl_shim, MAP_DMA_VADDR, vm.rundir, vm.artifacts)
    with guest.host_watch() as watch, guest.nic_traffic() as traffic:
        live.start()
        source = vm.current
        before = live.window(traffic)
        fault.arm()
        inject = Fault("ioctl-map-vaddr", f"in the new QEMU: {fault.describe()}")
        with faults.target_args(vm, env=fault.env()):
            outcome = faults.inject(vm, inject)
        _save(guest, outcome)
        assert fault.strikes() == 1, f"the shim did not fail {MAP_DMA_VADDR.name} in the new QEMU: {fault.lines()}"
        if outcome.source_alive and outcome.source_status != "running":
            assert inject.target is not None
            said = [ln for ln in inject.target.stderr_path.read_text(errors="replace").splitlines() if "error" in ln]
            source.kill()  # the guest is lost; told to quit, this old QEMU meets kvm-state-null-after-cpr
            raise CheckFailed(f"{MAP_DMA_VADDR.name} failed in the new QEMU: the old QEMU reported the migration "
                              f"{outcome.result.qemu.get('status')!r} and stays {outcome.source_status!r} (the "
                              f"guest runs nowhere); the new QEMU said {said[-3:]} and "
                              f"{(outcome.target_exit or '').splitlines()[0]} (logs: {vm.artifacts})")
        _rolled_back_then_next_transfer(guest, live, traffic, watch, source, outcome, before, cpr_thresholds)
    _end_checks(guest, live, traffic)


@pytest.mark.vfio(role="nic", backend="legacy")
@pytest.mark.vfio(role="nvme", backend="legacy")
def test_rollback_checks_catch_a_stopped_qemu_silent_vectors_and_bad_dma(cpr_vfio_guest: PassthroughGuest,
                                                                      live: LiveDevices) -> None:
    """Controls of the rollback checks, on a real rollback (migrate_cancel at switchover): the old
    QEMU left stopped fails "old QEMU resumes"; NVMe vectors silent after it (DMA paused) fail the
    vector check; a slot overwritten behind the DMA's back fails the read-back."""
    guest, vm = cpr_vfio_guest, cpr_vfio_guest.vm
    with guest.nic_traffic(tcp=False) as traffic:
        live.start()
        source = vm.current
        before = live.window(traffic)
        outcome = faults.inject(vm, faults.cancel_at_switchover())
        assert_rolled_back(vm, source, outcome)  # the real rollback passes
        source.qmp.execute("stop")
        with pytest.raises(CheckFailed, match="promises it runs the guest again"):
            assert_old_qemu_runs(source, timeout=2.0)
        source.qmp.execute("cont")
        assert_old_qemu_runs(source)
        script = vm.run("pgrep -f cpr-dma.sh | head -1").stdout.strip()
        vm.run(f"kill -STOP {script}")
        try:
            quiet = vm.snapshot()
            traffic.wait_answers(100, 60.0)
            with pytest.raises(CheckFailed, match="stayed silent"):
                checks.assert_interrupts(before, (quiet, vm.snapshot()), live.pattern, vm.artifacts)
        finally:
            vm.run(f"kill -CONT {script}")
        live.dma.wait_rounds(1, DMA_ROUND_TIMEOUT_S)
    last = [ln.split() for ln in vm.run("cat /tmp/cpr-dma.log").stdout.splitlines() if ln.startswith("OK ")][-1]
    slot = int(last[2])
    vm.run(f"dd if=/dev/urandom of=/dev/{live.dma.namespace} bs=1M seek={slot} count=1 oflag=direct "
           "conv=notrunc status=none")
    with pytest.raises(CheckFailed, match=f"verify slot={slot}"):
        live.stop()
    assert os.path.exists(vm.artifacts / "nvme-dma.log")
