"""The old QEMU after a completed transfer, as management software meets it (no passthrough device;
with a vfio-pci device: tests/hardware, same test name)."""

from __future__ import annotations

import pytest

from pytest_cpr import checks
from pytest_cpr.cpr import query_source
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def test_old_qemu_answers_queries_then_quits_cleanly(cpr_vm: CprVM) -> None:
    """After a completed transfer the old QEMU waits in postmigrate until it is told to quit, and
    management software still asks it what happened. Each query gets an answer (a return, or a QMP
    error such as "no balloon device"), the process stays alive through all of them, and `quit`
    ends it with exit code 0. (With a vfio-pci device: tests/hardware, same name.)"""
    answers: dict[str, str] = {}
    result = cpr_vm.transfer(before_retire=lambda source: answers.update(query_source(source)))
    checks.assert_completed(result, cpr_vm.artifacts)
    checks.assert_old_qemu_answered(answers, cpr_vm.artifacts)
    assert answers["query-status"] == "return" and answers["query-migrate"] == "return", answers
    checks.assert_source_quit(result, (), cpr_vm.artifacts)
    cpr_vm.run("true")
