"""What each CPR mode needs of the VM, as QEMU's docs/devel/migration/CPR.rst says, with a real guest.

- cpr-transfer and cpr-exec preserve guest RAM in place, so every RAM block must be shared memory:
  memory backends with share=on (not share=off, not plain anonymous `-m` RAM) and `-machine
  aux-ram-share=on` for the implicit blocks (ROMs, ACPI tables). Without it QEMU must refuse
  `migrate` before it stops the guest (a migration blocker), and the guest runs on in the old QEMU
  with its memory intact.
- cpr-reboot keeps RAM in place only when it is a named shared file and x-ignore-shared is set;
  otherwise QEMU copies all guest RAM into the state file (documented, not refused): the transfer
  completes and the state file holds the RAM.
- No mode may be used with postcopy (CPR.rst caveats): `migrate` is refused, the guest runs on.

Each test writes a random pattern into guest memory (a tmpfs file) before and reads it back after.
Run with a build that has the mode (ci/test.sh runs this file with qemu-next as both builds; with the
host's QEMU 10.0.2 the cpr-exec cases skip with its version).
"""

from __future__ import annotations

import pytest

from pytest_cpr.errors import TransferFailed
from pytest_cpr.kinds import Accel, Mode
from pytest_cpr.qemu.bugs import CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.vm import CprVM

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
PATTERN = "/run/cpr-pattern"  # tmpfs: its pages are guest RAM
PATTERN_MIB = 48

# What QEMU needs of guest RAM for the modes that keep it in place, broken one way each
# (VmConfig overrides), for cpr-transfer and cpr-exec.
NOT_SHARED = {"share=off": {"ram_share": False}, "anonymous-ram": {"anonymous_ram": True},
              "aux-ram-share=off": {"aux_ram_share": False}}
IN_PLACE_MODES = (Mode.CPR_TRANSFER, Mode.CPR_EXEC)
CPR_MODES = tuple(m for m in Mode if m is not Mode.NORMAL)


def _mode_params(modes: tuple[Mode, ...], layouts: dict[str, dict[str, bool]] | None = None) -> list[object]:
    if layouts is None:
        return [pytest.param(str(m), {}, marks=pytest.mark.cpr(mode=str(m)), id=str(m)) for m in modes]
    return [pytest.param(str(m), overrides, marks=pytest.mark.cpr(mode=str(m)), id=f"{m}-{name}")
            for m in modes for name, overrides in layouts.items()]


def _write_pattern(vm: CprVM) -> str:
    """PATTERN_MIB of random bytes in a guest tmpfs file; returns its sha256."""
    fs = vm.run("stat -f -c %T /run").stdout.strip()
    assert fs == "tmpfs", f"/run in the guest is {fs}, not tmpfs: the pattern would not be in guest RAM"
    vm.run(f"head -c {PATTERN_MIB}M /dev/urandom > {PATTERN}")
    return _pattern_sum(vm)


def _pattern_sum(vm: CprVM) -> str:
    return vm.run(f"sha256sum {PATTERN}").stdout.split()[0]


def _boot(factory: object, **overrides: object) -> CprVM:
    vm: CprVM = factory(**overrides)  # type: ignore[operator]
    vm.boot()
    return vm


def _assert_refused_before_stop(vm: CprVM, failed: TransferFailed, boot_id: str, pattern: str,
                                events_before: int, traffic: object) -> str:
    """QEMU refused `migrate`: the guest never stopped, runs on in the old QEMU with the same boot,
    SSH session and memory; nothing of the attempt runs. Returns QEMU's reason."""
    result = failed.result
    assert result.status == "failed" and result.error, result
    old = vm.current
    assert old.label == "g0" and old.exit_reason() is None, "the old QEMU must keep running the guest"
    events = [e["event"] for e in old.qmp.events[events_before:]]
    assert "STOP" not in events, f"QEMU stopped the guest before it refused: {events}"
    assert old.qmp.execute("query-status")["status"] == "running"
    assert vm.run(BOOT_ID).stdout.strip() == boot_id
    assert _pattern_sum(vm) == pattern, "guest memory changed across a refused CPR"
    traffic.wait_answers(20, 30.0)  # type: ignore[attr-defined]
    assert all(p.popen is None or p.exit_reason() is not None for p in vm.machine.failed), \
        "a target of the attempt still runs"
    return result.error


@pytest.mark.parametrize(("mode", "overrides"), _mode_params(IN_PLACE_MODES, NOT_SHARED))
def test_precondition_ram_not_shared_is_refused_before_the_guest_stops(
        mode: str, overrides: dict[str, bool], cpr_vm_factory: object, cpr_source_build: QemuBuild,
        cpr_accel: Accel, request: pytest.FixtureRequest) -> None:
    """Guest RAM that is not shared memory (share=off, anonymous -m RAM, or aux-ram-share=off for
    ROMs and ACPI tables): QEMU refuses cpr-transfer / cpr-exec at `migrate`, naming the RAM block,
    before stopping the guest; the guest runs on in the old QEMU with its memory, boot and SSH session.
    cpr-exec on the builds of CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED (qemu/bugs.py) does not refuse: a
    strict xfail there."""
    bug = CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED
    if bug.affects(cpr_source_build, cpr_accel, False, mode):
        request.applymarker(pytest.mark.xfail(strict=True, reason=bug.describe(cpr_source_build)))
    vm = _boot(cpr_vm_factory, **overrides)
    boot_id = vm.run(BOOT_ID).stdout.strip()
    pattern = _write_pattern(vm)
    with vm.traffic() as traffic:
        traffic.wait_answers(20, 30.0)
        before = len(vm.current.qmp.events)
        with pytest.raises(TransferFailed) as failed:
            vm.transfer()
        reason = _assert_refused_before_stop(vm, failed.value, boot_id, pattern, before, traffic)
    assert "share" in reason and "CPR" in reason.upper(), f"QEMU's refusal should say what CPR needs: {reason}"


@pytest.mark.parametrize(("mode", "overrides"), _mode_params(CPR_MODES))
def test_precondition_postcopy_is_refused_in_every_mode(mode: str, overrides: dict[str, bool],
                                                        cpr_vm: CprVM) -> None:
    """CPR.rst: no CPR mode may be used with postcopy. With postcopy-ram set, `migrate` in the mode is
    refused before the guest stops; the guest runs on with its memory; without it the next transfer
    in the same mode completes."""
    boot_id = cpr_vm.run(BOOT_ID).stdout.strip()
    pattern = _write_pattern(cpr_vm)
    source = cpr_vm.current
    source.qmp.execute("migrate-set-capabilities",
                       {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    with cpr_vm.traffic() as traffic:
        traffic.wait_answers(20, 30.0)
        before = len(source.qmp.events)
        with pytest.raises(TransferFailed) as failed:
            cpr_vm.transfer()
        reason = _assert_refused_before_stop(cpr_vm, failed.value, boot_id, pattern, before, traffic)
        assert "postcopy" in reason.lower(), reason
        source.qmp.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "postcopy-ram", "state": False}]})
        again = cpr_vm.transfer()
    assert again.status == "completed" and again.mode == mode
    assert cpr_vm.run(BOOT_ID).stdout.strip() == boot_id and _pattern_sum(cpr_vm) == pattern


@pytest.mark.cpr(mode="cpr-reboot")
@pytest.mark.parametrize("share", ["share=on", "share=off"])
def test_cpr_reboot_share_off_copies_guest_ram_into_the_state_file(share: str, cpr_vm_factory: object) -> None:
    """cpr-reboot keeps guest RAM in place when it is a named shared file (the harness's memfd, with
    x-ignore-shared): the state file holds device state only. With share=off QEMU copies the RAM into
    the state file instead (documented, not refused). Either way the guest comes back with its
    memory, boot and SSH session."""
    vm = _boot(cpr_vm_factory, ram_share=share == "share=on")
    boot_id = vm.run(BOOT_ID).stdout.strip()
    pattern = _write_pattern(vm)
    result = vm.transfer()
    assert result.status == "completed", result.error
    assert vm.run(BOOT_ID).stdout.strip() == boot_id and _pattern_sum(vm) == pattern
    size = result.state_file_bytes
    assert size is not None
    if share == "share=on":
        assert size < 8 << 20, f"guest RAM kept in place, yet the state file has {size} bytes"
    else:
        assert size > PATTERN_MIB << 20, f"share=off: guest RAM must be copied, state file has {size} bytes"
