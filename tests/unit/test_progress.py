"""pytest_cpr.progress: a long step says how long it has run, and stops saying it when it ends."""

from __future__ import annotations

import threading

from pytest_cpr.progress import elapsed, heartbeat


def test_elapsed_reads_as_seconds_then_minutes() -> None:
    assert [elapsed(s) for s in (0, 45.9, 60, 187)] == ["+0s", "+45s", "+1m00s", "+3m07s"]


def test_a_long_step_says_its_elapsed_time_and_detail_until_it_ends() -> None:
    lines: list[str] = []
    three = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            three.set()

    with heartbeat(say, "kernel: still building", every=0.05, detail=lambda: "last: CC mm/slub.o"):
        assert three.wait(10), "no progress line within 10 s"
    said = len(lines)
    assert lines[0] == "kernel: still building: +0s, last: CC mm/slub.o"
    assert not threading.Event().wait(0.2)
    assert len(lines) == said, "progress lines after the step ended"


def test_control_a_step_shorter_than_the_interval_says_nothing() -> None:
    lines: list[str] = []
    with heartbeat(lines.append, "guest: still building", every=60):
        pass
    assert lines == []


def test_a_failing_detail_is_reported_not_raised() -> None:
    lines: list[str] = []
    got = threading.Event()

    def broken() -> str:
        raise OSError("console log gone")

    with heartbeat(lambda line: (lines.append(line), got.set()), "L1 booting", every=0.05, detail=broken):
        assert got.wait(10)
    assert "OSError('console log gone')" in lines[0]
