"""What bounds a passthrough transfer, at L0 without a VM: the default thresholds and their precedence,
the NVMe I/O stall across a transfer, the moved DMA pins (a fake /proc tree), the blocker's refusal,
and the memlock-limited target's wrapper. Each check is shown failing on the input it exists for."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_cpr import checks
from pytest_cpr.checks import CheckFailed
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.errors import CprError, TransferFailed
from pytest_cpr.kinds import Backend, Phase
from pytest_cpr.passthrough import (
    PASSTHROUGH_THRESHOLDS,
    DmaMark,
    HostWatch,
    dma_completions,
    dma_stall_ms,
    memlock_limited,
    refusal_problem,
)
from pytest_cpr.procfs import LockedMemory, parse_locked_memory
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.settings import resolve, thresholds_in_force

pytest_plugins = ["pytester"]

# ---- thresholds: marker > setting > passthrough default > none


def test_passthrough_tests_get_the_default_thresholds_unless_set() -> None:
    settings = resolve({}, env={})
    assert thresholds_in_force({}, settings, PASSTHROUGH_THRESHOLDS) == PASSTHROUGH_THRESHOLDS
    assert thresholds_in_force({}, settings, {}) == dict.fromkeys(PASSTHROUGH_THRESHOLDS)  # virtio: none


def test_a_setting_overrides_the_default_and_none_switches_it_off() -> None:
    settings = resolve({"max_blackout_ms": "500", "max_lost_probes": "none"}, env={"CPR_MAX_DMA_STALL_MS": "7"})
    assert thresholds_in_force({}, settings, PASSTHROUGH_THRESHOLDS) == {
        "max_blackout_ms": 500.0, "max_lost_probes": None, "max_dma_stall_ms": 7.0}


def test_the_marker_overrides_setting_and_default() -> None:
    settings = resolve({"max_lost_probes": "3"}, env={})
    got = thresholds_in_force({"max_lost_probes": 1, "max_dma_stall_ms": None}, settings, PASSTHROUGH_THRESHOLDS)
    assert got == {"max_blackout_ms": PASSTHROUGH_THRESHOLDS["max_blackout_ms"], "max_lost_probes": 1,
                   "max_dma_stall_ms": None}


def test_an_unknown_marker_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"cpr_thresholds marker: unknown key 'max_blackout'; use \["):
        thresholds_in_force({"max_blackout": 1}, resolve({}, env={}), {})


# ---- the NVMe I/O stall across a transfer

LOG = """W 0 0 100.0
OK 0 0 100.5
W 1 1 101.0
OK 1 1 101,5
FAIL nothing
W 2 2 102.2
OK 2 2 102.6
DONE 3
"""


def test_completions_are_the_timed_write_and_read_back_lines() -> None:
    assert dma_completions(LOG) == [100.0, 100.5, 101.0, 101.5, 102.2, 102.6]  # a decimal comma too


def test_the_stall_counts_the_pause_the_guest_clock_did_not_see() -> None:
    """Guest clock 1000 s behind the host before, 1000.3 s after: the VM was paused 300 ms between
    the I/O at guest 101.5 and the next at 102.2, so that gap is 700 + 300 ms on the host."""
    before, after = DmaMark(100.2, 1000.0), DmaMark(103.0, 1000.3)
    assert dma_stall_ms(LOG, before, after, stopped_at=1101.8) == 1000.0
    assert dma_stall_ms(LOG, before, after, stopped_at=None) == 700.0  # no STOP seen: guest time only


def test_too_few_completions_between_the_marks_is_an_error() -> None:
    with pytest.raises(CprError, match=r"has 1 completed I/O\(s\) between the marks"):
        dma_stall_ms(LOG, DmaMark(102.5, 0.0), DmaMark(110.0, 0.0), None)


def _result(stall: float | None) -> TransferResult:
    result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
    result.dma_stall_ms = stall
    result.timeline[Phase.SOURCE_STOPPED] = 1.0
    return result


def test_dma_stall_bound_fails_a_longer_stall() -> None:
    checks.assert_dma_stall(_result(900.0), 1000.0)
    checks.assert_dma_stall(_result(5e6), None)  # no bound: recorded only
    with pytest.raises(CheckFailed, match=r"transfer 1: DMA stalled 1000.5 ms across it, more than 1000 ms "
                                          r"\(max_dma_stall_ms\) \(logs: art\)"):
        checks.assert_dma_stall(_result(1000.5), 1000.0, "art")
    with pytest.raises(CheckFailed, match="DMA stalled None ms"):  # a bound needs a measurement
        checks.assert_dma_stall(_result(None), 1000.0)


def test_the_stall_goes_to_the_reported_numbers() -> None:
    assert _result(123.0).numbers()["dma_stall_ms"] == 123.0


# ---- the DMA pins move to the new QEMU (fake /proc)


def test_status_parser_reads_vmlck_and_vmpin() -> None:
    text = "Name:\tqemu\nVmPeak:\t 100 kB\nVmLck:\t   2048 kB\nVmPin:\t  4 kB\n"
    assert parse_locked_memory(text) == LockedMemory(2048, 4)
    assert parse_locked_memory("Name:\tx\n") == LockedMemory(0, 0)
    assert parse_locked_memory("VmLck:\t0 kB\nCapEff:\t0000000000004000\n").ipc_lock
    assert not parse_locked_memory("CapEff:\t000001ffffffbfff\n").ipc_lock


class FakeProc:
    """/proc/<pid>/status and fd/ of an old QEMU (100) and a new one (200)."""

    OLD, NEW = 100, 200

    def __init__(self, root: Path) -> None:
        self.root = root

    def set(self, pid: int, vmlck: int = 0, vmpin: int = 0, cap_eff: str = "0000000000000000") -> None:
        (self.root / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (self.root / str(pid) / "status").write_text(
            f"Name:\tqemu\nVmLck:\t{vmlck} kB\nVmPin:\t{vmpin} kB\nCapEff:\t{cap_eff}\n")


def transfer(tmp_path: Path, before: dict[str, Any], old_after: dict[str, Any], new_after: dict[str, Any],
             new_exit: dict[str, Any] | None = None, backend: Backend | None = None
             ) -> tuple[HostWatch, TransferResult]:
    """Drive a HostWatch through one transfer's events with the figures each moment shows."""
    proc = FakeProc(tmp_path / "proc")
    proc.set(proc.OLD, **before)
    proc.set(proc.NEW)
    watch = HostWatch([], tmp_path, proc.root, backend)
    watch.before_transfer(proc.OLD)
    watch.on_spawned(SimpleNamespace(pid=proc.NEW))  # type: ignore[arg-type]
    proc.set(proc.OLD, **old_after)
    proc.set(proc.NEW, **new_after)
    watch.on_before_retire(SimpleNamespace(pid=proc.OLD))  # type: ignore[arg-type]
    proc.set(proc.NEW, **(new_after if new_exit is None else new_exit))
    result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
    watch.on_result(result)
    return watch, result


GUEST = 1_048_576  # KiB pinned: 1 GiB of guest RAM


def test_pins_that_moved_pass_and_are_recorded(tmp_path: Path) -> None:
    watch, result = transfer(tmp_path, {"vmlck": GUEST}, {}, {"vmlck": GUEST})  # legacy: VmLck
    watch.check_pinned_moved(result)
    assert result.numbers()["old_qemu_vmlck_before_kib"] == GUEST
    assert result.numbers()["new_qemu_vmlck_exit_kib"] == GUEST
    assert result.numbers()["old_qemu_vmlck_after_kib"] == 0
    watch, result = transfer(tmp_path, {"vmpin": GUEST}, {}, {"vmpin": GUEST})  # iommufd: VmPin
    watch.check_pinned_moved(result)


def test_a_pin_left_with_the_old_qemu_fails(tmp_path: Path) -> None:
    """Control: the kernel charged the new QEMU but never released the old one (counted twice)."""
    watch, result = transfer(tmp_path, {"vmlck": GUEST}, {"vmlck": GUEST}, {"vmlck": GUEST})
    with pytest.raises(CheckFailed, match=r"transfer 1: locked/pinned memory did not move to the new QEMU: the "
                                          r"old QEMU accounts VmLck 1048576 kB, VmPin 0 kB after the "
                                          r"transfer \(counted twice"):
        watch.check_pinned_moved(result, "art")


def test_pins_lost_on_the_way_or_at_the_old_qemus_exit_fail(tmp_path: Path) -> None:
    watch, result = transfer(tmp_path, {"vmpin": GUEST}, {}, {})  # accounted nowhere
    with pytest.raises(CheckFailed, match=r"the new QEMU accounts VmLck 0 kB, VmPin 0 kB after the transfer, the "
                                          r"old one held VmLck 0 kB, VmPin 1048576 kB before it"):
        watch.check_pinned_moved(result)
    watch, result = transfer(tmp_path, {"vmpin": GUEST}, {}, {"vmpin": GUEST}, {"vmpin": GUEST - 4})
    with pytest.raises(CheckFailed, match=r"changed when the old one exited: VmLck 0 kB, VmPin 1048576 kB -> "
                                          r"VmLck 0 kB, VmPin 1048572 kB"):
        watch.check_pinned_moved(result)


ROOT_CAPS = "000001ffffffffff"  # CapEff of root: CAP_IPC_LOCK (bit 14) among them


def test_iommufd_pins_of_a_qemu_with_ipc_lock_stay_with_the_old_qemu(tmp_path: Path) -> None:
    """The kernel's rule (IOPT_PAGES_ACCOUNT_NONE: need_charge_update is false): VmPin stays with the
    old QEMU, the new one shows none; noted on the result, and a double count still fails."""
    root, iommufd = {"vmpin": GUEST, "cap_eff": ROOT_CAPS}, Backend.IOMMUFD
    watch, result = transfer(tmp_path, root, root, {"cap_eff": ROOT_CAPS}, backend=iommufd)
    watch.check_pinned_moved(result)
    assert any("IOMMU_IOAS_CHANGE_PROCESS leaves" in note for note in result.notes)
    nothing = {"cap_eff": ROOT_CAPS}  # the second transfer: the pins stayed with the first QEMU's mm
    watch, result = transfer(tmp_path, nothing, nothing, nothing, backend=iommufd)
    watch.check_pinned_moved(result)
    watch, result = transfer(tmp_path, root, {}, {"vmpin": GUEST, "cap_eff": ROOT_CAPS})  # backend unknown: moved
    watch.check_pinned_moved(result)
    watch, result = transfer(tmp_path, root, root, {"vmpin": GUEST, "cap_eff": ROOT_CAPS}, backend=iommufd)
    with pytest.raises(CheckFailed, match=r"the new QEMU accounts VmLck 0 kB, VmPin 1048576 kB after the transfer "
                                          r"\(counted twice"):
        watch.check_pinned_moved(result)
    legacy = {"vmlck": GUEST, "cap_eff": ROOT_CAPS}
    watch, result = transfer(tmp_path, legacy, {}, {"vmlck": GUEST}, backend=Backend.LEGACY)
    watch.check_pinned_moved(result)  # legacy type1 moves VmLck with CAP_IPC_LOCK too (the limit is bypassed)
    assert not result.notes


def test_nothing_pinned_before_is_no_pass(tmp_path: Path) -> None:
    watch, result = transfer(tmp_path, {}, {}, {})
    with pytest.raises(CheckFailed, match="no locked or pinned memory before the transfer"):
        watch.check_pinned_moved(result)


def test_a_transfer_the_watch_did_not_see_complete_is_no_pass(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.set(proc.OLD, vmlck=GUEST)
    watch = HostWatch([], tmp_path, proc.root)
    watch.before_transfer(proc.OLD)
    with pytest.raises(CheckFailed, match="figures missing: old_after, new_after, new_exit"):
        watch.check_pinned_moved(_result(None))


# ---- the blocker's refusal


def refused(error: Exception | None, text: str = "cpr-transfer refused") -> TransferFailed:
    failure = TransferFailed(text)
    failure.__cause__ = error
    return failure


def test_a_refusal_by_migrate_naming_its_blocker_passes() -> None:
    reason = "VFIO container does not support VFIO_UPDATE_VADDR"
    error = QmpError("migrate", "GenericError", reason)
    assert refusal_problem(refused(error, f"migrate refused: {error}"), [reason]) is None


def test_a_refusal_for_another_reason_fails() -> None:
    reason = "VFIO container does not support VFIO_UPDATE_VADDR"
    other = QmpError("migrate", "GenericError", "Failed to connect to 'unix:/x': No such file")
    assert "for another reason than its blockers" in str(refusal_problem(refused(other, str(other)), [reason]))
    assert "lists no blocked-reasons" in str(refusal_problem(refused(other, str(other)), []))
    late = QmpError("query-migrate", "GenericError", reason)  # a failure after migrate was accepted
    assert "not as the answer to `migrate`" in str(refusal_problem(refused(late, reason), [reason]))
    assert "not as the answer to `migrate`" in str(refusal_problem(refused(None, reason), [reason]))


# ---- the memlock-limited target: no CAP_IPC_LOCK, RLIMIT_MEMLOCK set, same process


def test_memlock_wrapper_drops_ipc_lock_and_limits_memlock(tmp_path: Path) -> None:
    build = QemuBuild("/bin/sh", (11, 1, 3), "", frozenset(), frozenset(), frozenset())
    wrapped = memlock_limited(build, 65536, tmp_path)
    assert wrapped.binary != build.binary and wrapped.version == build.version
    out = subprocess.run([wrapped.binary, "-c", "grep CapEff /proc/$$/status; grep 'locked memory' "
                          "/proc/$$/limits"], capture_output=True, text=True, timeout=30, check=True).stdout
    cap_eff = int(out.split("CapEff:")[1].split()[0], 16)
    assert not cap_eff & (1 << 14), f"CAP_IPC_LOCK still effective: {out}"
    assert out.split("Max locked memory")[1].split()[:2] == ["65536", "65536"], out


def test_fixtures_apply_marker_over_setting_and_no_passthrough_default_without_vfio(pytester: pytest.Pytester) -> None:
    """The fixtures' wiring: a test without a vfio marker gets no passthrough default; the marker
    beats the setting; cpr_thresholds keeps live_update's two keyword arguments."""
    pytester.makepyfile("""
        import pytest

        def test_plain(cpr_thresholds, cpr_max_dma_stall_ms):
            assert cpr_thresholds == {"max_blackout_ms": 300.0, "max_lost_probes": None}
            assert cpr_max_dma_stall_ms is None

        @pytest.mark.cpr_thresholds(max_blackout_ms=5, max_dma_stall_ms=7)
        def test_marked(cpr_thresholds, cpr_max_dma_stall_ms):
            assert cpr_thresholds == {"max_blackout_ms": 5, "max_lost_probes": None}
            assert cpr_max_dma_stall_ms == 7

        @pytest.mark.cpr_thresholds(max_blackout=5)
        def test_misspelt(cpr_thresholds):
            pass
        """)
    result = pytester.runpytest("--cpr-max-blackout-ms=300", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*cpr_thresholds marker: unknown key 'max_blackout'*"])
