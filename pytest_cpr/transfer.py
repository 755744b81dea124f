"""One CPR transfer (cpr-transfer, cpr-exec or cpr-reboot) of a machine's guest to a new QEMU generation, with its
bookkeeping: the result list, the observers' events, the failed target set aside, the old QEMU
retired (cpr-exec: it became the new one), the SSH session checked, the artifact files written and
the result reported."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pytest_cpr.artifacts import ArtifactWriter
from pytest_cpr.cpr import (
    SUSPEND_COMMAND,
    ExecSteps,
    ModeSteps,
    NormalSteps,
    ProcessRef,
    RebootSteps,
    TransferResult,
    TransferSteps,
    cpr_migrate,
    retire_source,
)
from pytest_cpr.errors import TransferFailed
from pytest_cpr.kinds import Mode, Phase
from pytest_cpr.machine import Machine
from pytest_cpr.observers import Observers
from pytest_cpr.qemu import stderr
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.spec import ExecIncoming, Incoming, RebootIncoming
from pytest_cpr.waits import SSH_AFTER_TRANSFER_S

log = logging.getLogger(__name__)


class TransferRunner:
    """Transfers `machine`'s guest; `observers` see each transfer, `report` gets each final result."""

    def __init__(self, machine: Machine, observers: Observers, artifacts: ArtifactWriter,
                 report: list[Callable[[TransferResult], None]]) -> None:
        self.machine, self.observers, self.artifacts, self.report = machine, observers, artifacts, report
        self.results: list[TransferResult] = []

    def run(self, target: QemuBuild | None = None, mode: Mode | None = None) -> TransferResult:
        """Transfer to a new generation of `target` (default: the configured target build) in `mode`
        (default: the configured mode)."""
        m = self.machine
        build = target or m.config.target
        mode = Mode(mode or m.config.mode)
        source = m.current
        gen = len(m.generations)
        result = TransferResult(len(self.results) + 1, ProcessRef(source.label, m.build_of(source.label).short_version),
                                ProcessRef(f"g{gen}", build.short_version), mode=str(mode))
        self.results.append(result)
        steps = self._steps(mode, gen, build)
        result.fd_passing = self._fd_passing(steps)
        log.info("guest %s: %s %d %s -> %s", m.config.name, mode, result.index, result.source, result.target)
        m.known_stderr |= set(stderr.lines_since(source.stderr_path))  # said before this transfer: not its doing
        source_said = stderr.size(source.stderr_path)
        try:
            cpr_migrate(source, steps, result, m.config.transfer_timeout, self.observers)
        except TransferFailed:
            m.drop_generation(gen)
            self.observers.on_result(result)
            self.record(result)
            raise
        if steps.retires_source:
            self._retire(source, result)
        said = stderr.lines_since(source.stderr_path, source_said)
        if m.current.stderr_path != source.stderr_path:  # cpr-exec: one process, one stderr file
            said += stderr.lines_since(m.current.stderr_path)
        result.qemu_messages = stderr.news(said, m.known_stderr, m.config.trace_events)
        self.observers.on_result(result)
        # a paused source leaves the target paused; a guest only launched (not booted) has no SSH session
        if Phase.TARGET_RUNNING in result.timeline and m.ssh is not None:
            self._check_ssh(result)
        self.record(result)
        return result

    def _steps(self, mode: Mode, gen: int, build: QemuBuild) -> ModeSteps:
        """The mode's steps towards generation `gen` of `build` (its channels in the run directory)."""
        m = self.machine
        timeout = m.config.transfer_timeout
        if mode is Mode.CPR_EXEC:
            state = ExecIncoming(m.rundir / f"state-g{gen}.bin")
            state.state_file.unlink(missing_ok=True)  # left by a failed transfer to this generation
            return ExecSteps(lambda: m.new_generation(gen, build, state), state, timeout)
        if mode is Mode.CPR_REBOOT:
            saved = RebootIncoming(m.rundir / f"state-g{gen}.bin")
            saved.state_file.unlink(missing_ok=True)
            suspend = self._suspend_guest if m.config.suspends_for_reboot else None
            return RebootSteps(lambda: m.new_generation(gen, build, saved), saved, timeout, self._retire, suspend)
        main = m.rundir / f"mig-g{gen}.sock"
        cpr = None if mode is Mode.NORMAL else m.rundir / f"cpr-g{gen}.sock"
        for stale in (main, cpr):
            if stale is not None:
                stale.unlink(missing_ok=True)  # left by a failed transfer to this generation
        if mode is Mode.NORMAL:
            normal = Incoming(main, None)
            return NormalSteps(lambda: m.start_generation(gen, build, normal), normal, timeout)
        assert cpr is not None
        listener = _listen_unix(cpr) if m.config.cpr_channel_fd else None
        incoming = Incoming(main, cpr, cpr_fd=listener.fileno() if listener else None)
        return TransferSteps(lambda: m.start_generation(gen, build, incoming), incoming, timeout, listener)

    def _fd_passing(self, steps: ModeSteps) -> str | None:
        """What of this transfer's QEMUs the harness passed as fds (TransferResult.fd_passing)."""
        passed = ["iommufd", "vfio-cdev"] if self.machine.config.fd_passing is not None else []
        if isinstance(steps, TransferSteps) and steps.incoming.cpr_fd is not None:
            passed.append("cpr-channel")
        return ",".join(passed) or None

    def _retire(self, source: QemuProcess, result: TransferResult) -> None:
        self.observers.on_before_retire(source)
        retire_source(source, result)

    def _suspend_guest(self) -> None:
        self.machine.require_ssh().run(SUSPEND_COMMAND)

    def _check_ssh(self, result: TransferResult) -> None:
        """The SSH session opened before the transfer runs a command after it (timed)."""
        try:
            ssh = self.machine.require_ssh()
            ssh.run("true", timeout=min(self.machine.config.command_timeout, SSH_AFTER_TRANSFER_S))
            result.timeline[Phase.SSH_ANSWERED] = time.time()
        except Exception as exc:
            result.notes.append(f"SSH after transfer failed: {exc}")

    def record(self, result: TransferResult) -> None:
        """Artifact files of `result`, the report, and transfers.json (rewritten with every change)."""
        self.artifacts.save_measurements(result, self.observers.probe_source())
        for hook in self.report:
            hook(result)
        self.artifacts.write_transfers(self.results)


def _listen_unix(path: Path) -> socket.socket:
    """A listening UNIX socket at `path` (its fd goes to the new QEMU, inherited through pass_fds)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock
