"""Fault injection around a cpr-transfer: break the transfer at a precise point, then tell what happened.

Each fault is a `Fault`, an observer of the transfer (pytest_cpr.observers) with hooks at three of
its events (after_spawn, before_migrate, after_migrate), plus an optional setup/teardown on the VM
(pause the guest, change the target's arguments, ask the source to pause before switchover).
`inject(vm, fault)` runs one transfer with the fault and returns a `FaultOutcome`: the
TransferResult, the error (if the transfer failed), what the fault saw when it struck, and the
state of the source afterwards. Usable without pytest:

    outcome = inject(vm, kill_target_after_cpr_state())
    assert outcome.failed and outcome.source_status == "running"
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_cpr import leftovers
from pytest_cpr.errors import CprError, CprTimeout, TransferFailed
from pytest_cpr.host import netns
from pytest_cpr.observers import Callbacks, ProcessHook
from pytest_cpr.qemu.process import QemuProcess

if TYPE_CHECKING:
    from pytest_cpr.cpr import TransferResult
    from pytest_cpr.vm import CprVM

Hook = ProcessHook  # a function given the target QEMU


@dataclass
class Fault(Callbacks):
    """One way to break a transfer. Hooks (after_spawn, before_migrate, after_migrate, keyword
    arguments) get the target QEMU; `setup`/`teardown` get the VM."""

    name: str
    description: str
    setup: Callable[[CprVM], None] | None = None
    teardown: Callable[[CprVM], None] | None = None
    seen: list[str] = field(default_factory=list)  # what the fault observed when it struck
    vm: CprVM | None = None
    target: QemuProcess | None = None  # the target of the transfer, once started

    def on_spawned(self, target: QemuProcess) -> None:
        self.target = target
        super().on_spawned(target)

    def note(self, text: str) -> None:
        self.seen.append(f"{time.time():.6f} {text}")

    @property
    def source(self) -> QemuProcess:
        """The source of the transfer under way (the target is appended after it)."""
        assert self.vm is not None
        return self.vm.generations[-2] if len(self.vm.generations) > 1 else self.vm.current


@dataclass
class FaultOutcome:
    fault: str
    result: TransferResult
    error: str | None  # the TransferFailed message, None if the transfer completed
    source_alive: bool
    source_status: str | None  # query-status of the source after the fault (None if it died)
    source_exit: str | None
    target_exit: str | None
    seen: list[str]
    seconds: float

    @property
    def failed(self) -> bool:
        return self.error is not None

    def describe(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"result": self.result.as_dict()}, default=str,
                          indent=1)


def inject(vm: CprVM, fault: Fault, resume_timeout: float = 15.0) -> FaultOutcome:
    """One transfer of `vm` with `fault` injected. Never raises for the transfer's own failure;
    waits (bounded) for the source to run the guest again when the transfer failed."""
    fault.vm = vm
    source = vm.current
    t0 = time.monotonic()
    error: str | None = None
    fault.target = None
    if fault.setup is not None:
        fault.setup(vm)
    try:
        try:
            with vm.observing(fault):
                vm.transfer()
        except TransferFailed as exc:
            error = str(exc)
        result = vm.transfers[-1]
    finally:
        if fault.teardown is not None:
            fault.teardown(vm)
    status = None
    if error is not None and source.exit_reason() is None:
        status = wait_status(source, ("running",), resume_timeout)
    elif source.exit_reason() is None:
        status = source.qmp.execute("query-status")["status"] if source.qmp.connected else None
    return FaultOutcome(fault.name, result, error, source.exit_reason() is None, status,
                        source.exit_reason(), fault.target.exit_reason() if fault.target is not None else None,
                        fault.seen, round(time.monotonic() - t0, 3))


def wait_status(proc: QemuProcess, wanted: tuple[str, ...], timeout: float) -> str:
    """Poll query-status until it is one of `wanted` (bounded); returns the last status seen."""
    deadline = time.monotonic() + timeout
    status = ""
    while True:
        if (reason := proc.exit_reason()) is not None:
            return f"exited: {reason}"
        status = str(proc.qmp.execute("query-status", timeout=10)["status"])
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


# ---- building blocks


def cpr_socket(target: QemuProcess) -> Path:
    """The cpr channel path from the target's command line."""
    for i, arg in enumerate(target.argv[:-1]):
        if arg == "-incoming" and target.argv[i + 1].startswith("{"):
            return Path(json.loads(target.argv[i + 1])["addr"]["path"])
    raise ValueError(f"QEMU {target.label} has no cpr -incoming channel")


def sigkill(fault: Fault, target: QemuProcess, when: str) -> None:
    listening = cpr_socket(target).exists()
    monitor = target.qmp_socket.exists()
    target.kill()
    fault.note(f"SIGKILL target {target.label} pid {target.pid} {when} (cpr socket "
               f"{'present' if listening else 'absent'}, QMP socket {'present' if monitor else 'absent'})")


def sigstop(fault: Fault, target: QemuProcess) -> None:
    os.kill(target.pid, signal.SIGSTOP)
    fault.note(f"SIGSTOP target {target.label} pid {target.pid} (it listens, has not read the cpr state)")


def _set_pause_before_switchover(state: bool) -> Callable[[CprVM], None]:
    def apply(vm: CprVM) -> None:
        proc = vm.current
        if proc.exit_reason() is None:
            proc.qmp.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "pause-before-switchover", "state": state}]})
    return apply


def _wait_pre_switchover(fault: Fault, timeout: float = 30.0, accept: tuple[str, ...] = ()) -> str:
    """Wait for the source's migration to pause before switchover (the target has read the cpr
    state and receives the main stream by then), or to reach a status in `accept`; returns it."""
    source = fault.source
    deadline = time.monotonic() + timeout
    while True:
        status = str(source.qmp.execute("query-migrate").get("status"))
        if status == "pre-switchover":
            fault.note("source migration in pre-switchover (guest stopped, device state not sent)")
            return status
        if status in accept:
            fault.note(f"source migration {status} before it reached pre-switchover")
            return status
        if status in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
            raise CprTimeout(f"fault: source migration did not reach pre-switchover within {timeout:.0f}s "
                             f"(status {status}); QMP transcript in {source.artifacts}")
        time.sleep(0.005)


# ---- the faults


def kill_target_before_listen() -> Fault:
    """SIGKILL the target right after it was started, before it opened its cpr socket."""
    fault = Fault("kill-before-listen", "target SIGKILLed before it listens on the cpr socket")
    fault.after_spawn = lambda t: sigkill(fault, t, "right after spawn")
    return fault


def kill_target_reading_cpr_state() -> Fault:
    """SIGSTOP the target once it listens, issue migrate (the source sends the cpr state into the
    socket), then SIGKILL the target before it read it."""
    fault = Fault("kill-reading-cpr-state", "target SIGKILLed while the cpr state is in flight")
    fault.before_migrate = lambda t: sigstop(fault, t)
    fault.after_migrate = lambda t: sigkill(fault, t, "after migrate was issued, while stopped")
    return fault


def kill_target_after_cpr_state() -> Fault:
    """The source pauses before switchover (pause-before-switchover): the target has read the cpr
    state and holds the main channel. SIGKILL it there, then let the source continue."""
    fault = Fault("kill-after-cpr-state", "target SIGKILLed after the cpr state, before completion",
                  setup=_set_pause_before_switchover(True), teardown=_set_pause_before_switchover(False))

    def strike(target: QemuProcess) -> None:
        _wait_pre_switchover(fault)
        sigkill(fault, target, "at pre-switchover")
        fault.source.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        fault.note("migrate-continue sent to the source")

    fault.after_migrate = strike
    return fault


@contextlib.contextmanager
def target_args(vm: CprVM, extra: tuple[str, ...] = (), **changes: Any) -> Iterator[None]:
    """Start the next target with other arguments than the source: `extra` appended, VmSpec fields
    in `changes` replaced (memory_mib, machine, ...). The spec is restored after."""
    machine = vm.machine
    spec = machine.spec
    if spec is None:
        raise CprError(f"guest {vm.config.name}: boot() it before changing its target's arguments")
    machine.spec = dataclasses.replace(spec, extra_args=spec.extra_args + extra, **changes)
    try:
        yield
    finally:
        machine.spec = spec


def _with_target_args(fault: Fault, extra: tuple[str, ...] = (), **changes: Any) -> Fault:
    stack = contextlib.ExitStack()

    def setup(vm: CprVM) -> None:
        stack.enter_context(target_args(vm, extra, **changes))
        fault.note(f"target started with extra arguments {list(extra)} and {changes or 'no other change'}")

    fault.setup = setup
    fault.teardown = lambda vm: stack.close()
    return fault


def _paused_before_switchover(fault: Fault) -> Fault:
    """`fault` with the source pausing before switchover (pause-before-switchover) around its own
    setup and teardown: its strike runs while the target holds the main channel."""
    setup_first, teardown_first = fault.setup, fault.teardown
    pause, unpause = _set_pause_before_switchover(True), _set_pause_before_switchover(False)

    def setup(vm: CprVM) -> None:
        if setup_first is not None:
            setup_first(vm)
        pause(vm)

    def teardown(vm: CprVM) -> None:
        try:
            if teardown_first is not None:
                teardown_first(vm)
        finally:
            unpause(vm)

    fault.setup, fault.teardown = setup, teardown
    return fault


def wrong_target_option() -> Fault:
    """The target gets an option QEMU does not know: it exits before it listens."""
    return _with_target_args(Fault("wrong-option", "target started with an unknown option"),
                             ("-cpr-no-such-option",))


def wrong_target_memory(memory_mib: int) -> Fault:
    """The target gets another memory size: it starts and listens, but cannot take the guest."""
    return _with_target_args(Fault("wrong-memory", f"target started with -m {memory_mib}M"),
                             memory_mib=memory_mib)


def wrong_target_machine(machine: str, timeout: float = 30.0) -> Fault:
    """The target gets another machine type: it reads the cpr state, then rejects the first section
    of the migration stream (the machine type) and exits. Made deterministic: the source pauses before
    switchover and goes on only once the target is gone, so it meets the closed channel. Without the
    pause the old QEMU could write its whole stream (~200 KB) into the socket before the target read
    the first section, and report `completed`: the missing completion handshake of the
    fails-after-source-completed finding, which made this test fail 3 runs in 8 on a loaded machine."""
    fault = _paused_before_switchover(_with_target_args(
        Fault("wrong-machine", f"target started with -machine {machine}"), machine=machine))

    def strike(target: QemuProcess) -> None:
        if _wait_pre_switchover(fault, timeout, accept=("failed",)) != "pre-switchover":
            return
        deadline = time.monotonic() + timeout
        while (reason := target.exit_reason()) is None:
            if time.monotonic() > deadline:
                raise CprTimeout(f"fault: the target with -machine {machine} did not exit within {timeout:.0f}s "
                                 f"of reading the stream's first section; stderr {target.stderr_path}")
            time.sleep(0.01)
        fault.note(f"target {target.label} gone at pre-switchover: {reason.splitlines()[0]}")
        fault.source.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        fault.note("migrate-continue sent to the source")

    fault.after_migrate = strike
    return fault


def target_fails_after_source_completed(feature: str = "mrg_rxbuf", timeout: float = 20.0) -> Fault:
    """The target's NIC lacks a feature the guest negotiated, so it cannot load the NIC's device
    state, the last thing the source sends. Made deterministic: the source pauses before switchover,
    the target is SIGSTOPped, the source sends the device state into the socket and ends its side;
    only then does the target (SIGCONT) read it and fail."""
    fault = _paused_before_switchover(_with_target_args(
        Fault("fails-after-source-completed", f"target NIC with {feature}=off fails on the device state after "
              "the source finished sending"), ("-global", f"virtio-net-pci.{feature}=off")))

    def strike(target: QemuProcess) -> None:
        _wait_pre_switchover(fault)
        continue_with_target_stopped(fault, target, timeout)

    fault.after_migrate = strike
    return fault


def continue_with_target_stopped(fault: Fault, target: QemuProcess, timeout: float,
                                 meanwhile: Callable[[str], None] | None = None) -> str:
    """At pre-switchover: SIGSTOP the target, let the source go on (migrate-continue) and wait until it
    says completed or failed: it has saved the device state and written it into the socket, and the
    target has not read it. `meanwhile` (given that status) runs then, while no QEMU runs the guest;
    the target is SIGCONTed afterwards in any case. Returns the source's final status."""
    os.kill(target.pid, signal.SIGSTOP)
    fault.note(f"SIGSTOP target {target.label} at pre-switchover")
    source = fault.source
    mark = len(source.qmp.events)
    source.qmp.execute("migrate-continue", {"state": "pre-switchover"})
    try:
        final = source.qmp.wait_event(
            lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in ("completed", "failed"),
            timeout, "MIGRATION completed/failed of the source", since=mark)
        status = str(final["data"]["status"])
        fault.note(f"source migration {status} while the target was stopped")
        if meanwhile is not None:
            meanwhile(status)
        return status
    finally:
        os.kill(target.pid, signal.SIGCONT)
        fault.note(f"SIGCONT target {target.label}")


def held_in_blackout(meanwhile: Callable[[str], None], timeout: float = 30.0) -> Fault:
    """Not a fault: the transfer completes, only later. It is held where no QEMU runs the guest and
    none listens to its devices: the source pauses before switchover, the target is SIGSTOPped
    there, the source goes on until it said completed (the device state saved: with VFIO, its KVM
    irqfds deassigned and its own interrupt handlers removed) and `meanwhile` runs (given the
    source's final status); then the target (SIGCONT) loads the state and resumes the guest."""
    fault = Fault("held-in-blackout", "target stopped from pre-switchover until the source completed",
                  setup=_set_pause_before_switchover(True), teardown=_set_pause_before_switchover(False))

    def strike(target: QemuProcess) -> None:
        _wait_pre_switchover(fault, timeout)
        continue_with_target_stopped(fault, target, timeout, meanwhile)

    fault.after_migrate = strike
    return fault


def remove_cpr_socket() -> Fault:
    """Delete the target's cpr socket path once it listens: the source cannot connect to it."""
    fault = Fault("cpr-socket-missing", "cpr socket path removed before migrate")

    def strike(target: QemuProcess) -> None:
        path = cpr_socket(target)
        path.unlink()
        fault.note(f"removed {path}")

    fault.before_migrate = strike
    return fault


def paused_guest() -> Fault:
    """`stop` the guest on the source (QMP) before the transfer."""
    fault = Fault("paused-guest", "source told to migrate while the guest is paused")

    def setup(vm: CprVM) -> None:
        vm.current.qmp.execute("stop")
        fault.note(f"source status before migrate: {vm.current.qmp.execute('query-status')['status']}")

    fault.setup = setup
    return fault


def cancel_before_cpr_read() -> Fault:
    """migrate_cancel while the target (SIGSTOPped) has not read the cpr state."""
    fault = Fault("cancel-before-cpr-read", "migrate_cancel while the cpr state is in flight")
    fault.before_migrate = lambda t: sigstop(fault, t)

    def strike(target: QemuProcess) -> None:
        fault.source.qmp.execute("migrate_cancel")
        fault.note("migrate_cancel sent to the source")

    fault.after_migrate = strike
    return fault


def cancel_at_switchover() -> Fault:
    """migrate_cancel when the source paused before switchover (target has read the cpr state)."""
    fault = Fault("cancel-at-switchover", "migrate_cancel after the cpr state, before completion",
                  setup=_set_pause_before_switchover(True), teardown=_set_pause_before_switchover(False))

    def strike(target: QemuProcess) -> None:
        _wait_pre_switchover(fault)
        fault.source.qmp.execute("migrate_cancel")
        fault.note("migrate_cancel sent to the source")

    fault.after_migrate = strike
    return fault


# ---- what is left


def qemu_pids_of(vm: CprVM) -> list[int]:
    """Live processes whose command line references this VM's private run directory."""
    return sorted(p.pid for p in leftovers.processes_naming(vm.rundir))


def namespaces_of_this_process() -> list[str]:
    """cprt-* network namespaces created by this process (name cprt-<pid>-...)."""
    return netns.namespaces_of(os.getpid())
