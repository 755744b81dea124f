"""ci/test.sh's passthrough sets (vhost_set): in a gating set a failed CPR check fails CI at once and a
fault of L1 itself gets one announced retry in a fresh L1 of what it had not finished; the DMA sets
report unless CPR_VHOST_GATE=all, and CPR_VHOST_GATE=0 makes every failure a warning. Run on the
script's own functions, with the L1 runs stubbed (what each attempt leaves in artifacts/ is written by
the stub) and the real `python -m pytest_cpr.vhost` deciding."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
L1_PANIC = ('<testsuites><testsuite><testcase classname="tests.vhost.test_virtual_host" '
            'name="test_inner_passthrough_transfer"><failure message="virtual host exited while waiting for '
            'pytest: L1 kernel panic: Fatal exception in interrupt"/></testcase></testsuite></testsuites>')
CHECK_FAILED_L0 = ('<testsuites><testsuite><testcase classname="tests.vhost.test_virtual_host" '
                   'name="test_inner_passthrough_transfer"><failure message="tests/hardware/test_passthrough.py::'
                   'test_nvme_dma_through_transfer[legacy]: NVMe vectors silent"/></testcase></testsuite></testsuites>')
CHECK_FAILED = ('<testsuites><testsuite><testcase classname="tests.hardware.test_passthrough" '
                'name="test_nvme_dma_through_transfer[legacy]"><failure message="silent"/></testcase>'
                '</testsuite></testsuites>')
# the stub: the first attempt of each set fails as its name says (panic: L1 died, no inner XML; check: a CPR
# check failed, L1 fine); any retry passes
STUB = f"""
vhost_run() {{
  echo "RUN $1 [$2] $CPR_VHOST_TIMEOUT"
  case "$1" in
    panic) echo '{L1_PANIC}' > artifacts/junit/vhost-l0-panic.xml
           echo 'tests/hardware/test_a.py::test_x[legacy] PASSED [ 10%]' > artifacts/vhost/l1-1/pytest-panic.log
           return 1 ;;
    check) echo '{CHECK_FAILED_L0}' > artifacts/junit/vhost-l0-check.xml
           echo '{CHECK_FAILED}' > artifacts/junit/vhost-check.xml
           return 1 ;;
  esac
  return 0
}}
"""


def _functions() -> str:
    """ci/test.sh from the budget's start (T0=) to the tier's run: fits_budget, say_failed, vhost_set."""
    text = (ROOT / "ci" / "test.sh").read_text()
    start = text.index("\nT0=")
    end = text.index('\nif [ "$TIER2" != 0 ]; then\n  gate=')
    return text[start:end]


def _run(tmp_path: Path, sets: str, **env: str) -> tuple[str, int]:
    (tmp_path / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    python = tmp_path / ".venv" / "bin" / "python"  # the script's interpreter: this one (its virtualenv)
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (tmp_path / "artifacts" / "junit").mkdir(parents=True, exist_ok=True)
    (tmp_path / "artifacts" / "vhost" / "l1-1").mkdir(parents=True, exist_ok=True)
    script = f"rc=0\n{_functions()}\n{STUB}\n{sets}\necho \"RC $rc\"\n"
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "CPR_CI_T0": str(int(time.time())),
                **env}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                         timeout=120)
    rc = int(out.stdout.rsplit("RC ", 1)[1].split()[0])
    return out.stdout + out.stderr, rc


def test_an_l1_fault_gets_one_announced_retry_of_what_was_not_finished(tmp_path: Path) -> None:
    out, rc = _run(tmp_path, "vhost_set panic 'NIC passthrough tests' 'tests/hardware -k nic' 1800")
    assert "::warning::NIC passthrough tests: L1 itself failed (L1 panic: " in out, out
    assert ("RUN panic-retry [tests/hardware -k nic --deselect 'tests/hardware/test_a.py::test_x[legacy]'] 1800"
            in out), out
    assert rc == 0, out


def test_a_failed_cpr_check_fails_ci_at_once_without_a_retry(tmp_path: Path) -> None:
    """Control of the retry: the same set failing on a CPR check inside a live L1 is not retried."""
    out, rc = _run(tmp_path, "vhost_set check 'NVMe DMA tests' 'tests/hardware -k nvme' 1200 dma",
                   CPR_VHOST_GATE="all")
    assert "check-retry" not in out, out
    assert ("::error::NVMe DMA tests in the virtual host failed (exit 1): "
            "'tests/hardware/test_passthrough.py::test_nvme_dma_through_transfer[legacy]'") in out, out
    assert rc == 1, out


def test_a_retry_that_does_not_fit_the_budget_is_skipped_and_the_set_fails(tmp_path: Path) -> None:
    out, rc = _run(tmp_path, "vhost_set panic 'NIC passthrough tests' 'tests/hardware -k nic' 1800",
                   CPR_CI_BUDGET_S="600")
    assert "::warning::the retry of the NIC passthrough tests skipped" in out and "panic-retry" not in out, out
    assert rc == 1, out


def test_with_the_gate_off_a_failure_is_a_warning(tmp_path: Path) -> None:
    out, rc = _run(tmp_path, "vhost_set check 'NVMe DMA tests' 'tests/hardware -k nvme' 1200\n"
                             "vhost_set panic 'NIC passthrough tests' 'tests/hardware -k nic' 1800",
                   CPR_VHOST_GATE="0")
    assert "::warning::NVMe DMA tests in the virtual host failed (exit 1)" in out, out
    assert "retry" not in out and "::error::" not in out, out
    assert rc == 0, out


def test_the_dma_sets_report_unless_all_sets_gate(tmp_path: Path) -> None:
    """The NVMe and rollback sets (`dma`) report by default: a failure there is a warning, while the NIC
    set's gates; CPR_VHOST_GATE=all makes them gate (the control above fails with it)."""
    out, rc = _run(tmp_path, "vhost_set check 'NVMe DMA tests' 'tests/hardware -k nvme' 1200 dma")
    assert "NVMe DMA tests (reports)" in out and "::warning::NVMe DMA tests in the virtual host failed" in out, out
    assert rc == 0, out
