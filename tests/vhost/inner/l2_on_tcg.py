"""Run inside the virtual host only (needs its host config), on demand: an L2 on TCG inside a TCG
L1 boots in minutes, so this is not part of the CI subset:

    python -m pytest_cpr.vhost run --name tcg-l2 --timeout 2400 -- tests/vhost/inner/l2_on_tcg.py -rs

It documents a QEMU bug found by the feasibility experiment: with the guest on TCG, cpr-transfer of a
guest with a vfio-pci device crashes the old QEMU (SIGSEGV in kvm_vm_ioctl() called from
migration_call_notifiers(): a KVM call with TCG as the accelerator). On the builds known to crash
the test is a strict expected failure naming the version, so a fixed QEMU turns it red: then set
`fixed_in` of KVM_CALL_UNDER_TCG in pytest_cpr/qemu/bugs.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_cpr.errors import CprError
from pytest_cpr.qemu.bugs import KVM_CALL_UNDER_TCG
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.vfio_fixtures import VfioDevices
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


@pytest.mark.timeout(1800)
@pytest.mark.vfio(role="nic")
def test_vfio_transfer_with_guest_on_tcg(cpr_vfio: VfioDevices, cpr_vm_factory: Callable[..., CprVM],
                                         cpr_source_build: QemuBuild, request: pytest.FixtureRequest) -> None:
    """A vfio-pci guest on TCG through one cpr-transfer: completes, and the old QEMU exits cleanly."""
    if KVM_CALL_UNDER_TCG.affects(cpr_source_build, "tcg", vfio=True):
        request.applymarker(pytest.mark.xfail(strict=True, raises=(CprError, AssertionError),
                                              reason=KVM_CALL_UNDER_TCG.describe(cpr_source_build)))
    vm = cpr_vm_factory(accel="tcg", extra_args=cpr_vfio.qemu_args(), kernel_flavor="full", memory_mib=512,
                        cmdline=cpr_vfio.kernel_args(), boot_timeout=900.0)
    vm.boot()
    source = vm.current
    result = vm.transfer()
    assert result.status == "completed", f"transfer {result.status}: {result.error}"
    status = source.popen.wait(30) if source.popen is not None else None
    assert status == 0, f"old QEMU exit status {status} (negative: killed by that signal)"
    vm.run("true")
