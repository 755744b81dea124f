"""Live update from one QEMU build to another: the point of live update (build A -> build B).

Run with a second build as target, e.g. the cached trixie-backports build (`cpr-image build
qemu-next`): CPR_TARGET_QEMU=$(cpr-image path qemu-next)/bin/qemu-system-x86_64. ci/test.sh does.
"""

from __future__ import annotations

import os

import pytest

from pytest_cpr import checks
from pytest_cpr.errors import TransferFailed
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def _need_two_builds(source: QemuBuild, target: QemuBuild) -> None:
    if os.path.samefile(source.binary, target.binary):
        pytest.skip(f"only one QEMU build ({source.describe()}): set --cpr-target-qemu / CPR_TARGET_QEMU to a "
                    "second build (e.g. `cpr-image build qemu-next`) to test build A -> build B")


def test_update_to_the_target_build(cpr_vm_factory, cpr_source_build: QemuBuild,
                                    cpr_target_build: QemuBuild, cpr_thresholds: dict) -> None:
    """Source build -> target build under traffic with every check, then target -> target again
    (the updated guest must itself be updatable). The machine type stays the source's versioned one."""
    _need_two_builds(cpr_source_build, cpr_target_build)
    vm: CprVM = cpr_vm_factory()
    vm.boot()
    with vm.traffic() as traffic:
        first = vm.live_update(traffic, target=cpr_target_build, **cpr_thresholds)
        again = vm.live_update(traffic, target=cpr_target_build, **cpr_thresholds)
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    assert first.source.version == cpr_source_build.short_version
    assert first.target.version == cpr_target_build.short_version
    assert again.target.version == cpr_target_build.short_version
    assert vm.current.argv[vm.current.argv.index("-machine") + 1].startswith(cpr_source_build.q35_machine)


def test_going_back_to_the_older_build_keeps_the_guest(cpr_vm_factory, cpr_source_build: QemuBuild,
                                                       cpr_target_build: QemuBuild) -> None:
    """Target build -> source build. Upstream does not promise updates to an older QEMU (CPR state
    gains subsections); whatever happens, the guest must keep running: either the transfer completes
    with every check, or it fails and the newer QEMU resumes the guest with its SSH session intact."""
    _need_two_builds(cpr_source_build, cpr_target_build)
    vm: CprVM = cpr_vm_factory()
    vm.boot()
    with vm.traffic() as traffic:
        vm.live_update(traffic, target=cpr_target_build)
        newer = vm.current
        try:
            vm.live_update(traffic, target=cpr_source_build)
            outcome = "completed"
        except TransferFailed as exc:
            outcome = f"refused: {exc}"
            assert vm.current is newer, "after a failed transfer the source must still own the guest"
            assert newer.qmp.execute("query-status")["status"] == "running", \
                "QEMU promises the source resumes the guest when the target fails"
            traffic.wait_answers(50, 60.0)
            assert vm.run("true").exit_code == 0
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    vm.artifacts.joinpath("downgrade-outcome.txt").write_text(
        f"{cpr_target_build.short_version} -> {cpr_source_build.short_version}: {outcome}\n")
