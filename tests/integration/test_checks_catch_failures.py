"""The checks must fail when live update breaks the guest: a test that passes on a broken guest is
worthless. Here the guest's NIC link goes down across the transfer (set on the source just before
migrate; virtio-net migrates its link state), so the target resumes a guest whose network is dead."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_cpr import checks, faults
from pytest_cpr.checks import CheckFailed
from pytest_cpr.errors import BootHung, CprTimeout, QemuExited, QemuQuitFailed
from pytest_cpr.observers import Callbacks
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def test_connectivity_and_interrupt_checks_catch_a_dead_nic(cpr_vm: CprVM) -> None:
    source = cpr_vm.current
    pattern = cpr_vm.nic_irq_pattern()

    def link_down(_target: QemuProcess) -> None:
        source.qmp.execute("set_link", {"name": "n0", "up": False})

    with cpr_vm.traffic(tcp=False) as traffic:
        s0 = cpr_vm.snapshot()
        traffic.wait_answers(100, 60.0)
        s1 = cpr_vm.snapshot()
        result = cpr_vm.transfer(before_migrate=link_down)
        checks.assert_completed(result)  # QEMU itself reports success...
        with pytest.raises(CheckFailed, match="did not run a command after it"):
            checks.assert_connectivity(result)  # ...but the guest is unreachable
        s2 = cpr_vm.snapshot(via="console")
        traffic.wait_sent(400)
        s3 = cpr_vm.snapshot(via="console")
        with pytest.raises(CheckFailed, match=r"stayed silent after it.*input"):
            checks.assert_interrupts((s0, s1), (s2, s3), pattern)
        checks.assert_same_boot(s1, s2)  # the guest itself survived
        assert result.probe is not None and "first_probe_after" not in result.timeline

        # positive control: with the link back up the same SSH session and the probes recover,
        # so it was the link (what the checks are for) and not the harness that failed
        cpr_vm.current.qmp.execute("set_link", {"name": "n0", "up": True})
        traffic.wait_answers(50, 60.0)
        assert cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == s0.boot_id


def test_carrier_unchanged_by_a_transfer_and_the_flap_check_catches_a_flapped_link(cpr_vm: CprVM) -> None:
    """A clean cpr-transfer leaves the guest NIC's carrier_changes as it was (virtio-net migrates its
    link state; recorded as cpr_t<i>_carrier_changes = 0). Control: the link flaps (QMP set_link down,
    the guest sees it, up again) on the source right before migrate; everything else about the transfer
    is fine, and the flap check fails naming the interface and both counts."""
    main = cpr_vm.ifname_of()
    carrier = f"/sys/class/net/{main}/carrier"

    def guest_sees(state: int) -> None:  # over the source's console: SSH rides on this link
        console = source.console or source.connect_console(30)
        console.run(f"for i in $(seq 100); do [ $(cat {carrier}) = {state} ] && break; sleep 0.1; done", timeout=30)

    def flap(_target: QemuProcess) -> None:
        for up in (False, True):
            source.qmp.execute("set_link", {"name": "n0", "up": up})
            guest_sees(int(up))

    with cpr_vm.traffic(tcp=False) as traffic:
        clean = cpr_vm.live_update(traffic)
        assert clean.carrier_changes == 0
        assert clean.link_drops is not None, "the interfaces' drop counters were not read"
        before = cpr_vm.carrier_changes([main])[main]
        source = cpr_vm.current
        flap_failure = (rf"transfer 2: the guest NIC link went down across the transfer \(a reset or a flap\): "
                        rf"{main} carrier_changes {before} -> {before + 2}")
        with cpr_vm.observing(Callbacks(before_migrate=flap)), pytest.raises(CheckFailed, match=flap_failure):
            cpr_vm.live_update(traffic)
        flapped = cpr_vm.transfers[-1]
        assert (flapped.status, flapped.carrier_changes, flapped.numbers()["carrier_changes"]) == ("completed", 2, 2)
        assert cpr_vm.live_update(traffic).carrier_changes == 0  # the link itself is fine again


def test_a_stuck_guest_is_diagnosed(cpr_vm_factory: Callable[..., CprVM]) -> None:
    """A guest that stops answering (here: its QEMU paused) fails with a summary of why, and
    guest-stuck.txt holds QEMU's run state, the vCPU registers and the console's answer, so a hang
    after a transfer leaves evidence instead of a bare timeout."""
    vm = cpr_vm_factory(command_timeout=10.0)
    vm.boot()
    vm.current.qmp.execute("stop")
    with pytest.raises(CprTimeout, match=r"QEMU paused, serial console silent .*guest-stuck\.txt"):
        vm.snapshot()
    text = (vm.artifacts / "guest-stuck.txt").read_text()
    assert "'status': 'paused'" in text and "RIP=" in text, text[:2000]
    vm.current.qmp.execute("cont")
    assert vm.snapshot(via="console").boot_id  # the same guest, alive again


def test_a_guest_reset_is_named_when_qemu_exits(cpr_vm: CprVM) -> None:
    """Under -no-reboot a guest reset ends QEMU; the exit message says the guest reset itself (a
    kernel crash or triple fault looks like this), not just "exit code 0"."""
    assert cpr_vm.ssh is not None
    cpr_vm.ssh.start("echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger")
    proc = cpr_vm.current
    assert proc.popen is not None
    proc.popen.wait(60)
    proc.qmp.wait_event(lambda e: e.get("event") == "SHUTDOWN", 10, "the SHUTDOWN event")
    assert "after SHUTDOWN by the guest: guest-reset" in (proc.exit_reason() or ""), proc.exit_reason()
    started = time.monotonic()
    with pytest.raises(QemuExited, match=r"the guest is gone: .*guest-reset"):
        cpr_vm.run("true", timeout=120)  # ends at once: no waiting out the timeout on a dead guest
    assert time.monotonic() - started < 60, "waited out the command timeout on a guest that is gone"


def test_a_hung_boot_is_diagnosed_and_retried(cpr_vm_factory: Callable[..., CprVM]) -> None:
    """A guest that never finishes booting (here: no init to run, and panic=0 keeps the panicked
    kernel spinning) fails at the boot timeout with guest-stuck.txt: QEMU still running, the vCPU
    registers, the console silent; not just "no host key line". With boot_attempts = 2 the boot is
    retried once, announced, the hung boot's console and diagnosis kept under its own label."""
    vm = cpr_vm_factory(boot_timeout=30.0, boot_attempts=2,
                        cmdline=("rdinit=/nonexistent", "root=/dev/nonexistent", "panic=0"))
    with pytest.warns(UserWarning, match="boot 1 of 2 hung"), \
            pytest.raises(BootHung, match=r"(?s)CPR-HOSTKEY.*QEMU running, serial console silent .*guest-stuck\.txt"):
        vm.boot()
    assert [r.split(":")[0] for r in vm.boot_retries] == ["g0"]
    text = (vm.artifacts / "guest-stuck.txt").read_text()
    assert "== the guest did not finish booting" in text and "RIP=" in text, text[:2000]
    assert "RIP=" in (vm.artifacts / "guest-stuck-g0.txt").read_text()
    assert "Kernel panic" in (vm.artifacts / "console-g0.log").read_text()
    assert "Kernel panic" in (vm.artifacts / "console-g0-retry1.log").read_text()
    assert [p.label for p in vm.generations] == ["g0-retry1"]


def test_a_target_that_complains_on_stderr_fails_the_live_update(cpr_vm: CprVM, cpr_accel: str) -> None:
    """A transfer that completes while QEMU reports trouble on stderr fails, naming the line: here the
    target is started with `-cpu max,+avx512f`, which TCG cannot give (QEMU warns and leaves the
    feature out, so the transfer itself works). The next transfer, without the complaint, passes."""
    if cpr_accel != "tcg":
        pytest.skip(f"the warning this control provokes is TCG's (the guest runs on {cpr_accel})")
    with cpr_vm.traffic(tcp=False) as traffic:
        with faults.target_args(cpr_vm, ("-cpu", "max,+avx512f")), \
                pytest.raises(CheckFailed, match=r"reported trouble on stderr during it:\n  warning: TCG doesn't "
                                                 r"support requested feature: CPUID.07H:EBX.avx512f"):
            cpr_vm.live_update(traffic)
        assert cpr_vm.transfers[-1].status == "completed"
        result = cpr_vm.live_update(traffic)  # the new QEMU repeats nothing of it: quiet
    assert result.qemu_messages == []


def test_a_qemu_that_does_not_quit_cleanly_fails_at_close(cpr_vm_factory: Callable[..., CprVM],
                                                          cpr_source_build: QemuBuild, tmp_path: Path) -> None:
    """At the end of a test the QEMU running the guest must end with exit code 0 when told to quit (a
    crash there is a teardown bug, e.g. after a transfer). Here a real QEMU runs under a wrapper that
    ends with exit code 3 once QEMU has quit, as a QEMU crashing on its way out would."""
    wrapper = tmp_path / "qemu-then-exit-3"
    wrapper.write_text(f'#!/bin/sh\n"{cpr_source_build.binary}" "$@"\nexit 3\n')
    wrapper.chmod(0o755)
    build = dataclasses.replace(cpr_source_build, binary=str(wrapper))
    vm = cpr_vm_factory(source=build, target=build)
    vm.boot()
    vm.run("true")
    with pytest.raises(QemuQuitFailed, match=r"did not end with exit code 0 when told to quit at the end of the "
                                             r"test: QEMU g0 exited \(exit code 3, after SHUTDOWN by the host"):
        vm.close()
    assert not list(vm.machine.rundir.parent.glob(vm.machine.rundir.name)), "close must clean up before it fails"
