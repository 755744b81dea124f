"""The ioctl fault shim through the harness's own hook (VmSpec.env via faults.target_args), with real
QEMU processes and a virtio guest: no passthrough device needed. The target QEMU probes the shared
tap with TUNGETIFF when it sets up its netdev; failed there, it exits before it listens, the transfer
fails with QEMU's own words, the old QEMU keeps the guest, and a transfer without the fault completes.
The control: the same shim loaded but not armed changes nothing."""

from __future__ import annotations

import pytest

from pytest_cpr import faults
from pytest_cpr.errors import CprError
from pytest_cpr.faults import Fault
from pytest_cpr.fixtures import host_unavailable
from pytest_cpr.ioctl_faults import IoctlCall, IoctlFault, shim_library
from pytest_cpr.settings import CprSettings
from pytest_cpr.vm import CprVM

pytestmark = [pytest.mark.cpr(mode="cpr-transfer"), pytest.mark.timeout(300)]

TUNGETIFF = IoctlCall("TUNGETIFF", 0x800454D2)  # linux/if_tun.h: _IOR('T', 210, unsigned int)
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


@pytest.fixture
def tap_probe_fault(cpr_vm: CprVM, cpr_settings: CprSettings) -> IoctlFault:
    try:
        shim = shim_library(cpr_settings.ioctl_shim, cpr_vm.rundir)
    except CprError as exc:
        host_unavailable(str(exc), cpr_settings)
    return IoctlFault(shim, TUNGETIFF, cpr_vm.rundir, cpr_vm.artifacts)


def test_ioctl_fault_in_the_target_fails_the_transfer_cleanly(cpr_vm: CprVM, tap_probe_fault: IoctlFault) -> None:
    vm, fault = cpr_vm, tap_probe_fault
    boot_id = vm.run(BOOT_ID).stdout.strip()
    source = vm.current
    fault.arm()
    with faults.target_args(vm, env=fault.env()):
        outcome = faults.inject(vm, Fault("ioctl-tungetiff", fault.describe()))
    (vm.artifacts / "fault-ioctl-tungetiff.json").write_text(outcome.describe())
    assert fault.strikes() == 1, f"the shim did not fail TUNGETIFF in the target: {fault.lines()}"
    assert outcome.failed and outcome.target_exit is not None, outcome.describe()
    assert "TUNGETIFF" in outcome.target_exit, f"the target's own words are missing: {outcome.target_exit}"
    assert vm.current is source and outcome.source_status == "running", outcome.describe()
    assert vm.run(BOOT_ID).stdout.strip() == boot_id
    result = vm.transfer()
    assert result.status == "completed", result.error
    assert fault.strikes() == 1, f"the shim struck again: {fault.lines()}"


def test_unarmed_ioctl_shim_in_the_target_changes_nothing(cpr_vm: CprVM, tap_probe_fault: IoctlFault) -> None:
    vm, fault = cpr_vm, tap_probe_fault
    with faults.target_args(vm, env=fault.env()):
        result = vm.transfer()
    assert result.status == "completed", result.error
    assert fault.loaded_in(vm.current.pid), f"the shim was not loaded in the target {vm.current.label}: {fault.lines()}"
    assert fault.strikes() == 0
