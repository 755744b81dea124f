"""Observers of a transfer: one protocol for everything that acts or measures around a CPR transfer.

Faults (break the transfer at a point), host watches (sample the host around it) and the probe
measurement (judge the guest's network after it) implement it; so can a user's conftest:

    class Timestamps(Observer):
        def on_spawned(self, target: QemuProcess) -> None:
            print("target", target.label, "started")

    with vm.observing(Timestamps()):
        vm.transfer()

The events of one transfer, in order: on_spawned(target) right after the target QEMU started,
on_before_migrate(target) once it listens on its cpr channel, on_after_migrate(target) once the
source accepted `migrate`, on_before_retire(source) with the old QEMU in postmigrate before it is
told to quit, and on_result(result) once the source is retired, or the transfer failed (then
without the events it did not reach). The harness's own SSH check, artifact files and report
follow on_result.

cpr-exec has no second process: the target is the source's process once it exec'd. on_spawned and
on_before_migrate come before `migrate` with the target generation made but not yet running (its
argv is the cpr-exec-command), and there is no on_before_retire (nothing is left to retire).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pytest_cpr.cpr import TransferResult
    from pytest_cpr.plot import ProbeSeries
    from pytest_cpr.qemu.process import QemuProcess

ProcessHook = Callable[["QemuProcess"], None]


class TransferObserver(Protocol):
    """What happens around one cpr-transfer, told to whoever wants to act or measure."""

    def on_spawned(self, target: QemuProcess) -> None: ...

    def on_before_migrate(self, target: QemuProcess) -> None: ...

    def on_after_migrate(self, target: QemuProcess) -> None: ...

    def on_before_retire(self, source: QemuProcess) -> None: ...

    def on_result(self, result: TransferResult) -> None: ...


@runtime_checkable
class ProbeSeriesSource(Protocol):
    """An observer that holds the probe stream of the transfer (for the artifact files)."""

    def probe_series(self, t_from: float, t_to: float) -> ProbeSeries: ...


class Observer:
    """A TransferObserver that does nothing: subclass it and override the events you need."""

    def on_spawned(self, target: QemuProcess) -> None:
        pass

    def on_before_migrate(self, target: QemuProcess) -> None:
        pass

    def on_after_migrate(self, target: QemuProcess) -> None:
        pass

    def on_before_retire(self, source: QemuProcess) -> None:
        pass

    def on_result(self, result: TransferResult) -> None:
        pass


class Observers(Observer):
    """The observers of a VM, told of each event in the order they were added."""

    def __init__(self) -> None:
        self._members: list[TransferObserver] = []

    def add(self, observer: TransferObserver) -> None:
        self._members.append(observer)

    def remove(self, observer: TransferObserver) -> None:
        self._members.remove(observer)

    @contextlib.contextmanager
    def attached(self, observer: TransferObserver) -> Iterator[TransferObserver]:
        """`observer` sees the transfers made inside the `with` block."""
        self.add(observer)
        try:
            yield observer
        finally:
            self.remove(observer)

    def probe_source(self) -> ProbeSeriesSource | None:
        """The first observer that holds the probe stream (a running Traffic's measurement)."""
        return next((m for m in self._members if isinstance(m, ProbeSeriesSource)), None)

    def _tell(self, event: Callable[[TransferObserver], None]) -> None:
        for member in list(self._members):  # a copy: an observer may detach itself
            event(member)

    def on_spawned(self, target: QemuProcess) -> None:
        self._tell(lambda o: o.on_spawned(target))

    def on_before_migrate(self, target: QemuProcess) -> None:
        self._tell(lambda o: o.on_before_migrate(target))

    def on_after_migrate(self, target: QemuProcess) -> None:
        self._tell(lambda o: o.on_after_migrate(target))

    def on_before_retire(self, source: QemuProcess) -> None:
        self._tell(lambda o: o.on_before_retire(source))

    def on_result(self, result: TransferResult) -> None:
        self._tell(lambda o: o.on_result(result))


@dataclass(kw_only=True)
class Callbacks(Observer):
    """Plain functions as an observer (the keyword arguments of CprVM.transfer, a Fault's hooks)."""

    after_spawn: ProcessHook | None = None
    before_migrate: ProcessHook | None = None
    after_migrate: ProcessHook | None = None
    before_retire: ProcessHook | None = None

    def on_spawned(self, target: QemuProcess) -> None:
        _call(self.after_spawn, target)

    def on_before_migrate(self, target: QemuProcess) -> None:
        _call(self.before_migrate, target)

    def on_after_migrate(self, target: QemuProcess) -> None:
        _call(self.after_migrate, target)

    def on_before_retire(self, source: QemuProcess) -> None:
        _call(self.before_retire, source)


def _call(hook: ProcessHook | None, process: QemuProcess) -> None:
    if hook is not None:
        hook(process)
