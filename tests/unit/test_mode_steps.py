"""The mode plumbing without QEMU: what each mode's steps send, and the numbers of a cpr-exec, whose
old QEMU cannot be asked after it exec'd."""

from __future__ import annotations

from pathlib import Path

from pytest_cpr.cpr import ExecSteps, ProcessRef, TransferResult, TransferSteps, _event_numbers
from pytest_cpr.kinds import Mode, Phase
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.spec import ExecIncoming, Incoming


def _event(name: str, t: float, status: str | None = None) -> dict[str, object]:
    event: dict[str, object] = {"event": name, "timestamp": {"seconds": int(t), "microseconds": round(t % 1 * 1e6)}}
    if status:
        event["data"] = {"status": status}
    return event


def test_exec_numbers_come_from_the_old_qemus_event_times() -> None:
    events = [_event("MIGRATION", 100.000, "setup"), _event("STOP", 100.002),
              _event("MIGRATION", 100.003, "active"), _event("MIGRATION", 100.0065, "completed")]
    numbers = _event_numbers(events, events[-1])
    assert numbers["status"] == "completed"
    assert abs(numbers["total-time"] - 6.5) < 0.01 and abs(numbers["downtime"] - 4.5) < 0.01


def test_each_mode_sends_its_own_parameters_and_channels(tmp_path: Path) -> None:
    target = QemuProcess("qemu", ["qemu", "-incoming", "file:/s"], "g1", tmp_path, tmp_path, tmp_path / "q.sock",
                         tmp_path / "c.sock", tmp_path / "c.log")
    try:
        exec_steps = ExecSteps(lambda: target, ExecIncoming(tmp_path / "state"), 10)
        assert exec_steps.parameters(target) == {"mode": "cpr-exec", "cpr-exec-command": target.argv}
        assert [c["addr"] for c in exec_steps.channels()] == [  # type: ignore[index]
            {"transport": "file", "filename": str(tmp_path / "state"), "offset": 0}]
        assert not exec_steps.retires_source
        transfer = TransferSteps(lambda: target, Incoming(tmp_path / "m.sock", tmp_path / "cpr.sock"), 10)
        assert transfer.parameters(target) == {"mode": "cpr-transfer"} and transfer.retires_source
        assert [c["channel-type"] for c in transfer.channels()] == ["main", "cpr"]
        (tmp_path / "state").write_text("x")
        exec_steps.abandon(target)  # never exec'd: the state file goes, no process is touched
        assert not (tmp_path / "state").exists() and target.popen is None
    finally:
        target.qmp.close()


def test_the_mode_and_the_vm_pause_are_among_the_reported_numbers() -> None:
    r = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), mode=str(Mode.CPR_EXEC), status="completed",
                       timeline={Phase.SOURCE_STOPPED: 10.0, Phase.TARGET_RUNNING: 10.095})
    numbers = r.numbers()
    assert numbers["mode"] == "cpr-exec" and numbers["vm_pause_ms"] == 95.0
    assert r.as_dict()["mode"] == "cpr-exec"
