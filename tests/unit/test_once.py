"""pytest_cpr.once: work done once per run across pytest-xdist workers (real processes, a real lock)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pytest_cpr.errors import CprError
from pytest_cpr.leftovers import ClaimLock
from pytest_cpr.once import computed_once, worker_tag


def _slow_compute(calls: Path) -> str:
    with calls.open("a") as fh:
        fh.write("x")
    time.sleep(0.3)  # long enough that the other processes arrive while it runs
    return "tcg"


def _worker(result: Path, calls: Path, out: Path) -> None:
    out.write_text(computed_once(result, lambda: _slow_compute(calls)))


def _race(tmp_path: Path, results: list[Path]) -> tuple[int, list[str]]:
    calls = tmp_path / "calls"
    outs = [tmp_path / f"out{i}" for i in range(len(results))]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, calls, o)) for r, o in zip(results, outs, strict=True)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return len(calls.read_text()), [o.read_text() for o in outs]


def test_three_processes_sharing_a_file_compute_once(tmp_path: Path) -> None:
    count, values = _race(tmp_path, [tmp_path / "accel.json"] * 3)
    assert count == 1
    assert values == ["tcg"] * 3


def test_control_processes_with_their_own_files_each_compute(tmp_path: Path) -> None:
    count, values = _race(tmp_path, [tmp_path / f"accel{i}.json" for i in range(3)])
    assert count == 3
    assert values == ["tcg"] * 3


def test_a_failed_compute_stores_nothing_and_the_next_caller_computes(tmp_path: Path) -> None:
    path = tmp_path / "accel.json"

    def fail() -> str:
        raise CprError("KVM probe failed")

    with pytest.raises(CprError, match="KVM probe failed"):
        computed_once(path, fail)
    assert not path.exists()
    assert computed_once(path, lambda: "kvm") == "kvm"
    assert computed_once(path, lambda: "tcg") == "kvm"  # stored: not computed again


def test_a_lock_held_too_long_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "accel.json"
    held = ClaimLock(path.name, path.parent).acquire(1)
    try:
        t0 = time.monotonic()
        with pytest.raises(CprError, match=rf"accel\.json: the lock was held by pid {os.getpid()} .* for more "
                                           r"than 0.3s"):
            computed_once(path, lambda: "tcg", timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        held.release()
    assert computed_once(path, lambda: "tcg") == "tcg"  # released: the next caller computes


def test_worker_tag_is_the_xdist_worker_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert worker_tag() == "gw1"
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert worker_tag() == ""
