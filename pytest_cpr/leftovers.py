"""A registry on disk of what a run has started (QEMU processes, network namespaces, device bindings).

Each record names the harness process that owns it. At session start, records whose owner is gone
are cleaned (processes killed, namespaces deleted, bindings restored by their own module), so a
run killed with SIGKILL never breaks the runs after it.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import re
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprError

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/pytest-cpr")
STATE_DIR = Path(os.environ.get("CPR_STATE_DIR", str(DEFAULT_STATE_DIR)))

Cleaner = Callable[[dict[str, Any]], str]  # record -> description of what was cleaned
Check = Callable[[dict[str, Any]], "str | None"]  # record -> why it must not be acted on (None: fine)

# The one registry of cleaners: each kind of record, the function (module:name) that cleans it and
# the one that checks its fields before anything is done with it. Modules are imported only when a
# record of their kind is read (the CLI and session start).
CLEANERS: dict[str, tuple[str, str]] = {
    "proc": ("pytest_cpr.leftovers:clean_process", "pytest_cpr.leftovers:process_problem"),
    "rundir": ("pytest_cpr.machine:clean_private_dir", "pytest_cpr.leftovers:rundir_problem"),
    "netns": ("pytest_cpr.host.netns:clean_netns", "pytest_cpr.host.netns:netns_record_problem"),
    "vfio": ("pytest_cpr.host.vfio:clean_vfio", "pytest_cpr.host.vfio:vfio_record_problem"),
    "mdev": ("pytest_cpr.host.mdev:clean_mdev", "pytest_cpr.host.mdev:mdev_record_problem"),
}
_CLEANERS: dict[str, Cleaner] = {}  # loaded from CLEANERS, or registered (tests, extensions)
_CHECKS: dict[str, Check] = {}

# a record's fields become paths and sysfs writes as root: each is checked before it is used
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")  # one path component
PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
RUN_DIR = re.compile(r"^cpr-[A-Za-z0-9_-]+$")
KERNEL_TREES = {"sysfs": "/sys", "dev": "/dev"}


class StateDirError(CprError):
    """The state directory is not private to root: its records cannot be trusted."""


def private_dir_problem(path: Path) -> str | None:
    """Why a directory root acts on is not private to root (None: it is, or it does not exist yet): a
    symlink, not a directory, owned by another user, or writable by group or others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_state_dir(path: Path | None = None) -> None:
    """Refuse a state directory that is not private to root: whoever can write a record there gets
    root to act on it."""
    path = path or STATE_DIR
    if problem := private_dir_problem(path):
        raise StateDirError(f"state directory {path} (CPR_STATE_DIR) is {problem}: its records are acted on as "
                            f"root; make it a root-owned directory with mode 700 (or remove it) or point "
                            "CPR_STATE_DIR at one")


def fake_trees_allowed() -> bool:
    """Records in another state directory than /run/pytest-cpr (unit tests, CPR_STATE_DIR) may name
    fake sysfs and /dev trees."""
    return STATE_DIR != DEFAULT_STATE_DIR


def _plain(value: object) -> bool:
    return isinstance(value, str) and bool(PLAIN_NAME.match(value)) and value not in (".", "..")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _absolute(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and os.path.normpath(value) == value


def _field_problem(rec: dict[str, Any]) -> str | None:
    """Fields any kind may have, each checked by its name."""
    for key in ("kind", "key", "name"):
        if key in rec and not _plain(rec[key]):
            return f"{key} {rec[key]!r} is not a plain name"
    if "kind" not in rec or "key" not in rec:
        return "no kind or key"
    for key in ("owner", "pid"):
        if key in rec and not _count(rec[key]):
            return f"{key} {rec[key]!r} is not a process id"
    if "address" in rec and not (isinstance(rec["address"], str) and PCI_ADDRESS.match(rec["address"])):
        return f"address {rec['address']!r} is not a PCI address"
    for key in ("driver", "override"):
        if rec.get(key) is not None and not _plain(rec[key]):
            return f"{key} {rec[key]!r} is not a driver name"
    if "adopted" in rec and not (isinstance(rec["adopted"], list) and all(_plain(a) for a in rec["adopted"])):
        return f"adopted {rec['adopted']!r} is not a list of interface names"
    for key, real in KERNEL_TREES.items():
        if key in rec and not (rec[key] == real or (fake_trees_allowed() and _absolute(rec[key]))):
            return f"{key} {rec[key]!r} is not {real}"
    if "path" in rec and not _absolute(rec["path"]):
        return f"path {rec['path']!r} is not an absolute, normalized path"
    return None


def problem(rec: object) -> str | None:
    """Why a record must not be acted on (None: it may): a poisoned or corrupt record is never used."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not a JSON object"
    if reason := _field_problem(rec):
        return reason
    check = check_for(rec["kind"])
    return check(rec) if check else None


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _write(name: str, record: dict[str, Any]) -> None:
    check_state_dir()
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    record.update(owner=os.getpid(), owner_start=_proc_start_time(os.getpid()), t=time.time())
    tmp = STATE_DIR / f".{name}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(STATE_DIR / f"{name}.json")


class LockTimeout(CprError):
    """Another process holds a claim lock longer than the caller waits."""


class ClaimLock:
    """An exclusive flock on <state dir>/locks/<name>.lock, held while a resource is claimed. The kernel
    drops it when the holder dies, so a lock is never stale; the file names the holder's pid."""

    def __init__(self, name: str, directory: Path | None = None) -> None:
        """directory: where the lock file lives (default <state dir>/locks); the caller checks it is private."""
        if not _plain(name):
            raise ValueError(f"lock name {name!r} is not a plain name")
        self.in_state_dir = directory is None
        self.path = (directory or STATE_DIR / "locks") / f"{name}.lock"
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, timeout: float, poll: float = 0.05) -> ClaimLock:
        """Wait up to `timeout` seconds for the lock; LockTimeout names the holder's pid."""
        if self.in_state_dir:
            check_state_dir()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(f"held by pid {self.holder()} ({self.path}) for more than "
                                      f"{timeout:g}s") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


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


def register_cleaner(kind: str, cleaner: Cleaner, check: Check | None = None) -> None:
    """`cleaner` undoes what a record of `kind` names; `check` says why a record must not be acted on
    (both over the CLEANERS entry, if any)."""
    _CLEANERS[kind] = cleaner
    if check is not None:
        _CHECKS[kind] = check


def _load(target: str) -> Any:
    """The function `module:name`; None when its module cannot be imported here (e.g. pyroute2 missing:
    the record is kept for a later run)."""
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def cleaner_for(kind: str) -> Cleaner | None:
    """The cleaner of `kind`: registered, else loaded from CLEANERS; None if there is none here."""
    if kind not in _CLEANERS and kind in CLEANERS and (loaded := _load(CLEANERS[kind][0])) is not None:
        _CLEANERS[kind] = loaded
    return _CLEANERS.get(kind)


def check_for(kind: str) -> Check | None:
    """The record check of `kind`: registered, else loaded from CLEANERS; None if there is none here."""
    if kind not in _CHECKS and kind in CLEANERS and (loaded := _load(CLEANERS[kind][1])) is not None:
        _CHECKS[kind] = loaded
    return _CHECKS.get(kind)


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


def process_problem(rec: dict[str, Any]) -> str | None:
    if not _count(rec.get("pid")) or rec["key"] != str(rec["pid"]):
        return f"pid {rec.get('pid')!r} is no process id matching key {rec['key']!r}"
    return None


def rundir_problem(rec: dict[str, Any]) -> str | None:
    """A run directory is /tmp/cpr-* (or $TMPDIR/cpr-*, tests: anywhere), named by its key, no symlink."""
    path = Path(str(rec.get("path")))
    if "path" not in rec or path.name != rec["key"] or not RUN_DIR.match(path.name):
        return f"path {rec.get('path')!r} is not a cpr-* directory named by key {rec['key']!r}"
    if not fake_trees_allowed() and path.parent not in (Path("/tmp"), Path(tempfile.gettempdir())):
        return f"path {path} is not in /tmp"
    if path.is_symlink():
        return f"path {path} is a symlink"
    return None


def _scan(set_aside: bool, state_dir: Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The records that may be acted on, and one line per record refused; `set_aside`: rename those
    to *.json.rejected (never read again, kept for whoever looks into who wrote them)."""
    state_dir = state_dir or STATE_DIR
    check_state_dir(state_dir)
    if not state_dir.is_dir():
        return [], []
    out, refused = [], []
    for path in sorted(state_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if (why := problem(rec)) is None and path.name == f"{rec['kind']}-{rec['key']}.json":
            out.append(rec)
            continue
        why = why or f"file name {path.name} does not match its kind and key"
        line = f"could not clean {path.name}: refused a poisoned record ({why})"
        if set_aside:
            kept = path.with_name(f"{path.name}.rejected")
            path.replace(kept)
            line += f"; kept as {kept}"
        refused.append(line)
    return out, refused


def records(state_dir: Path | None = None) -> list[dict[str, Any]]:
    """The valid records (of `state_dir`, default: this process's STATE_DIR); a refused one is logged
    (and left where it is: cleaning sets it aside)."""
    out, refused = _scan(set_aside=False, state_dir=state_dir)
    for line in refused:
        log.warning("%s", line)
    return out


def clean_stale() -> list[str]:
    """Clean every record whose owning harness process is gone; returns what was done."""
    return _clean(is_stale)


def clean_own() -> list[str]:
    """Clean every record this process wrote, now (a second Ctrl-C: kill what is left)."""
    return _clean(lambda rec: int(rec.get("owner", 0)) == os.getpid())


def _clean(select: Callable[[dict[str, Any]], bool]) -> list[str]:
    valid, done = _scan(set_aside=True)
    # processes first: they hold taps and device fds
    for rec in sorted(valid, key=lambda r: r.get("kind") != "proc"):
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


def processes_naming(path: Path) -> list[ProcInfo]:
    """Live processes (zombies left out) whose command line names `path` or something under it (a run's
    private directory: every QEMU of a run has its sockets and console log there)."""
    marker = str(path).encode()
    return [p for p in processes() if marker in p.cmdline and p.state != "Z"]
