"""The mode plumbing without QEMU: what each mode's steps send, and the numbers of a cpr-exec, whose
old QEMU cannot be asked after it exec'd."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

from pytest_cpr.cpr import (
    ExecSteps,
    ProcessRef,
    RebootSteps,
    TransferResult,
    TransferSteps,
    _event_numbers,
)
from pytest_cpr.kinds import Accel, Mode, Phase
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.spec import ExecIncoming, Incoming, RebootIncoming, VmSpec


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


def test_cpr_reboot_saves_to_a_file_with_ignore_shared_and_loads_it_deferred(tmp_path: Path) -> None:
    target = QemuProcess("qemu", ["qemu", "-incoming", "defer"], "g1", tmp_path, tmp_path, tmp_path / "q.sock",
                         tmp_path / "c.sock", tmp_path / "c.log")
    retired: list[str] = []
    try:
        incoming = RebootIncoming(tmp_path / "state")
        steps = RebootSteps(lambda: target, incoming, 10, lambda src, res: retired.append(src.label))
        assert steps.parameters(target) == {"mode": "cpr-reboot"}
        assert {"capability": "x-ignore-shared", "state": True} in steps.capabilities()
        assert {"capability": "events", "state": True} in steps.capabilities()
        assert [c["addr"]["transport"] for c in steps.channels()] == ["file"]  # type: ignore[index]
        assert incoming.args() == ["-incoming", "defer"]
        assert not steps.retires_source and steps.source_answers_after  # it quits before the target starts
        (tmp_path / "state").write_text("x")
        steps.abandon(target)
        assert not (tmp_path / "state").exists() and target.popen is None and not retired
    finally:
        target.qmp.close()


def test_a_harness_listened_cpr_channel_reaches_the_target_as_an_fd(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "cpr.sock"))
        listener.listen(1)
        incoming = Incoming(tmp_path / "m.sock", tmp_path / "cpr.sock", cpr_fd=listener.fileno())
        cpr = json.loads(incoming.args()[-1])
        assert cpr == {"channel-type": "cpr",
                       "addr": {"transport": "socket", "type": "fd", "str": str(listener.fileno())}}
        assert incoming.pass_fds() == (listener.fileno(),)
        # the source still connects by path
        assert incoming.channels()[1]["addr"] == {"transport": "socket", "type": "unix",
                                                  "path": str(tmp_path / "cpr.sock")}
    assert Incoming(tmp_path / "m", tmp_path / "c").pass_fds() == ()


def test_guest_ram_layouts_qemu_refuses_for_cpr_are_one_switch_each(tmp_path: Path) -> None:
    spec = VmSpec(name="t", accel=Accel.TCG, memory_mib=256, cpus=1, kernel=None, initrd=None,
                  rootfs=tmp_path / "root.img", machine="pc-q35-10.0")

    def args(**changes: object) -> list[str]:
        return dataclasses.replace(spec, **changes).machine_args()  # type: ignore[arg-type]

    assert args() == ["-machine", "pc-q35-10.0,memory-backend=ram0,aux-ram-share=on",
                      "-object", "memory-backend-memfd,id=ram0,size=256M,share=on"]
    assert args(ram_share=False)[-1].endswith("share=off")
    assert args(anonymous_ram=True) == ["-machine", "pc-q35-10.0,aux-ram-share=on"]
    assert args(aux_ram_share=False)[1] == "pc-q35-10.0,memory-backend=ram0"
    assert args(ram_file=Path("/dev/fd/9"))[-1] == \
        "memory-backend-file,id=ram0,size=256M,share=on,mem-path=/dev/fd/9"
    s3 = dataclasses.replace(spec, s3=True).argv("qemu", tmp_path / "c", tmp_path / "l", tmp_path / "q")
    assert s3[s3.index("ICH9-LPC.disable_s3=0") - 1] == "-global"
