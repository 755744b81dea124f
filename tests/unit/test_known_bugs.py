"""The known-bug table and the check that names a known crash of the old QEMU instead of failing on it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pytest_cpr import checks
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.qemu.bugs import (
    CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED,
    KVM_CALL_UNDER_TCG,
    KVM_STATE_NULL_AFTER_CPR,
    KnownBug,
    known_bugs,
)
from pytest_cpr.qemu.probe import QemuBuild


def build(version: tuple[int, int, int]) -> QemuBuild:
    return QemuBuild("/usr/bin/qemu-system-x86_64", version, "", frozenset({"cpr-transfer"}),
                     frozenset({"vfio-pci"}), frozenset())


@pytest.mark.parametrize(("version", "accel", "vfio", "expected"), [
    ((11, 1, 3), "kvm", False, []),  # closing KVM after cpr comes with VFIO CPR
    ((11, 1, 3), "kvm", True, [KVM_STATE_NULL_AFTER_CPR]),
    ((11, 1, 3), "tcg", True, [KVM_CALL_UNDER_TCG]),
    ((11, 1, 3), "tcg", False, []),
    ((10, 0, 2), "kvm", True, []),  # before VFIO CPR and closing KVM after it
])
def test_which_builds_and_setups_a_bug_affects(version: tuple[int, int, int], accel: str, vfio: bool,
                                               expected: list[KnownBug]) -> None:
    assert known_bugs(build(version), accel, vfio) == expected


def test_a_bug_of_one_mode_affects_only_transfers_in_that_mode() -> None:
    bug = CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED
    assert known_bugs(build((11, 1, 3)), "tcg", False, "cpr-exec") == [bug]
    assert known_bugs(build((11, 1, 3)), "kvm", False, "cpr-exec") == [bug], "any accelerator"
    assert bug not in known_bugs(build((11, 1, 3)), "tcg", False, "cpr-transfer")
    assert bug not in known_bugs(build((11, 1, 3)), "tcg", False), "no mode given: not a mode's bug"
    assert bug not in known_bugs(build((10, 1, 0)), "tcg", False, "cpr-exec"), "before cpr-exec existed"


def test_a_fixed_build_is_no_longer_affected() -> None:
    fixed = replace(KVM_STATE_NULL_AFTER_CPR, fixed_in=(11, 2, 0))
    assert fixed.affects(build((11, 1, 3)), "kvm", True)
    assert not fixed.affects(build((11, 2, 0)), "kvm", True)


def result(source_exit: str | None) -> TransferResult:
    r = TransferResult(1, ProcessRef("g0", "11.1.3"), ProcessRef("g1", "11.1.3"))
    r.source_exit = source_exit
    return r


def test_a_clean_quit_passes() -> None:
    checks.assert_source_quit(result("exit code 0"))


def test_a_crash_of_the_old_qemu_fails_with_how_it_ended() -> None:
    with pytest.raises(checks.CheckFailed, match=r"old QEMU g0 11\.1\.3 ended signal 11 when told to quit"):
        checks.assert_source_quit(result("signal 11"), logs="/tmp/x")


def test_a_crash_matching_a_known_bug_is_named_not_failed() -> None:
    r = result("signal 11")
    checks.assert_source_quit(r, [KVM_STATE_NULL_AFTER_CPR])
    assert any("kvm-state-null-after-cpr" in n for n in r.notes), r.notes


def test_another_ending_than_the_known_bugs_still_fails() -> None:
    with pytest.raises(checks.CheckFailed, match="signal 6"):
        checks.assert_source_quit(result("signal 6"), [KVM_STATE_NULL_AFTER_CPR])
