"""Why a guest stopped answering, as one file and one line: the QEMU run state and vCPU registers,
the host's vfio interrupt rates (a storm starves the guest's userspace while its kernel still answers
pings), the host kernel log, and whether the serial console's shell answers."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path

from pytest_cpr.host import vfio
from pytest_cpr.qemu.process import Console, QemuProcess
from pytest_cpr.waits import DIAGNOSE_CONSOLE_TIMEOUT_S, DIAGNOSE_DMESG_TIMEOUT_S, DIAGNOSE_QMP_TIMEOUT_S

QMP_QUERIES = (("query-status", None), ("query-cpus-fast", None),
               ("human-monitor-command", {"command-line": "info registers -a"}))
CONSOLE_COMMAND = "cat /proc/loadavg; ps -eo stat,pid,comm | grep '^D' | head -20"
HOST_LOG_LINES = 40


def diagnose_guest(proc: QemuProcess, console: Callable[[], Console], path: Path, why: str) -> str:
    """Write the details to `path`; return a one-line summary naming it."""
    parts = [f"== {why}"]
    status = _qemu_state(proc, parts)
    rates = vfio.host_vfio_irq_rates()
    parts.append(f"== host vfio interrupts per second: {rates or 'no vfio lines'}")
    _host_log(parts)
    console_state = _console_state(console, parts)
    path.write_text("\n".join(parts) + "\n")
    busiest = max(rates.items(), key=lambda kv: kv[1]) if rates else None
    storm = f"; busiest host vfio line {busiest[0]} at {busiest[1]:.0f}/s" if busiest else ""
    return f"QEMU {status}, serial console {console_state}{storm} (details: {path})"


def _qemu_state(proc: QemuProcess, parts: list[str]) -> str:
    status = "?"
    for cmd, args in QMP_QUERIES:
        try:
            reply = proc.qmp.execute(cmd, args, timeout=DIAGNOSE_QMP_TIMEOUT_S)
            status = reply.get("status", status) if isinstance(reply, dict) else status
            parts.append(f"== {cmd} {args or ''}\n{reply}")
        except Exception as exc:  # diagnostics only: record and go on
            parts.append(f"== {cmd}: {exc}")
    return str(status)


def _host_log(parts: list[str]) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        kernel = subprocess.run(["dmesg", "-T"], capture_output=True, text=True,
                                timeout=DIAGNOSE_DMESG_TIMEOUT_S).stdout
        parts.append(f"== host kernel log (last {HOST_LOG_LINES} lines)\n"
                     + "\n".join(kernel.splitlines()[-HOST_LOG_LINES:]))


def _console_state(console: Callable[[], Console], parts: list[str]) -> str:
    try:
        _, out = console().run(CONSOLE_COMMAND, timeout=DIAGNOSE_CONSOLE_TIMEOUT_S)
    except Exception as exc:
        parts.append(f"== serial console shell: {exc}")
        return "silent"
    parts.append(f"== serial console shell\n{out}")
    return "answers"
