"""A stop (SIGTERM, Ctrl-C) that lands while a QEMU is spawned never loses the process.

The stop is sent the way pytest_cpr.stopstress sends it at its `spawn` point: a watcher thread fires
SIGTERM the moment the new child appears (the fork, before the exec). The "QEMU" here is a real
`sleep` started through QemuProcess; the registry lives in tmp_path. The control shows what the
deferral prevents: the same stop during a plain subprocess.Popen loses the child (Popen never
returns it), and the children check below finds it."""

from __future__ import annotations

import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_cpr import leftovers, stopstress
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.qemu.process import STOP_SIGNALS, QemuProcess, stops_deferred

ROUNDS = 20


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    return tmp_path / "state"


@pytest.fixture
def stops_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, as under the plugin (without its second-stop cleanup)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, interrupt)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _live_children() -> set[int]:
    """This process's children that still run (zombies are ended, only not yet reaped)."""
    return {int(pid) for pid in stopstress.children_of_main_thread() if _state(int(pid)) not in ("Z", "gone")}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _stop_during(spawn: Callable[[], object], marks: Path) -> str:
    """Run `spawn` with a SIGTERM armed for the moment its child appears; returns where the stop was
    raised: "held" (by the deferral on its way out), "inside" (in the spawn) or "after" (once it returned)."""
    marks.mkdir()
    at = stopstress.StopAt(stopstress.Stop("spawn", "SIGTERM", str(marks)))
    at.on_result(TransferResult(1, ProcessRef("g0"), ProcessRef("g1")))  # arms the watcher for transfer 2
    try:
        try:
            spawn()
        except KeyboardInterrupt as exc:
            frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
            return "held" if "stops_deferred" in frames else "inside"
        assert at.fired.wait(10), "the watcher never saw the child"
        time.sleep(1)  # bounded: the pending stop interrupts this sleep at once
    except KeyboardInterrupt:
        return "after"
    pytest.fail("the stop never came")


def _kill(pids: set[int]) -> None:
    for pid in pids:
        subprocess.run(["kill", "-9", str(pid)], check=False)


def test_stop_while_qemu_spawns_never_loses_it(tmp_path: Path, stops_interrupt: None) -> None:
    """SIGTERM at the fork of a QemuProcess, 20 times: the stop is held until the process is recorded,
    then raised; start() ends the process it cannot hand over. No child is left."""
    where: list[str] = []
    lost: set[int] = set()
    for i in range(ROUNDS):
        before = _live_children()
        proc = QemuProcess("sleep", ["sleep", "60"], f"g{i}", tmp_path, tmp_path, tmp_path / "q.sock",
                           tmp_path / "c.sock", tmp_path / "c.log")
        where.append(_stop_during(proc.start, tmp_path / f"marks-{i}"))
        proc.shutdown(5)  # a stop after start() returned: the caller's teardown ends what it got
        lost |= _live_children() - before
    _kill(lost)
    assert not lost, f"stops during the spawn lost {len(lost)} of {ROUNDS} processes (stops: {where})"
    assert "held" in where, f"no stop landed inside the spawn, the window this test is about: {where}"
    assert not list((tmp_path / "state").glob("proc-*.json")), "a record of an ended process is left"


def test_control_stop_during_plain_popen_loses_the_child(tmp_path: Path, stops_interrupt: None) -> None:
    """Control: without the deferral, the same stop raised inside subprocess.Popen loses the child
    (Popen never returns it), and the children check finds it."""
    where: list[str] = []
    lost: set[int] = set()
    for i in range(ROUNDS):
        before = _live_children()
        got: list[subprocess.Popen[bytes]] = []

        def spawn(into: list[subprocess.Popen[bytes]] = got) -> None:
            into.append(subprocess.Popen(["sleep", "60"], start_new_session=True))

        where.append(_stop_during(spawn, tmp_path / f"marks-{i}"))
        for proc in got:  # returned before the stop: known, so not lost
            proc.kill()
            proc.wait(10)
        lost |= _live_children() - before
    _kill(lost)
    assert lost, f"no stop lost a child in {ROUNDS} plain spawns (stops: {where}): the check saw nothing"


def test_stops_are_held_then_replayed_in_order(stops_interrupt: None) -> None:
    """Both stop signals held inside the block: nothing raised there; on the way out each is handed to
    its handler in order, and the first KeyboardInterrupt is raised."""
    seen: list[int] = []

    def note(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    with pytest.raises(KeyboardInterrupt, match=f"signal {signal.SIGTERM.value}"), stops_deferred():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert seen == [], "a stop was raised inside the deferred block"
    assert seen == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is note and signal.getsignal(signal.SIGINT) is note


def test_signal_without_python_handler_is_left_alone() -> None:
    """SIGTERM ignored (SIG_IGN) stays ignored inside the block: only Python handlers are deferred."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stops_deferred():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
