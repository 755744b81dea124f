"""The observer protocol: events reach observers in the order they were added, only while attached,
and the keyword hooks of CprVM.transfer are an observer like any other."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.observers import Callbacks, Observer, Observers


class Recorder(Observer):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def on_spawned(self, target: Any) -> None:
        self.log.append(f"{self.name} spawned {target}")

    def on_result(self, result: TransferResult) -> None:
        self.log.append(f"{self.name} result {result.index}")


def test_events_in_order_only_while_attached() -> None:
    log: list[str] = []
    observers = Observers()
    first = Recorder("a", log)
    observers.add(first)
    with observers.attached(Recorder("b", log)):
        observers.on_spawned("g1")
        observers.on_before_migrate("g1")  # no one listens: the base class ignores it
    observers.on_result(TransferResult(1, ProcessRef("g0"), ProcessRef("g1")))
    assert log == ["a spawned g1", "b spawned g1", "a result 1"]
    observers.remove(first)
    with pytest.raises(ValueError):
        observers.remove(first)


def test_callbacks_call_the_hooks_they_were_given() -> None:
    seen: list[tuple[str, Any]] = []
    hooks = Callbacks(before_migrate=lambda t: seen.append(("before_migrate", t)),
                      before_retire=lambda s: seen.append(("before_retire", s)))
    for event in (hooks.on_spawned, hooks.on_before_migrate, hooks.on_after_migrate, hooks.on_before_retire):
        event("proc")  # type: ignore[arg-type]
    assert seen == [("before_migrate", "proc"), ("before_retire", "proc")]


def test_probe_source_is_the_first_observer_with_a_probe_series() -> None:
    class Probes(Observer):
        def probe_series(self, t_from: float, t_to: float) -> Any:
            return (t_from, t_to)

    observers = Observers()
    observers.add(Observer())
    assert observers.probe_source() is None
    probes = Probes()
    observers.add(probes)
    assert observers.probe_source() is probes
