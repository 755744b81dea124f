"""cpr-transfer orchestration: source QEMU -> freshly started target QEMU, as QEMU documents it.

Steps (docs/devel/migration/CPR.rst): the target starts with the source's arguments plus a main
and a cpr -incoming channel; the source gets mode=cpr-transfer and `migrate` with both channels;
the source ends in postmigrate, the target resumes the guest by itself. Every step is timed on
the host's wall clock (the clock QMP event timestamps use too) and bounded by a timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from qemu.qmp import QMPError

from pytest_cpr.errors import CprError, CprTimeout, TransferFailed
from pytest_cpr.kinds import Phase
from pytest_cpr.observers import Observer, TransferObserver
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.qemu.spec import Incoming

FINAL_STATES = ("completed", "failed", "cancelled")


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
    # noteworthy lines the old and new QEMU printed on stderr during the transfer (qemu/stderr.py)
    qemu_messages: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # artifacts: probe series, timeline, plots

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
            "status": self.status,
            "qemu_downtime_ms": self.qemu_downtime_ms,
            "qemu_total_ms": self.qemu_total_ms,
            "qemu_setup_ms": self.qemu.get("setup-time"),
            "wall_ms": self.ms(Phase.MIGRATE_ISSUED, Phase.TARGET_RUNNING),
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
            "probe_send_stall_ms": probe.get("max_send_gap_ms"),
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


def cpr_transfer(source: QemuProcess, start_target: Callable[[], QemuProcess], incoming: Incoming,
                 result: TransferResult, timeout: float, observer: TransferObserver | None = None) -> QemuProcess:
    """Transfer the guest from `source` to a new QEMU made by `start_target`; returns the target.

    On failure raises TransferFailed (result filled in as far as it got); the source is left as
    QEMU left it (it should be running the guest again) and the target is shut down.
    `observer` is told, with the target: on_spawned right after it was started, on_before_migrate
    once it listens, on_after_migrate once the source accepted `migrate`.
    A source that was not running (paused guest) leaves the target paused too, as QEMU does.
    """
    observer = observer or Observer()
    t = result.timeline
    source_status = source.qmp.execute("query-status")["status"]
    t[Phase.STEP_START] = time.time()
    target: QemuProcess | None = None
    try:
        target = start_target()
        t[Phase.TARGET_SPAWNED] = target.t_spawn
        observer.on_spawned(target)
        t[Phase.TARGET_LISTENING] = target.wait_for_path(incoming.cpr_socket, timeout,
                                                     f"cpr channel of target {target.label}", listening=True)
        monitor = _TargetMonitor(target, timeout)
        observer.on_before_migrate(target)
        qmp = source.qmp
        mark = len(qmp.events)
        qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        qmp.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        t[Phase.MIGRATE_ISSUED] = time.time()
        qmp.execute("migrate", {"channels": incoming.channels()})
        observer.on_after_migrate(target)
        final = qmp.wait_event(_status_is(*FINAL_STATES), timeout, "MIGRATION completed/failed",
                               since=mark, alive=source.exit_reason)
        t[Phase.migration_ended(final["data"]["status"])] = _event_time(final)
        for event in qmp.events[mark:]:
            if event.get("event") == "STOP" and Phase.SOURCE_STOPPED not in t:
                t[Phase.SOURCE_STOPPED] = _event_time(event)
        info = qmp.execute("query-migrate")
        result.qemu = {k: info.get(k) for k in ("status", "downtime", "total-time", "setup-time",
                                                "error-desc") if k in info}
        result.qemu["ram"] = {k: info.get("ram", {}).get(k) for k in ("transferred", "total", "duplicate")}
        result.status = str(info.get("status"))
        if result.status != "completed":
            result.error = str(info.get("error-desc", f"migration {result.status}"))
            why = _target_exit(target)
            if why:
                result.notes.append(why)
            raise TransferFailed(f"cpr-transfer {result.index} ended {result.status}: "
                                 f"{info.get('error-desc', 'no error description')}"
                                 + (f"; {why}" if why else ""), result)
        monitor.join()
        tq = target.qmp
        if source_status != "running":
            result.notes.append(f"source was {source_status} before migrate; the target is left "
                                f"{tq.execute('query-status')['status']} (no target_running)")
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
        status = qmp.execute("query-status")["status"]
        if status != "postmigrate":
            result.notes.append(f"source ended in {status}, expected postmigrate")
        return target
    except TransferFailed:
        _abandon(target)
        raise
    except (CprError, QMPError, OSError) as exc:  # QmpError is a CprError
        result.status = "failed"
        result.error = _failure(exc, target, result)
        _abandon(target)
        raise TransferFailed(f"cpr-transfer {result.index} failed: {result.error}", result) from exc
    except BaseException:
        _abandon(target)
        raise


def _target_exit(target: QemuProcess, grace: float = 2.0) -> str | None:
    """Why the target went away, if it did (it usually exits right after a failed load)."""
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


def _abandon(target: QemuProcess | None) -> None:
    if target is not None:
        target.shutdown(timeout=5)


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
