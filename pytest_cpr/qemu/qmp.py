"""A small synchronous face on qemu.qmp's asyncio client.

Each QmpSession runs one event loop in a private thread, so callers (pytest fixtures, threads)
never touch the loop. Every command, reply and event is appended to a JSON-lines transcript with
host wall-clock timestamps; events are kept so callers can wait on them with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from pytest_cpr.errors import CprError, CprTimeout

Event = dict[str, Any]


class QmpError(CprError):
    """QEMU answered a command with an error (not to be confused with qemu.qmp's QMPError, a
    protocol or connection failure)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command, self.error_class, self.desc = command, error_class, desc


class QmpGone(CprError):
    """The QMP connection closed under a command: QEMU exited (its reason in the message) or closed its
    monitor. Not QEMU's answer: qemu.qmp's ExecInterruptedError and kin, named."""


class QmpSession:
    """One QMP connection to a QEMU monitor on a UNIX socket. `why_gone`, when given, says why the
    connection closed under a command (the QEMU process's exit and its stderr)."""

    def __init__(self, name: str, transcript: Path, why_gone: Callable[[], str] | None = None) -> None:
        self.name = name
        self.why_gone = why_gone
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._transcript = transcript.open("a", encoding="utf-8")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._pump: asyncio.Future[None] | None = None
        self.connected = False

    def _log(self, kind: str, payload: object) -> None:
        line = json.dumps({"t": round(time.time(), 6), "qemu": self.name, kind: payload}, default=str)
        self._transcript.write(line + "\n")
        self._transcript.flush()

    def _run(self, coro: Any, timeout: float, what: str) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise CprTimeout(f"QMP {self.name}: no answer to {what} within {timeout:.0f}s") from None

    async def _pump_events(self) -> None:
        async for event in self._listener:
            data = dict(event)
            data["host_t"] = time.time()
            self._log("event", data)
            with self._cond:
                self.events.append(data)
                self._cond.notify_all()

    def connect(self, socket_path: Path, timeout: float) -> dict[str, Any]:
        """Connect and negotiate; returns the greeting's QEMU version."""

        async def go() -> None:
            await self._client.connect(str(socket_path))
            self._pump = asyncio.ensure_future(self._pump_events())

        self._run(go(), timeout, f"connect to {socket_path}")
        self.connected = True
        greeting = self._client.greeting
        version = dict(greeting.QMP.version) if greeting else {}
        self._log("greeting", version)
        return version

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        self._log("command", {"execute": command, "arguments": arguments or {}})
        try:
            reply = self._run(self._client.execute(command, arguments), timeout, command)
        except ExecuteError as exc:
            desc = str(exc)
            self._log("error", {"execute": command, "class": exc.error_class, "desc": desc})
            raise QmpError(command, exc.error_class, desc) from None
        except QMPError as exc:  # the connection, not an answer (e.g. QEMU exited under the command)
            self._log("error", {"execute": command, "class": type(exc).__name__, "desc": str(exc)})
            why = f": {self.why_gone()}" if self.why_gone is not None else ""
            raise QmpGone(f"QMP {self.name}: no answer to {command}, the connection closed "
                          f"({type(exc).__name__}: {exc}){why}") from exc
        self._log("return", {"execute": command, "return": reply})
        return reply

    def wait_event(self, predicate: Callable[[Event], bool], timeout: float, what: str,
                   since: int = 0, alive: Callable[[], str | None] | None = None) -> Event:
        """Wait for an event (among those from index `since` on) that matches; CprTimeout on expiry.

        `alive` is polled while waiting and returns a reason string when waiting is pointless
        (for example, the QEMU process has exited).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CprTimeout(f"QMP {self.name}: {what} not seen within {timeout:.0f}s")
                if alive is not None and (reason := alive()):
                    raise CprTimeout(f"QMP {self.name}: stopped waiting for {what}: {reason}")
                self._cond.wait(min(remaining, 0.2))

    async def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):
                pass

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._stop_pump(), 5, "stop event pump")
        except Exception:
            pass
        if self.connected:
            try:
                self._run(self._client.disconnect(), 5, "disconnect")
            except Exception:
                pass
            self.connected = False
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._loop.is_running():
            self._loop.close()
        self._transcript.close()
