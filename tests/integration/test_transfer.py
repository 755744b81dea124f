"""A real guest (TCG or KVM, virtio-net on a harness-owned tap) through cpr-transfer, end to end."""

from __future__ import annotations

import pytest

from pytest_cpr import checks
from pytest_cpr.checks import CheckFailed
from pytest_cpr.qemu.bugs import known_bugs
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def test_three_transfers_keep_ssh_stream_and_interrupts(cpr_vm: CprVM, cpr_thresholds: dict) -> None:
    """Three consecutive transfers of one guest under probe + TCP traffic: the SSH session opened at
    boot keeps working, the stream arrives complete and in order, the guest never reboots, every NIC
    vector that fired before each transfer fires after it, and the guest log stays clean."""
    boot_id = cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with cpr_vm.traffic() as traffic:
        results = [cpr_vm.live_update(traffic, **cpr_thresholds) for _ in range(3)]
    checks.assert_stream_intact(traffic.stream_result, cpr_vm.artifacts)
    checks.assert_clean_dmesg(cpr_vm.collect_dmesg(), cpr_vm.artifacts)
    assert [r.status for r in results] == ["completed"] * 3
    assert len(cpr_vm.generations) == 4, "each transfer must start exactly one new QEMU process"
    assert cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    for r in results:
        assert r.qemu_downtime_ms is not None and r.blackout_ms is not None
        assert r.interrupts is not None and r.interrupts["after"], "NIC vectors must fire after transfer"


# What management software asks the old QEMU after a migration, before it tells it to quit.
QUERIES_AFTER_TRANSFER = ("query-status", "query-migrate", "query-name", "query-cpus-fast", "query-block",
                          "query-balloon", "query-kvm")


def test_old_qemu_answers_queries_then_quits_cleanly(cpr_vm: CprVM, cpr_source_build: QemuBuild, cpr_accel: str,
                                                     request: pytest.FixtureRequest) -> None:
    """After a completed transfer the old QEMU waits in postmigrate until it is told to quit, and
    management software still asks it what happened. Each query gets an answer (a return, or a QMP
    error such as "no balloon device"), the process stays alive through all of them, and `quit` ends
    it with exit code 0. On builds with a known bug here (qemu/bugs.py) this is a strict expected
    failure, so a fixed build turns it red."""
    bugs = known_bugs(cpr_source_build, cpr_accel, vfio=False)
    if bugs:
        request.applymarker(pytest.mark.xfail(strict=True, raises=CheckFailed,
                                              reason="; ".join(b.describe(cpr_source_build) for b in bugs)))
    answers: dict[str, str] = {}
    died: list[str] = []

    def ask(source: QemuProcess) -> None:
        for command in QUERIES_AFTER_TRANSFER:
            try:
                source.qmp.execute(command, timeout=10)
                answers[command] = "return"
            except QmpError as exc:
                answers[command] = f"error: {exc}"
            except Exception as exc:  # no answer at all: did the process die on this one?
                source.wait_exit(5.0)
                died.append(f"{command}: {exc}; {source.exit_reason() or 'still running'}")
                return
            if source.exit_reason() is not None:
                died.append(f"{command}: {source.exit_reason()}")
                return

    result = cpr_vm.transfer(before_retire=ask)
    checks.assert_completed(result, cpr_vm.artifacts)
    if died:
        raise CheckFailed(f"the old QEMU (postmigrate) died answering {died[0]}; answered before: {answers}")
    assert answers["query-status"] == "return" and answers["query-migrate"] == "return", answers
    checks.assert_source_quit(result, (), cpr_vm.artifacts)
    cpr_vm.run("true")
