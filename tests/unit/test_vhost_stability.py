"""The virtual host's stability runner without L1: failure classes, round outcomes, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_cpr import vhost_stability as st
from pytest_cpr.errors import CprError


@pytest.mark.parametrize(("text", "expected"), [
    ("virtual host stopped answering: a long command was quiet", "L1 freeze"),
    ("virtual host exited while waiting for the L1 agent: exit 0, after SHUTDOWN by the guest: guest-reset",
     "L1 reset"),
    ("virtual host agent socket closed while waiting for the L1 agent (boot): L1 kernel panic: timer doesn't work "
     "through Interrupt-remapped IO-APIC; QEMU vhost exited (exit code 0, after SHUTDOWN by the guest: "
     "guest-reset)", "L1 panic"),
    ("CprTimeout: console: the guest's SSH host key (CPR-HOSTKEY line) not seen within 120s", "L2 boot hang"),
    ("BootHung: console: the guest's SSH host key (CPR-HOSTKEY line) not seen within 120s; QEMU internal-error, "
     "serial console silent", "L2 KVM internal error"),
    ("QemuExited: guest command 'cat x': the guest is gone: QEMU g1 exited 0, after SHUTDOWN by the guest: "
     "guest-reset", "L2 reset"),
    ("CheckFailed: vectors that fired before the transfer stayed silent after it while traffic flowed", "lost vector"),
    ("CprTimeout: NVMe DMA in the guest made 0 of 2 rounds in 120s", "DMA hang"),
    ("CprTimeout: only 27 of 100 probes to 10.78.0.2 answered within 120s", "connectivity"),
    ("CprTimeout: guest command 'x' did not finish within 60s", "guest stuck"),
    ("CheckFailed: transfer 1 (g0 11.1.3 -> g1 11.1.3) completed, but QEMU reported trouble on stderr during "
     "it: | warning: x (logs: y) | probes", "QEMU stderr"),
    ("CheckFailed: transfer 2: the guest NIC link went down across the transfer", "link flap"),
    ("AssertionError: something new", "other"),
])
def test_failure_classes(text: str, expected: str) -> None:
    assert st.classify(text) == expected


def _junit(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.xml"
    path.write_text(f'<testsuites><testsuite name="x">{body}</testsuite></testsuites>')
    return path


def test_round_outcome_from_junit(tmp_path: Path) -> None:
    assert st.junit_outcome(None) == ("none", "")
    assert st.junit_outcome(_junit(tmp_path, ""))[0] == "none"
    assert st.junit_outcome(_junit(tmp_path, '<testcase name="a"/>')) == ("passed", "")
    outcome, text = st.junit_outcome(_junit(tmp_path, '<testcase name="a"><failure message="only 3 of 100 '
                                                      'probes">trace</failure></testcase>'))
    assert outcome == "failed" and "only 3 of 100 probes" in text and "trace" in text
    assert st.junit_outcome(_junit(tmp_path, '<testcase name="a"><error message="boom"/></testcase>'))[0] == "failed"
    outcome, text = st.junit_outcome(_junit(tmp_path, '<testcase name="a"><skipped message="no iommufd"/></testcase>'))
    assert (outcome, text) == ("skipped", "no iommufd")


def test_transfers_done_counts_completed(tmp_path: Path) -> None:
    test_dir = tmp_path / "cpr-r001" / "test_x"
    test_dir.mkdir(parents=True)
    (test_dir / "transfers.json").write_text(json.dumps([{"status": "completed"}, {"status": "failed"},
                                                         {"status": "completed"}]))
    assert st.transfers_done(tmp_path) == 2
    (test_dir / "transfers.json").write_text("{broken")
    assert st.transfers_done(tmp_path) == 0


def test_unknown_config_and_workload_are_named(tmp_path: Path) -> None:
    with pytest.raises(CprError, match="--config 'nope'"):
        st.Runner("nope", "two_groups[legacy]", False, 1, 3, tmp_path / "d", tmp_path)
    with pytest.raises(CprError, match="--workload 'two_groups'"):
        st.Runner("default", "two_groups", False, 1, 3, tmp_path / "d", tmp_path)
    runner = st.Runner("my-try", "nvme_dma[iommufd]", True, 1, 3, tmp_path / "d", tmp_path, append="kvm.x=1")
    assert runner.overrides == {"append": "kvm.x=1"}
    assert runner._pytest_args()[:3] == [st.CONTROLS, "-k", "nvme_dma and iommufd"]


def test_table_counts_rounds_and_classes_per_load_band() -> None:
    def row(outcome: str, cls: str = "", control: bool = False, load: float = 2.1) -> dict[str, object]:
        return {"config": "default", "workload": "two_groups[legacy]", "control": control, "outcome": outcome,
                "failure_class": cls, "load1": load}
    rows = [row("passed"), row("failed", "L2 reset"), row("failed", "L2 reset"), row("failed", "L1 freeze"),
            row("passed", control=True), row("failed", "L2 boot hang", load=17.6), row("passed", load=5.0)]
    text = st.table(rows)
    assert "| default | two_groups[legacy] | yes | <= 4 | 4 | 1 | L2 reset 2, L1 freeze 1 |" in text
    assert "| default | two_groups[legacy] | yes | > 8 | 1 | 0 | L2 boot hang 1 |" in text
    assert "| default | two_groups[legacy] | yes | 4-8 | 1 | 1 | none |" in text
    assert "| default | two_groups[legacy] | no (control) | <= 4 | 1 | 1 | none |" in text


def test_round_message_keeps_the_why_not_the_inner_command() -> None:
    text = ('virtual host agent socket closed while waiting for the end of "mkdir -p /mnt/out/junit && cd /mnt/src '
            "&& env A='1' /opt/cpr-venv/bin/python -m pytest -p no:cacheprovider --junitxml=/mnt/out/junit/r000.xml "
            '-o junit_suite_name=r000 tests/hardware/test_passthrough.py -k x": QEMU vhost exited (exit code 0, after '
            "SHUTDOWN by the guest: guest-reset)")
    assert st.first_lines(text) == ('virtual host agent socket closed while waiting for the end of "<inner pytest> '
                                    '-o junit_suite_name=r000 tests/hardware/test_passthrough.py -k x": QEMU vhost '
                                    "exited (exit code 0, after SHUTDOWN by the guest: guest-reset)")
