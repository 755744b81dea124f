"""Live update from one QEMU build to another: the point of live update (build A -> build B)."""

from __future__ import annotations

import os

import pytest

from pytest_cpr import checks
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def test_transfer_to_a_different_build_and_back(cpr_vm_factory, cpr_source_build: QemuBuild,
                                                cpr_target_build: QemuBuild, cpr_thresholds: dict) -> None:
    """Source build -> target build, then target -> source again; skipped when only one build is set."""
    if os.path.samefile(cpr_source_build.binary, cpr_target_build.binary):
        pytest.skip(f"only one QEMU build ({cpr_source_build.describe()}): set --cpr-target-qemu / "
                    "CPR_TARGET_QEMU to a second build to test build A -> build B")
    vm: CprVM = cpr_vm_factory()
    vm.boot()
    with vm.traffic() as traffic:
        there = vm.live_update(traffic, target=cpr_target_build, **cpr_thresholds)
        back = vm.live_update(traffic, target=cpr_source_build, **cpr_thresholds)
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    assert there.target.endswith(cpr_target_build.short_version)
    assert back.target.endswith(cpr_source_build.short_version)
