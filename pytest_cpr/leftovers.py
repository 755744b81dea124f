"""A registry on disk of what a run has started (QEMU processes, network namespaces, device bindings).

Each record names the harness process that owns it. At session start, records whose owner is gone
are cleaned (processes killed, namespaces deleted, bindings restored by their own module), so a
run killed with SIGKILL never breaks the runs after it.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("CPR_STATE_DIR", "/run/pytest-cpr"))

Cleaner = Callable[[dict[str, Any]], str]  # record -> description of what was cleaned

# The one registry of cleaners: each kind of record and the function (module:name) that cleans it.
# Modules are imported only when a record of their kind is cleaned (the CLI and session start).
CLEANERS: dict[str, str] = {
    "proc": "pytest_cpr.leftovers:clean_process",
    "rundir": "pytest_cpr.machine:clean_private_dir",
    "netns": "pytest_cpr.host.netns:clean_netns",
    "vfio": "pytest_cpr.host.vfio:clean_vfio",
    "mdev": "pytest_cpr.host.mdev:clean_mdev",
}
_CLEANERS: dict[str, Cleaner] = {}  # loaded from CLEANERS, or registered (tests, extensions)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _write(name: str, record: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    record.update(owner=os.getpid(), owner_start=_proc_start_time(os.getpid()), t=time.time())
    tmp = STATE_DIR / f".{name}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(STATE_DIR / f"{name}.json")


def _forget(name: str) -> None:
    (STATE_DIR / f"{name}.json").unlink(missing_ok=True)


def record(kind: str, key: str, **data: Any) -> None:
    _write(f"{kind}-{key}", {"kind": kind, "key": key, **data})


def forget(kind: str, key: str) -> None:
    _forget(f"{kind}-{key}")


def record_process(pid: int, argv: list[str]) -> None:
    record("proc", str(pid), pid=pid, start=_proc_start_time(pid), argv0=argv[0])


def forget_process(pid: int) -> None:
    forget("proc", str(pid))


def register_cleaner(kind: str, cleaner: Cleaner) -> None:
    """Clean records of `kind` with `cleaner` (over the CLEANERS entry, if any)."""
    _CLEANERS[kind] = cleaner


def cleaner_for(kind: str) -> Cleaner | None:
    """The cleaner of `kind`: registered, else loaded from CLEANERS; None if there is none, or its
    module cannot be imported here (e.g. pyroute2 missing: the record is kept for a later run)."""
    if kind not in _CLEANERS and kind in CLEANERS:
        module, _, name = CLEANERS[kind].partition(":")
        try:
            _CLEANERS[kind] = getattr(importlib.import_module(module), name)
        except ImportError:
            return None
    return _CLEANERS.get(kind)


def _owner_alive(rec: dict[str, Any]) -> bool:
    owner = int(rec.get("owner", 0))
    return owner > 0 and _proc_start_time(owner) == rec.get("owner_start")


def is_stale(rec: dict[str, Any]) -> bool:
    """True when the harness process that wrote the record is gone (what clean_stale() cleans)."""
    return not _owner_alive(rec)


def clean_process(rec: dict[str, Any]) -> str:
    pid = int(rec["pid"])
    if _proc_start_time(pid) != rec.get("start"):
        return f"process {pid} already gone"
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if _proc_start_time(pid) is None:
            break
        time.sleep(0.01)
    return f"killed stale QEMU process {pid} ({rec.get('argv0')})"



def records() -> list[dict[str, Any]]:
    if not STATE_DIR.is_dir():
        return []
    out = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return out


def clean_stale() -> list[str]:
    """Clean every record whose owning harness process is gone; returns what was done."""
    return _clean(is_stale)


def clean_own() -> list[str]:
    """Clean every record this process wrote, now (a second Ctrl-C: kill what is left)."""
    return _clean(lambda rec: int(rec.get("owner", 0)) == os.getpid())


def _clean(select: Callable[[dict[str, Any]], bool]) -> list[str]:
    done = []
    # processes first: they hold taps and device fds
    for rec in sorted(records(), key=lambda r: r.get("kind") != "proc"):
        if not select(rec):
            continue
        cleaner = cleaner_for(rec.get("kind", ""))
        if cleaner is None:
            continue
        try:
            done.append(cleaner(rec))
        except Exception as exc:
            done.append(f"could not clean {rec.get('kind')} {rec.get('key')}: {exc}")
            continue
        _forget(f"{rec['kind']}-{rec['key']}")
    return done


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    state: str  # "Z" for a zombie not yet reaped
    cmdline: bytes  # NUL-separated argv


def processes() -> Iterator[ProcInfo]:
    """Every process visible in /proc (those that vanish while being read are skipped)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        yield ProcInfo(int(entry.name), int(fields[1]), comm, fields[0], cmdline)
