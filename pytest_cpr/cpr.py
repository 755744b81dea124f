"""CPR orchestration: source QEMU -> target QEMU, in each mode as QEMU documents it.

One orchestration (cpr_migrate) with a small strategy per mode (ModeSteps), after
docs/devel/migration/CPR.rst:
- cpr-transfer: the target starts with the source's arguments plus a main and a cpr -incoming
  channel; the source gets mode=cpr-transfer and `migrate` with both channels; the source ends in
  postmigrate, the target resumes the guest by itself.
- cpr-exec: the source gets mode=cpr-exec and cpr-exec-command (the target's argv with -incoming
  for a state file), `migrate` to that file, then exec's the target in place (same PID); the
  target resumes the guest by itself. A failed exec leaves the source running the guest.
- cpr-reboot: the source gets mode=cpr-reboot and x-ignore-shared, `migrate` to a state file, ends
  in postmigrate and quits; then the target starts with -incoming defer, gets the same mode and
  capability, and `migrate-incoming` from that file; guest RAM (a named shared file the harness
  holds) stays in place. Optionally (QEMU requires it with VFIO) the guest suspends to RAM first and
  the target wakes it (system_wakeup).
Every step is timed on the host's wall clock (the clock QMP event timestamps use too) and bounded
by a timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from pytest_cpr.errors import CprError, CprTimeout, TransferFailed
from pytest_cpr.kinds import Mode, Phase
from pytest_cpr.observers import Observer, TransferObserver
from pytest_cpr.qemu.process import QemuProcess, unix_listening
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.qemu.spec import ExecIncoming, Incoming, RebootIncoming

FINAL_STATES = ("completed", "failed", "cancelled")
NORMAL_MAX_BANDWIDTH = 64 << 30  # bytes/s: no throttle worth the name on one host


@dataclass(frozen=True)
class ProcessRef:
    """One QEMU generation of a transfer: its label (g0, g1, g1-retry1, ...) and its build's version."""

    label: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.label} {self.version}" if self.version else self.label


@dataclass
class TransferResult:
    index: int
    source: ProcessRef
    target: ProcessRef
    mode: str = str(Mode.CPR_TRANSFER)
    status: str = "not started"
    error: str | None = None
    timeline: dict[Phase, float] = field(default_factory=dict)  # phase -> host wall time (s)
    qemu: dict[str, Any] = field(default_factory=dict)  # query-migrate numbers of the source
    probe: dict[str, Any] | None = None  # ProbeStats of this transfer's window
    source_exit: str | None = None
    notes: list[str] = field(default_factory=list)
    interrupts: dict[str, dict[str, int]] | None = None  # vectors that fired before / after
    # Longest stall of a guest DMA stream (e.g. NVMe I/O) across the transfer; filled by the code
    # that runs such a stream (None: no DMA stream measured).
    dma_stall_ms: float | None = None
    # fd facts of the old QEMU right before it was told to quit (passthrough guests; None: not looked):
    # KVM files it still held (0 expected: QEMU closes KVM after a VFIO cpr-transfer) and its legacy
    # VFIO containers (open /dev/vfio/vfio)
    old_qemu_kvm_fds: int | None = None
    vfio_containers: int | None = None
    # carrier changes of the checked guest NICs across the transfer (0 expected: no reset, no flap;
    # None: not read)
    carrier_changes: int | None = None
    # drop counters that grew across the transfer on those guest NICs and the probing host's
    # interfaces, {"guest eth1": {"rx_missed_errors": 3}} (checks.drops_grown; None: not read)
    link_drops: dict[str, dict[str, int]] | None = None
    # locked/pinned memory in KiB of the old and new QEMU around a passthrough transfer, keyed
    # "<old|new>_qemu_<vmlck|vmpin>_<before|after|exit>" (passthrough.HostWatch; empty: not read)
    pinned_kib: dict[str, int] = field(default_factory=dict)
    # noteworthy lines the old and new QEMU printed on stderr during the transfer (qemu/stderr.py)
    qemu_messages: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # artifacts: probe series, timeline, plots
    # size of the VM state file (cpr-exec, cpr-reboot: guest RAM kept in place leaves it small)
    state_file_bytes: int | None = None
    # PIDs of the old and the new QEMU (cpr-exec: the same process)
    source_pid: int | None = None
    target_pid: int | None = None
    # what the harness handed QEMU as fds instead of paths, as management software does: "iommufd",
    # "vfio-cdev", "cpr-channel", comma separated (None: nothing)
    fd_passing: str | None = None

    def ms(self, start: Phase, end: Phase) -> float | None:
        t = self.timeline
        return round((t[end] - t[start]) * 1000, 3) if start in t and end in t else None

    @property
    def qemu_downtime_ms(self) -> float | None:
        return self.qemu.get("downtime")

    @property
    def qemu_total_ms(self) -> float | None:
        return self.qemu.get("total-time")

    @property
    def blackout_ms(self) -> float | None:
        return None if self.probe is None else float(self.probe["max_gap_ms"])

    @property
    def overhead_ratio(self) -> float | None:
        """transfer step wall time / (target spawn-to-listening + QEMU total-time)."""
        step = self.ms(Phase.STEP_START, Phase.TARGET_RUNNING)
        listen = self.ms(Phase.TARGET_SPAWNED, Phase.TARGET_LISTENING)
        total = self.qemu_total_ms
        if step is None or listen is None or not total:
            return None
        return round(step / (listen + float(total)), 3)

    def numbers(self) -> dict[str, float | int | str | None]:
        """The figures recorded on the test report (names without the cpr_ prefix)."""
        probe = self.probe or {}
        return {
            "mode": self.mode,
            "status": self.status,
            "qemu_downtime_ms": self.qemu_downtime_ms,
            "qemu_total_ms": self.qemu_total_ms,
            "qemu_setup_ms": self.qemu.get("setup-time"),
            "wall_ms": self.ms(Phase.MIGRATE_ISSUED, Phase.TARGET_RUNNING),
            # the old QEMU's STOP to the new QEMU's RESUME: the same measure in every mode (cpr-exec's
            # QEMU downtime is the old QEMU's share only; it cannot be asked after the exec)
            "vm_pause_ms": self.ms(Phase.SOURCE_STOPPED, Phase.TARGET_RUNNING),
            "step_ms": self.ms(Phase.STEP_START, Phase.TARGET_RUNNING),
            "spawn_to_listen_ms": self.ms(Phase.TARGET_SPAWNED, Phase.TARGET_LISTENING),
            "blackout_ms": self.blackout_ms,
            "lost_probes": probe.get("lost"),
            "reordered_probes": probe.get("reordered"),
            "ssh_after_ms": self.ms(Phase.TARGET_RUNNING, Phase.SSH_ANSWERED),
            "overhead_ratio": self.overhead_ratio,
            "dma_stall_ms": self.dma_stall_ms,
            "old_qemu_kvm_fds": self.old_qemu_kvm_fds,
            "vfio_containers": self.vfio_containers,
            "carrier_changes": self.carrier_changes,
            "link_drops": None if self.link_drops is None else sum(sum(d.values()) for d in self.link_drops.values()),
            "probe_send_stall_ms": probe.get("max_send_gap_ms"),
            "probe_capture_drops": probe.get("probe_capture_drops"),
            "probe_send_jitter_p99_ms": probe.get("send_jitter_p99_ms"),
            "lost_before_stop": probe.get("lost_before_stop"),
            "lost_in_downtime": probe.get("lost_in_downtime"),
            "lost_after_resume": probe.get("lost_after_resume"),
            "state_file_bytes": self.state_file_bytes,
            "fd_passing": self.fd_passing,
            "suspended_ms": self.ms(Phase.GUEST_SUSPENDED, Phase.GUEST_WOKEN),
            **{f"{key}_kib": value for key, value in self.pinned_kib.items()},
        }

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"], data["target"] = str(self.source), str(self.target)  # "label version" in JSON
        data["numbers"] = self.numbers()
        return data


def _status_is(*states: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        return event.get("event") == "MIGRATION" and event.get("data", {}).get("status") in states

    return match


def _event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp") or {}
    if "seconds" in ts:
        return float(ts["seconds"]) + float(ts.get("microseconds", 0)) / 1e6
    return float(event["host_t"])


class _TargetMonitor:
    """Connects to the target's QMP as soon as the target opens it (after it read the cpr state)."""

    def __init__(self, target: QemuProcess, timeout: float) -> None:
        self.target, self.timeout = target, timeout
        self.error: BaseException | None = None
        self.connected_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"qmp-connect-{target.label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.target.connect_qmp(self.timeout)
            self.connected_at = time.time()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(self.timeout + 5)
        if self.error is not None:
            raise self.error
        if not self.target.qmp.connected:
            raise CprTimeout(f"QMP of target {self.target.label} not connected within {self.timeout:.0f}s")


class ModeSteps:
    """What one CPR mode does at each step of the one orchestration (cpr_migrate): make the target,
    the parameters and channels of `migrate`, and how the target takes the guest over once the
    source reported the migration completed."""

    mode: Mode
    retires_source = True  # the old QEMU stays in postmigrate and is told to quit afterwards
    source_answers_after = True  # the source can be asked query-migrate once it said completed

    def __init__(self, make_target: Callable[[], QemuProcess], timeout: float) -> None:
        self.make_target, self.timeout = make_target, timeout

    def prepare(self, timeline: dict[Phase, float], observer: TransferObserver) -> QemuProcess:
        raise NotImplementedError

    def parameters(self, target: QemuProcess) -> dict[str, Any]:
        return {"mode": str(self.mode)}

    def capabilities(self) -> list[dict[str, object]]:
        """migrate-set-capabilities of the source (MIGRATION events, which every step waits on)."""
        return [{"capability": "events", "state": True}]

    def channels(self) -> list[dict[str, object]]:
        raise NotImplementedError

    def before_migrate(self, source: QemuProcess, timeline: dict[Phase, float]) -> None:
        """The last step on the source before `migrate` (cpr-reboot: suspend the guest)."""

    def take_over(self, source: QemuProcess, target: QemuProcess, result: TransferResult,
                  completed: dict[str, Any], mark: int) -> None:
        """The source said completed: the target takes the guest over (its QMP connected)."""
        raise NotImplementedError

    def finish(self, source: QemuProcess, target: QemuProcess, result: TransferResult) -> None:
        """The target runs the guest: what is left of the mode's own bookkeeping."""

    def abandon(self, target: QemuProcess | None) -> None:
        if target is not None:
            target.shutdown(timeout=5)


class TransferSteps(ModeSteps):
    """cpr-transfer: a new QEMU process listens on the main and cpr channels before `migrate`; it
    connects its QMP once it read the cpr state; the source ends in postmigrate."""

    mode = Mode.CPR_TRANSFER

    def __init__(self, make_target: Callable[[], QemuProcess], incoming: Incoming, timeout: float,
                 listener: socket.socket | None = None) -> None:
        """`listener`: the harness's own listening cpr socket (its fd is incoming.cpr_fd), closed
        once the target inherited it; its path removed once the transfer ends either way."""
        super().__init__(make_target, timeout)
        self.incoming, self.listener = incoming, listener
        self._monitor: _TargetMonitor | None = None

    def prepare(self, timeline: dict[Phase, float], observer: TransferObserver) -> QemuProcess:
        try:
            target = self.make_target()
        finally:  # the new QEMU holds the listening socket now: the harness lets go of its copy (as
            self._close_listener(unlink=False)  # management software does), so a dying target refuses the source
        timeline[Phase.TARGET_SPAWNED] = target.t_spawn
        observer.on_spawned(target)
        first, what = ((self.incoming.cpr_socket, "cpr channel") if self.incoming.cpr_socket is not None
                       else (self.incoming.main_socket, "migration channel"))
        timeline[Phase.TARGET_LISTENING] = target.wait_for_path(
            first, self.timeout, f"{what} of target {target.label}", listening=True)
        self._monitor = _TargetMonitor(target, self.timeout)
        observer.on_before_migrate(target)
        return target

    def channels(self) -> list[dict[str, object]]:
        return self.incoming.channels()

    def take_over(self, source: QemuProcess, target: QemuProcess, result: TransferResult,
                  completed: dict[str, Any], mark: int) -> None:
        assert self._monitor is not None
        self._monitor.join()

    def finish(self, source: QemuProcess, target: QemuProcess, result: TransferResult) -> None:
        self._close_listener()
        status = source.qmp.execute("query-status")["status"]
        if status != "postmigrate":
            result.notes.append(f"source ended in {status}, expected postmigrate")

    def abandon(self, target: QemuProcess | None) -> None:
        self._close_listener()
        super().abandon(target)

    def _close_listener(self, unlink: bool = True) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if unlink and self.incoming.cpr_fd is not None and self.incoming.cpr_socket is not None:
            self.incoming.cpr_socket.unlink(missing_ok=True)  # the harness bound the path: it removes it


class NormalSteps(TransferSteps):
    """A normal migration to a new QEMU on the same host, for contrast: the same steps as
    cpr-transfer without the cpr channel, so guest RAM is copied over the stream (at up to
    NORMAL_MAX_BANDWIDTH: on one host the copy is bound by memory, not by QEMU's 128 MiB/s default)."""

    mode = Mode.NORMAL

    def parameters(self, target: QemuProcess) -> dict[str, Any]:
        return {"mode": str(self.mode), "max-bandwidth": NORMAL_MAX_BANDWIDTH}


class ExecSteps(ModeSteps):
    """cpr-exec: no second process. The source writes the VM state to a file, then exec's
    `cpr-exec-command` (the target build's binary, the same VM spec with the target generation's
    QMP and console sockets, and -incoming for that file) in place: same PID, fds kept in a memfd.
    QEMU reports MIGRATION completed *before* it exec's; a failed exec follows with MIGRATION failed
    and a RESUME of the old QEMU (the guest keeps running there)."""

    mode = Mode.CPR_EXEC
    retires_source = False  # the source became the target
    source_answers_after = False  # it exec's right after completed

    def __init__(self, make_target: Callable[[], QemuProcess], incoming: ExecIncoming, timeout: float) -> None:
        super().__init__(make_target, timeout)
        self.incoming = incoming

    def prepare(self, timeline: dict[Phase, float], observer: TransferObserver) -> QemuProcess:
        target = self.make_target()  # not started: the source exec's its argv
        observer.on_spawned(target)
        observer.on_before_migrate(target)
        return target

    def parameters(self, target: QemuProcess) -> dict[str, Any]:
        return {"mode": str(self.mode), "cpr-exec-command": target.argv}

    def channels(self) -> list[dict[str, object]]:
        return self.incoming.channels()

    def take_over(self, source: QemuProcess, target: QemuProcess, result: TransferResult,
                  completed: dict[str, Any], mark: int) -> None:
        t = result.timeline
        qmp = source.qmp
        deadline = time.monotonic() + self.timeout
        failed = _status_is("failed")
        while not unix_listening(target.qmp_socket):
            if any(failed(e) for e in qmp.events[mark:]):  # the exec failed: the old QEMU runs again
                info = qmp.execute("query-migrate")
                result.qemu["status"] = str(info.get("status"))
                if "error-desc" in info:
                    result.qemu["error-desc"] = info["error-desc"]
                return
            if source.popen is not None and source.popen.poll() is not None:
                break  # exec'd, and the new QEMU died before it opened its QMP socket
            if time.monotonic() > deadline:
                raise CprTimeout(f"cpr-exec: neither the QMP socket of {target.label} ({target.qmp_socket}) "
                                 f"nor MIGRATION failed within {self.timeout:.0f}s after completed")
            time.sleep(0.002)
        target.take_over(source)
        t[Phase.TARGET_SPAWNED] = _event_time(completed)  # QEMU exec's right after it says completed
        t[Phase.TARGET_LISTENING] = time.time()
        target.connect_qmp(self.timeout)

    def finish(self, source: QemuProcess, target: QemuProcess, result: TransferResult) -> None:
        result.notes.append(f"cpr-exec: {source.label} exec'd {target.label} in place (PID {target.pid}); "
                            "QEMU downtime and total from the old QEMU's MIGRATION/STOP event times")
        _remove_state_file(self.incoming.state_file, result)

    def abandon(self, target: QemuProcess | None) -> None:
        _remove_state_file(self.incoming.state_file)
        if target is not None and target.popen is not None:  # exec'd: the process is the target's
            target.shutdown(timeout=5)


SUSPEND_COMMAND = ("nohup sh -c 'sleep 0.2; if command -v systemctl >/dev/null; then systemctl suspend; else "
                   "echo deep > /sys/power/mem_sleep 2>/dev/null; echo mem > /sys/power/state; fi' "
                   ">/dev/null 2>&1 &")
"""Suspend the guest to RAM from inside it, detached (the command returns; the guest sleeps 0.2 s later)."""


class RebootSteps(ModeSteps):
    """cpr-reboot: the source saves the VM state to a file (guest RAM, a named shared file, stays in
    place with x-ignore-shared) and quits once it says completed; then the target (same VM spec,
    -incoming defer) starts, gets mode=cpr-reboot and x-ignore-shared and loads the file with
    migrate-incoming. With `suspend_guest` the guest first suspends to RAM (SUSPEND event, runstate
    suspended) and the target wakes it (system_wakeup, WAKEUP event): QEMU's condition for VFIO."""

    mode = Mode.CPR_REBOOT
    retires_source = False  # retired in take_over, before the target starts (never both at once)

    def __init__(self, make_target: Callable[[], QemuProcess], incoming: RebootIncoming, timeout: float,
                 retire: Callable[[QemuProcess, TransferResult], None],
                 suspend_guest: Callable[[], None] | None = None) -> None:
        """`make_target`: the target generation, not started; `retire`: quits the source (observers
        told); `suspend_guest`: runs SUSPEND_COMMAND in the guest (None: no suspend)."""
        super().__init__(make_target, timeout)
        self.incoming, self.retire, self.suspend_guest = incoming, retire, suspend_guest
        self._source: QemuProcess | None = None

    def prepare(self, timeline: dict[Phase, float], observer: TransferObserver) -> QemuProcess:
        target = self.make_target()  # started once the source quit
        observer.on_spawned(target)
        observer.on_before_migrate(target)
        return target

    def before_migrate(self, source: QemuProcess, timeline: dict[Phase, float]) -> None:
        """With suspend_guest: suspend the guest to RAM and wait (bounded) for QEMU's SUSPEND and the
        suspended runstate."""
        if self.suspend_guest is None:
            return
        mark = len(source.qmp.events)
        self.suspend_guest()
        event = source.qmp.wait_event(lambda e: e.get("event") == "SUSPEND", self.timeout,
                                      "SUSPEND of the guest (does it offer S3? ICH9-LPC.disable_s3=0)",
                                      since=mark, alive=source.exit_reason)
        timeline[Phase.GUEST_SUSPENDED] = _event_time(event)
        _wait_status(source, "suspended", self.timeout)

    def capabilities(self) -> list[dict[str, object]]:
        return [*super().capabilities(), {"capability": "x-ignore-shared", "state": True}]

    def channels(self) -> list[dict[str, object]]:
        return self.incoming.channels()

    def take_over(self, source: QemuProcess, target: QemuProcess, result: TransferResult,
                  completed: dict[str, Any], mark: int) -> None:
        t = result.timeline
        _wait_status(source, "postmigrate", self.timeout)
        self.retire(source, result)
        target.start()
        t[Phase.TARGET_SPAWNED] = target.t_spawn
        target.connect_qmp(self.timeout)
        t[Phase.TARGET_LISTENING] = time.time()
        tq = target.qmp
        since = len(tq.events)
        tq.execute("migrate-set-capabilities", {"capabilities": self.capabilities()})
        tq.execute("migrate-set-parameters", {"mode": str(self.mode)})
        tq.execute("migrate-incoming", {"channels": self.channels()})
        final = tq.wait_event(_status_is(*FINAL_STATES), self.timeout, "MIGRATION completed/failed of the target",
                              since=since, alive=target.exit_reason)
        if final["data"]["status"] != "completed":
            info = tq.execute("query-migrate")
            raise CprError(f"the new QEMU {target.label} could not load the state ({final['data']['status']}: "
                           f"{info.get('error-desc', 'no error description')}); the old QEMU has quit, the guest "
                           "is lost")
        if self.suspend_guest is not None:
            _wait_status(target, "suspended", self.timeout)
            since = len(tq.events)
            tq.execute("system_wakeup")
            woke = tq.wait_event(lambda e: e.get("event") == "WAKEUP", self.timeout, "WAKEUP of the guest",
                                 since=since, alive=target.exit_reason)
            t[Phase.GUEST_WOKEN] = _event_time(woke)
            _wait_status(target, "running", self.timeout)
            t[Phase.TARGET_RUNNING] = t[Phase.GUEST_WOKEN]

    def finish(self, source: QemuProcess, target: QemuProcess, result: TransferResult) -> None:
        _remove_state_file(self.incoming.state_file, result)

    def abandon(self, target: QemuProcess | None) -> None:
        _remove_state_file(self.incoming.state_file)
        super().abandon(target)


def _remove_state_file(path: Path, result: TransferResult | None = None) -> None:
    """Remove a mode's state file, its size recorded on `result` first."""
    if result is not None and path.exists():
        result.state_file_bytes = path.stat().st_size
    path.unlink(missing_ok=True)


def _wait_status(proc: QemuProcess, status: str, timeout: float) -> None:
    """Poll query-status (bounded) until QEMU reports `status` (runstates without their own event)."""
    deadline = time.monotonic() + timeout
    while (now := proc.qmp.execute("query-status")["status"]) != status:
        if time.monotonic() > deadline:
            raise CprTimeout(f"QEMU {proc.label} still {now!r}, not {status!r}, after {timeout:.0f}s")
        time.sleep(0.01)


def cpr_transfer(source: QemuProcess, start_target: Callable[[], QemuProcess], incoming: Incoming,
                 result: TransferResult, timeout: float, observer: TransferObserver | None = None) -> QemuProcess:
    """cpr-transfer `source`'s guest to a new QEMU made by `start_target` (see cpr_migrate)."""
    return cpr_migrate(source, TransferSteps(start_target, incoming, timeout), result, timeout, observer)


def cpr_migrate(source: QemuProcess, steps: ModeSteps, result: TransferResult, timeout: float,
                observer: TransferObserver | None = None) -> QemuProcess:
    """Transfer the guest from `source` to the target `steps` make, in `steps.mode`; returns the target.

    On failure raises TransferFailed (result filled in as far as it got); the source is left as
    QEMU left it (it should be running the guest again) and the target is shut down.
    `observer` is told, with the target: on_spawned once it is made (cpr-transfer: started; cpr-exec:
    its argv ready, the source will exec it), on_before_migrate once it listens (cpr-exec: right
    after), on_after_migrate once the source accepted `migrate`.
    A source that was not running (paused guest) leaves the target paused too, as QEMU does.
    """
    observer = observer or Observer()
    t = result.timeline
    result.mode = str(steps.mode)
    what = f"{steps.mode} {result.index}"
    source_status = source.qmp.execute("query-status")["status"]
    result.source_pid = source.pid
    t[Phase.STEP_START] = time.time()
    target: QemuProcess | None = None
    try:
        target = steps.prepare(t, observer)
        steps.before_migrate(source, t)
        qmp = source.qmp
        mark = len(qmp.events)
        qmp.execute("migrate-set-capabilities", {"capabilities": steps.capabilities()})
        qmp.execute("migrate-set-parameters", steps.parameters(target))
        t[Phase.MIGRATE_ISSUED] = time.time()
        qmp.execute("migrate", {"channels": steps.channels()})
        observer.on_after_migrate(target)
        final = qmp.wait_event(_status_is(*FINAL_STATES), timeout, "MIGRATION completed/failed",
                               since=mark, alive=source.exit_reason)
        t[Phase.migration_ended(final["data"]["status"])] = _event_time(final)
        for event in qmp.events[mark:]:
            if event.get("event") == "STOP" and Phase.SOURCE_STOPPED not in t:
                t[Phase.SOURCE_STOPPED] = _event_time(event)
        if steps.source_answers_after or final["data"]["status"] != "completed":
            result.qemu = _source_numbers(qmp.execute("query-migrate"))
        else:  # the source exec's right after completed: its numbers from its event times
            result.qemu = _event_numbers(qmp.events[mark:], final)
        if final["data"]["status"] == "completed":
            steps.take_over(source, target, result, final, mark)
        result.status = str(result.qemu["status"])
        if result.status != final["data"]["status"]:  # cpr-exec: failed after completed
            t[Phase.migration_ended(result.status)] = _last_status_time(qmp.events[mark:], final)
        if result.status != "completed":
            result.error = str(result.qemu.get("error-desc", f"migration {result.status}"))
            why = _target_exit(target)
            if why:
                result.notes.append(why)
            raise TransferFailed(f"{what} ended {result.status}: "
                                 f"{result.qemu.get('error-desc', 'no error description')}"
                                 + (f"; {why}" if why else ""), result)
        tq = target.qmp
        result.target_pid = target.pid
        if source_status != "running":
            result.notes.append(f"source was {source_status} before migrate; the target is left "
                                f"{tq.execute('query-status')['status']} (no target_running)")
        elif Phase.TARGET_RUNNING in t:  # the steps saw it (cpr-reboot: the guest woke)
            pass
        elif tq.execute("query-status")["status"] != "running":
            ev = tq.wait_event(lambda e: e.get("event") == "RESUME", timeout, "RESUME of the target",
                               alive=target.exit_reason)
            t[Phase.TARGET_RUNNING] = _event_time(ev)
        else:
            resumed = [e for e in tq.events if e.get("event") == "RESUME"]
            t[Phase.TARGET_RUNNING] = _event_time(resumed[0]) if resumed else time.time()
            if not resumed:
                result.notes.append("target was already running when its QMP answered; "
                                    "target_running is the time of that answer")
        steps.finish(source, target, result)
        return target
    except TransferFailed:
        steps.abandon(target)
        raise
    except (CprError, QMPError, OSError) as exc:  # QmpError is a CprError
        result.status = "failed"
        result.error = _failure(exc, target, result)
        steps.abandon(target)
        raise TransferFailed(f"{what} failed: {result.error}", result) from exc
    except BaseException:
        steps.abandon(target)
        raise


def _source_numbers(info: dict[str, Any]) -> dict[str, Any]:
    """The figures of query-migrate on the source."""
    keys = ("status", "downtime", "total-time", "setup-time", "error-desc")
    numbers: dict[str, Any] = {k: info.get(k) for k in keys if k in info}
    numbers["ram"] = {k: info.get("ram", {}).get(k) for k in ("transferred", "total", "duplicate")}
    return numbers


def _event_numbers(events: list[dict[str, Any]], completed: dict[str, Any]) -> dict[str, Any]:
    """query-migrate's figures from the source's events, for a source that cannot be asked (cpr-exec):
    total = MIGRATION setup -> completed, downtime = STOP -> completed (QEMU's own timestamps)."""
    end = _event_time(completed)
    setup = next((e for e in events if _status_is("setup")(e)), None)
    stop = next((e for e in events if e.get("event") == "STOP"), None)
    return {"status": "completed",
            "total-time": round((end - _event_time(setup)) * 1000, 3) if setup else None,
            "downtime": round((end - _event_time(stop)) * 1000, 3) if stop else None}


def _last_status_time(events: list[dict[str, Any]], final: dict[str, Any]) -> float:
    """The time of the last MIGRATION status event (cpr-exec: failed may follow completed)."""
    statuses = [e for e in events if _status_is(*FINAL_STATES)(e)]
    return _event_time(statuses[-1] if statuses else final)


def _target_exit(target: QemuProcess, grace: float = 2.0) -> str | None:
    """Why the target went away, if it did (it usually exits right after a failed load)."""
    if target.popen is None:  # never started (a cpr-exec that did not exec)
        return None
    target.wait_exit(grace)
    return target.exit_reason()


def _failure(exc: BaseException, target: QemuProcess | None, result: TransferResult) -> str:
    """What went wrong, with the target's own exit reason when it died (waited for, bounded)."""
    text = str(exc) or type(exc).__name__
    if target is not None and target.popen is not None and target.exit_reason() is None:
        target.wait_exit(2.0)
    if target is not None and (reason := target.exit_reason()) is not None and reason not in text:
        text += f"; {reason}"
    if result.qemu.get("status") == "completed":
        result.notes.append("the source reported the migration completed (it is in postmigrate, the "
                            "guest stopped) but the target did not take the guest over")
        text = f"source reported completed but the target failed: {text}"
    return text


# What management software asks the old QEMU after a migration, before it tells it to quit.
OLD_QEMU_QUERIES = ("query-status", "query-migrate", "query-name", "query-cpus-fast", "query-block",
                    "query-balloon", "query-kvm")


def query_source(source: QemuProcess, commands: tuple[str, ...] = OLD_QEMU_QUERIES) -> dict[str, str]:
    """Ask the old QEMU (postmigrate) each query: command -> "return", "error: <desc>" (a QMP error
    is an answer, e.g. no balloon device), or "died: <why>" for the one it did not survive (the
    last entry then)."""
    answers: dict[str, str] = {}
    for command in commands:
        try:
            source.qmp.execute(command, timeout=10)
            answers[command] = "return"
        except QmpError as exc:
            answers[command] = f"error: {exc}"
        except (CprError, QMPError, OSError) as exc:
            source.wait_exit(5.0)
            answers[command] = f"died: {source.exit_reason() or f'no answer ({exc}), still running'}"
            return answers
        if (reason := source.exit_reason()) is not None:
            answers[command] = f"died: {reason}"
            return answers
    return answers


def retire_source(source: QemuProcess, result: TransferResult, timeout: float = 30.0) -> None:
    """Shut the old QEMU down cleanly (quit), recording how it ended."""
    source.shutdown(timeout)
    rc = source.popen.returncode if source.popen else None
    result.timeline[Phase.SOURCE_EXITED] = time.time()
    result.source_exit = f"exit code {rc}" if rc is not None and rc >= 0 else f"signal {-(rc or 0)}"
