"""One QEMU process: launch, logs, console, QMP, and a shutdown that always cleans up.

Shutdown is quit over QMP, then SIGTERM, then SIGKILL, each bounded. Every process started here
is recorded in the leftovers registry until it is reaped, so a later run can clean up after a
killed one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
from pexpect import fdpexpect

from pytest_cpr import leftovers
from pytest_cpr.errors import CprTimeout, QemuExited
from pytest_cpr.qemu import stderr
from pytest_cpr.qemu.qmp import QmpSession

# QEMU's words when KVM refuses to go on running the guest (it then stops the VM: STOP, status
# internal-error)
KVM_FATAL = re.compile(r"KVM internal error|KVM: entry failed")


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Console:
    """The guest serial console over QEMU's chardev socket, driven with pexpect."""

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self._sock = sock
        self.log_path = log_path
        self.child = fdpexpect.fdspawn(sock.fileno(), encoding="utf-8", codec_errors="replace",
                                       timeout=30)
        self._quiet = False

    def expect(self, pattern: str, timeout: float, what: str) -> str:
        """Wait for a regex on the console; returns the first group (or the whole match)."""
        try:
            self.child.expect(pattern, timeout=timeout)
        except pexpect.TIMEOUT:
            raise CprTimeout(f"console: {what} not seen within {timeout:.0f}s; console log: "
                             f"{self.log_path}\n{tail(self.log_path)}") from None
        except pexpect.EOF:
            raise QemuExited(f"console closed while waiting for {what}; console log: {self.log_path}\n"
                             f"{tail(self.log_path)}") from None
        match = self.child.match
        return str(match.group(1) if match.groups() else match.group(0))

    def _quiet_shell(self, timeout: float) -> None:
        """Turn off echo and the prompt so output is exactly what commands print."""
        self.child.sendline("stty -echo; PS1=''; echo '@@CPR-'QUIET@@")
        self.expect(r"@@CPR-QUIET@@\r?\n", timeout, "the console shell (stty -echo)")
        self._quiet = True

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command on the console shell; returns (exit code, output)."""
        if not self._quiet:
            self._quiet_shell(timeout)
        self.child.sendline(f'{command}; echo "@@CPR-RC=$?@@"')
        try:
            self.child.expect(r"@@CPR-RC=(\d+)@@", timeout=timeout)
        except (pexpect.TIMEOUT, pexpect.EOF):
            raise CprTimeout(f"console: no answer to {command!r} within {timeout:.0f}s; console log: "
                             f"{self.log_path}") from None
        output = str(self.child.before)
        # drop the echoed command line itself
        lines = [ln for ln in output.splitlines() if "@@CPR-RC=" not in ln]
        return int(self.child.match.group(1)), "\n".join(lines).strip()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass



def unix_listening(path: Path) -> bool:
    """Whether a UNIX stream socket bound to `path` listens (/proc/net/unix flag __SO_ACCEPTCON)."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False

class QemuProcess:
    """A QEMU process of one VM generation (0 = the first boot, n = after n transfers)."""

    def __init__(self, binary: str, argv: list[str], label: str, rundir: Path, artifacts: Path,
                 qmp_socket: Path, console_socket: Path, console_log: Path,
                 pass_fds: tuple[int, ...] = (), env: tuple[tuple[str, str], ...] = ()) -> None:
        self.binary, self.argv, self.label = binary, argv, label
        self.env = env  # set on top of the harness's environment
        self.rundir, self.artifacts = rundir, artifacts
        self.qmp_socket, self.console_socket, self.console_log = qmp_socket, console_socket, console_log
        self.stderr_path = artifacts / f"qemu-{label}.stderr"
        self.pass_fds = pass_fds
        self.popen: subprocess.Popen[bytes] | None = None
        self.qmp = QmpSession(label, artifacts / "qmp-transcript.jsonl", why_gone=self._why_qmp_closed)
        self.console: Console | None = None
        self.t_spawn = 0.0
        self.quit_sent = False  # QEMU acknowledged `quit` over QMP (shutdown): its exit status is its own
        self.replaced_by: str | None = None  # cpr-exec: the label of the QEMU this process exec'd

    def take_over(self, predecessor: QemuProcess) -> None:
        """cpr-exec: this generation is the new QEMU `predecessor`'s process exec'd (same PID, stderr
        file inherited). The predecessor's QMP and console died with the exec; its shutdown no longer
        touches the process, which is this generation's now."""
        assert predecessor.popen is not None
        self.popen, self.t_spawn = predecessor.popen, time.time()
        self.stderr_path = predecessor.stderr_path
        predecessor.replaced_by = self.label
        if predecessor.console is not None:
            predecessor.console.close()
        predecessor.qmp.close()
        (self.artifacts / f"qemu-{self.label}.cmdline").write_text(
            " ".join(_quote(a) for a in self.argv) + f"\n# exec'd by {predecessor.label} (PID {self.pid})\n")
        leftovers.record_process(self.pid, self.argv)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        (self.artifacts / f"qemu-{self.label}.cmdline").write_text(
            " ".join([*(f"{k}={_quote(v)}" for k, v in self.env), *(_quote(a) for a in self.argv)]) + "\n")
        try:
            with self.stderr_path.open("wb") as err, stops_deferred():
                self.t_spawn = time.time()
                self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                              pass_fds=self.pass_fds, start_new_session=True,
                                              env={**os.environ, **dict(self.env)} if self.env else None)
                leftovers.record_process(self.popen.pid, self.argv)
        except BaseException:
            if self.popen is not None:  # a stop held during the spawn: the caller never gets this process
                self.shutdown(5)
            raise

    def exit_reason(self) -> str | None:
        """None while running (a process that exec'd its successor runs as that); else a sentence with
        the exit status and the stderr tail."""
        if self.popen is None or self.popen.poll() is None:
            return None
        rc = self.popen.returncode
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return (f"QEMU {self.label} exited ({how}{self._shutdown_reason()}); stderr {self.stderr_path}:\n"
                f"{tail(self.stderr_path)}")

    def halt_reason(self) -> str | None:
        """exit_reason(), or why the guest cannot run although its QEMU does: the guest panicked
        (GUEST_PANICKED), or QEMU stopped the VM on an accelerator error (STOP with no RESUME after
        it and a KVM_FATAL line on stderr: "KVM internal error. Suberror: 3", "KVM: entry failed"), or
        the guest asked to reset or power off and QEMU, told `-action shutdown=pause`, paused it.
        A wait on the guest that polls this ends at once, naming QEMU's words, instead of at its
        timeout (seen in the virtual host: an L2 QEMU stopped on a KVM entry failure was waited out
        to the test's 900 s)."""
        if (reason := self.exit_reason()) is not None:
            return reason
        # QEMU runs on after a guest's SHUTDOWN: -action shutdown=pause holds the CPUs as they were
        shutdown = self._last_shutdown()
        if shutdown is not None and shutdown.get("guest"):
            return (f"QEMU {self.label} stopped the guest after SHUTDOWN by the guest: "
                    f"{shutdown.get('reason', '?')}; stderr {self.stderr_path}")
        state = [e for e in self.qmp.events if e.get("event") in ("STOP", "RESUME", "GUEST_PANICKED")]
        if state and state[-1].get("event") == "GUEST_PANICKED":
            return f"QEMU {self.label} reports GUEST_PANICKED {state[-1].get('data', {})}; stderr {self.stderr_path}"
        if not state or state[-1].get("event") != "STOP":
            return None
        fatal = [line for line in stderr.lines_since(self.stderr_path) if KVM_FATAL.search(line)]
        if not fatal:
            return None
        return (f"QEMU {self.label} stopped the guest: {fatal[0]}; stderr {self.stderr_path}:\n"
                f"{tail(self.stderr_path)}")

    def _why_qmp_closed(self) -> str:
        """Why QMP closed under a command: QEMU exited (given a moment: the monitor closes before the
        process is gone), with its reason, or it runs on without its monitor."""
        if self.popen is not None:
            self.wait_exit(5.0)
        return self.exit_reason() or f"QEMU {self.label} still runs; stderr {self.stderr_path}"

    def _shutdown_reason(self) -> str:
        """', after SHUTDOWN (guest-reset)' when QMP saw why: a guest reset under -no-reboot is a crash
        (panic=-1, or a triple fault) of the guest kernel."""
        data = self._last_shutdown()
        if data is None:
            return ""
        who = "by the guest" if data.get("guest") else "by the host"
        return f", after SHUTDOWN {who}: {data.get('reason', '?')}"

    def _last_shutdown(self) -> dict[str, Any] | None:
        """The data of the last SHUTDOWN event QMP saw ({"guest": bool, "reason": ...}), None before one."""
        events = [e for e in self.qmp.events if e.get("event") == "SHUTDOWN"]
        return events[-1].get("data", {}) if events else None

    def wait_for_path(self, path: Path, timeout: float, what: str, listening: bool = False) -> float:
        """Wait until QEMU creates a socket path (with `listening`: and listens on it, since bind()
        creates the file before listen() and a connect in between is refused); returns the time."""
        deadline = time.monotonic() + timeout
        while not path.exists() or (listening and not unix_listening(path)):
            if (reason := self.exit_reason()) is not None:
                raise QemuExited(f"while waiting for {what}: {reason}")
            if time.monotonic() > deadline:
                raise CprTimeout(f"{what} ({path}) did not appear within {timeout:.0f}s; QEMU stderr: "
                                 f"{self.stderr_path}")
            time.sleep(0.002)
        return time.time()

    def connect_qmp(self, timeout: float) -> None:
        self.wait_for_path(self.qmp_socket, timeout, f"QMP socket of QEMU {self.label}", listening=True)
        try:
            self.qmp.connect(self.qmp_socket, timeout)
        except Exception as exc:
            if self.popen is not None:
                try:
                    self.popen.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            reason = self.exit_reason()
            raise QemuExited(reason or f"QMP connect to QEMU {self.label} failed: {exc}") from exc

    def connect_console(self, timeout: float) -> Console:
        self.wait_for_path(self.console_socket, timeout, f"console socket of QEMU {self.label}",
                           listening=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.console_socket))
        self.console = Console(sock, self.console_log)
        return self.console

    def wait_exit(self, timeout: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def shutdown(self, timeout: float = 10.0) -> None:
        """quit over QMP, then SIGTERM, then SIGKILL; always reaps and closes everything. A process
        that never took `quit` (no QMP yet: a target stopped before it read the cpr state) gets SIGTERM
        at once: waiting for it to exit by itself only delays teardown (a CI job's timeout sends
        SIGKILL soon after its SIGTERM). A process that exec'd its successor (cpr-exec) is the
        successor's to end: only closed here."""
        try:
            if self.popen is not None and self.replaced_by is None and self.popen.poll() is None:
                self._signal(signal.SIGCONT)  # a stopped process (fault injection) cannot quit
                if self.qmp.connected:
                    try:
                        self.qmp.execute("quit", timeout=timeout)
                        self.quit_sent = True
                    except Exception:
                        pass
                if not self.quit_sent or self.wait_exit(timeout) is None:
                    self._signal(signal.SIGTERM)
                    if self.wait_exit(timeout) is None:
                        self._signal(signal.SIGKILL)
                        self.wait_exit(timeout)
        finally:
            if self.console is not None:
                self.console.close()
            self.qmp.close()
            # an interrupted shutdown keeps the record (a later cleanup kills it); so does an exec'd one
            if self.popen is not None and self.replaced_by is None and self.popen.poll() is not None:
                leftovers.forget_process(self.popen.pid)

    def kill(self) -> None:
        """SIGKILL now (fault injection and last-resort cleanup)."""
        self._signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def _signal(self, signum: int) -> None:
        if self.popen is not None and self.replaced_by is None and self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signum)
            except ProcessLookupError:
                pass


# The signals that stop a run: Ctrl-C, and SIGTERM (a CI job's timeout, `kill`), which the plugin
# handles like Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Hold the stop signals (STOP_SIGNALS) while a QEMU is spawned and recorded, and replay them after.

    A KeyboardInterrupt raised inside subprocess.Popen after the fork loses the child: Popen never
    returns it, so nobody records its pid, and teardown never ends it (it runs in its own session, so
    no Ctrl-C reaches it either). Each stop signal whose handler is Python code (the plugin's, Python's
    default Ctrl-C handler) gets a handler that only holds it; the held signals are handed to the
    previous handlers in order on the way out, so the interrupt is raised once the process is known.
    Signals with no Python handler (SIG_DFL, SIG_IGN) act as always."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous: dict[int, Callable[[int, Any], Any]] = {}
    for stop in STOP_SIGNALS:
        handler = signal.getsignal(stop)
        if callable(handler):
            signal.signal(stop, lambda signum, frame: held.append((signum, frame)))
            previous[stop] = handler
    try:
        yield
    finally:
        for held_signal, held_handler in previous.items():
            signal.signal(held_signal, held_handler)
        raised: BaseException | None = None
        for signum, frame in held:
            try:
                previous[signum](signum, frame)
            except BaseException as exc:  # the first one raised wins; the others were still told
                raised = raised or exc
        if raised is not None:
            raise raised


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " \"{}*$") else arg
