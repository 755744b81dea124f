"""Every CPR mode the builds have, with a real guest (TCG or KVM, virtio-net on a harness-owned tap),
through the same live-update checks: cpr-transfer (a new QEMU process), cpr-exec (the QEMU
process exec's the new QEMU in place, same PID) and cpr-reboot (state to a file, the old QEMU quits,
a new one loads it; optionally with the guest suspended to RAM, as VFIO requires); and the cpr
channel handed to the new QEMU as an already-listening fd.

cpr-exec needs QEMU >= 10.2 as source and target, the fd-passed cpr channel 10.1, cpr-reboot 8.2;
where a build lacks one its test skips with the build and its version. Run with the cached build, e.g.
CPR_QEMU=CPR_TARGET_QEMU=$(cpr-image path qemu-next)/bin/qemu-system-x86_64 (ci/test.sh does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_cpr import checks
from pytest_cpr.errors import TransferFailed
from pytest_cpr.kinds import Mode, Phase
from pytest_cpr.observers import Callbacks
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.vm import CprVM

MODES = [pytest.param(str(m), marks=pytest.mark.cpr(mode=str(m)), id=str(m)) for m in Mode]


def _listening_inode(path: Path) -> str:
    """The inode of the UNIX socket listening at `path` (/proc/net/unix)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path):
            return fields[6]
    raise AssertionError(f"nothing listens at {path}")


def _fds(pid: int) -> dict[str, str]:
    """The open fds of a process: number -> what it points at (sockets and memfds by name and inode)."""
    fds = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[fd.name] = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
    return fds


@pytest.mark.parametrize("mode", MODES)
def test_live_update_in_each_mode_keeps_ssh_stream_and_interrupts(mode: str, cpr_vm: CprVM, cpr_thresholds: dict,
                                                                   request: pytest.FixtureRequest) -> None:
    """Two transfers in `mode` under probe + TCP traffic, each with every live-update check: SSH
    session kept, stream complete and in order, same boot, every NIC vector that fired before fires
    after, guest log clean. cpr-exec keeps the PID (one process, three generations) and its fd count
    (nothing piles up across exec's); cpr-transfer and normal (RAM copied, for contrast) start one new
    process per transfer, and so does cpr-reboot, but only once the old one quit, with guest RAM kept
    in place (a small state file). The mode is on the result, in transfers.json and in the JUnit
    properties."""
    boot_id = cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    results, fds = [], []
    with cpr_vm.traffic() as traffic:
        for _ in range(2):
            results.append(cpr_vm.live_update(traffic, **cpr_thresholds))
            fds.append(sorted(_fds(cpr_vm.current.pid).values()))
    checks.assert_stream_intact(traffic.stream_result, cpr_vm.artifacts)
    checks.assert_clean_dmesg(cpr_vm.collect_dmesg(), cpr_vm.artifacts)
    assert cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    assert [(r.mode, r.status) for r in results] == [(mode, "completed")] * 2
    pids = [g.pid for g in cpr_vm.generations]
    assert [g.label for g in cpr_vm.generations] == ["g0", "g1", "g2"]
    if mode == Mode.CPR_EXEC:
        assert len(set(pids)) == 1, f"cpr-exec must keep the QEMU's PID, saw {pids}"
        assert all(r.source_pid == r.target_pid == pids[0] for r in results)
        assert cpr_vm.current.qmp.execute("query-status")["status"] == "running"
        assert len(fds[1]) == len(fds[0]), f"fds pile up across exec's: {fds[0]} -> {fds[1]}"
    else:
        assert len(set(pids)) == 3, f"{mode} starts one new QEMU per transfer, saw {pids}"
        assert all(r.source_pid != r.target_pid for r in results)
    if mode == Mode.CPR_REBOOT:  # the old QEMU quits before the new one starts; RAM stayed in place
        assert all(r.timeline[Phase.SOURCE_EXITED] <= r.timeline[Phase.TARGET_SPAWNED] for r in results)
        assert all(r.state_file_bytes is not None and r.state_file_bytes < 8 << 20 for r in results), \
            [r.state_file_bytes for r in results]
    for r in results:
        assert r.qemu_downtime_ms is not None and r.blackout_ms is not None
        assert r.interrupts is not None and r.interrupts["after"], "NIC vectors must fire after transfer"
    saved = json.loads((cpr_vm.artifacts / "transfers.json").read_text())
    assert [t["mode"] for t in saved] == [t["numbers"]["mode"] for t in saved] == [mode] * 2
    props = dict(request.node.user_properties)
    assert props["cpr_t1_mode"] == props["cpr_t2_mode"] == mode


@pytest.mark.cpr(mode="cpr-exec")
def test_cpr_exec_of_a_missing_binary_leaves_the_old_qemu_running_the_guest(
        cpr_vm: CprVM, cpr_target_build: QemuBuild, tmp_path: Path, cpr_thresholds: dict) -> None:
    """cpr-exec-command names a binary that does not exist: QEMU says MIGRATION completed, then the
    exec fails, QEMU marks the migration failed and resumes the guest in the old QEMU (as documented).
    The harness reports the failure with QEMU's reason, the old QEMU keeps running the guest (same
    PID, same SSH session, same boot), nothing of the attempt is left behind, and the next cpr-exec
    to the real build succeeds with every check."""
    missing = dataclasses.replace(cpr_target_build, binary=str(tmp_path / "no-such-qemu-system-x86_64"))
    old = cpr_vm.current
    boot_id = cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with cpr_vm.traffic() as traffic:
        fds_before = _fds(old.pid)
        with pytest.raises(TransferFailed) as failed:
            cpr_vm.transfer(target=missing)
        leaked = sorted(set(_fds(old.pid).items()) - set(fds_before.items()))
        assert not leaked, f"the old QEMU kept fds the failed exec opened: {leaked}"
        result = cpr_vm.transfers[0]
        assert failed.value.result is result
        assert (result.mode, result.status) == ("cpr-exec", "failed")
        assert result.error is not None and "execvp" in result.error and "No such file" in result.error, \
            result.error
        assert cpr_vm.current is old and old.exit_reason() is None and old.replaced_by is None
        assert old.qmp.execute("query-status")["status"] == "running", "QEMU must resume the guest"
        assert [e["data"]["status"] for e in old.qmp.events if e["event"] == "MIGRATION"][-2:] == \
            ["completed", "failed"], "QEMU says completed before it exec's, then failed"
        assert cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
        assert not list(cpr_vm.rundir.glob("state-*")), "the state file of the failed attempt must be removed"
        assert not list(cpr_vm.rundir.glob("qmp-g1*")), "no new QEMU was started"
        again = cpr_vm.live_update(traffic, **cpr_thresholds)
    checks.assert_stream_intact(traffic.stream_result, cpr_vm.artifacts)
    checks.assert_clean_dmesg(cpr_vm.collect_dmesg(), cpr_vm.artifacts)
    assert again.status == "completed" and again.target.label == "g1"
    assert cpr_vm.current.pid == old.pid and cpr_vm.current.label == "g1-retry1"


@pytest.mark.cpr(mode="cpr-exec")
def test_cpr_exec_of_a_command_that_fails_reports_the_lost_guest(cpr_vm: CprVM, cpr_target_build: QemuBuild,
                                                                 tmp_path: Path) -> None:
    """cpr-exec-command exists but is no QEMU (a program that exits 3): the exec succeeds, so the old
    QEMU is gone and cannot resume the guest (QEMU can only recover a failed exec). The harness must
    say so at once (exit code, not a timeout), and leave no process and no state file behind."""
    wrapper = tmp_path / "qemu-that-fails"
    wrapper.write_text("#!/bin/sh\necho 'not a QEMU' >&2\nexit 3\n")
    wrapper.chmod(0o755)
    pid = cpr_vm.current.pid
    with pytest.raises(TransferFailed) as failed:
        cpr_vm.transfer(target=dataclasses.replace(cpr_target_build, binary=str(wrapper)))
    result = cpr_vm.transfers[0]
    assert result.status == "failed" and result.error is not None
    assert "exit code 3" in result.error, result.error
    assert "not a QEMU" in str(failed.value)
    assert result.timeline.get("migration_completed") is not None, "QEMU completed before it exec'd"
    assert not os.path.exists(f"/proc/{pid}"), "the exec'd process must be reaped"
    assert not list(cpr_vm.rundir.glob("state-*"))
    assert cpr_vm.current.exit_reason() is not None, "the machine must know its QEMU is gone"


@pytest.mark.cpr(mode="cpr-transfer")
def test_cpr_transfer_fd_passing_of_a_listening_cpr_channel(cpr_vm_factory: Callable[..., CprVM],
                                                            cpr_target_build: QemuBuild, cpr_thresholds: dict) -> None:
    """--cpr-channel-fd: the harness listens on the cpr channel's socket itself and each new QEMU gets
    that listening socket as an inherited fd (`-incoming` cpr channel with addr.type=fd), the way
    management software hands QEMU its sockets; the source connects by path. Two transfers pass every
    live-update check; the new QEMU held the harness's own socket (same inode), and the harness's
    copy and the socket path are gone after each transfer."""
    if (lacking := cpr_target_build.missing("cpr-channel-fd")) is not None:
        pytest.skip(lacking)
    vm = cpr_vm_factory(cpr_channel_fd=True)
    vm.boot()
    seen: list[tuple[str, str]] = []

    def listener_of(target: QemuProcess) -> None:
        cpr = json.loads(target.argv[-1])
        assert cpr["channel-type"] == "cpr" and cpr["addr"]["type"] == "fd", target.argv[-4:]
        held = os.readlink(f"/proc/{target.pid}/fd/{cpr['addr']['str']}")
        seen.append((held, f"socket:[{_listening_inode(vm.rundir / f'cpr-{target.label}.sock')}]"))
        assert not os.path.exists(f"/proc/self/fd/{cpr['addr']['str']}") or \
            os.readlink(f"/proc/self/fd/{cpr['addr']['str']}") != held, "the harness must let go of its copy"

    with vm.traffic() as traffic:
        for _ in range(2):
            with vm.observing(Callbacks(before_migrate=listener_of)):
                result = vm.live_update(traffic, **cpr_thresholds)
            assert result.status == "completed"
            assert not list(vm.rundir.glob("cpr-g*.sock")), "the harness's cpr socket must be gone"
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    assert len(seen) == 2 and all(new.startswith("socket:") and new == ours for new, ours in seen), seen


@pytest.mark.cpr(mode="cpr-reboot")
def test_cpr_reboot_suspends_the_guest_and_wakes_it_in_the_new_qemu(cpr_vm_factory: Callable[..., CprVM]) -> None:
    """cpr-reboot the way QEMU requires it with VFIO devices, shown with a virtio guest: the guest
    suspends to RAM (S3, offered with ICH9-LPC.disable_s3=0), QEMU says SUSPEND and the runstate is
    suspended before `migrate`; the new QEMU loads the state still suspended, system_wakeup wakes it
    (WAKEUP). Same boot, the SSH session kept, the guest kernel logged a deep suspend and its exit,
    TCP stream intact, guest log clean."""
    vm = cpr_vm_factory(reboot_suspend=True)
    vm.boot()
    states = vm.run("cat /sys/power/state; cat /sys/power/mem_sleep 2>&1 || true").stdout
    assert "mem" in states.splitlines()[0], f"the guest offers no suspend to RAM: {states!r}"
    boot_id = vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with vm.traffic() as traffic:
        traffic.wait_answers(20, 30.0)
        result = vm.transfer()
        traffic.wait_answers(20, 60.0)
    checks.assert_completed(result, vm.artifacts)
    checks.assert_source_quit(result, logs=vm.artifacts)
    checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    t = result.timeline
    assert t[Phase.GUEST_SUSPENDED] < t[Phase.SOURCE_STOPPED] < t[Phase.TARGET_SPAWNED] < t[Phase.GUEST_WOKEN]
    assert result.numbers()["suspended_ms"] is not None
    assert vm.current.qmp.execute("query-status")["status"] == "running"
    assert vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    dmesg = vm.collect_dmesg()
    assert "PM: suspend entry (deep)" in dmesg and "PM: suspend exit" in dmesg, "no S3 round trip in the guest log"
    checks.assert_clean_dmesg(dmesg, vm.artifacts)
