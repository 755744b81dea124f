"""Make a host clean after pytest-cpr runs that died: `python -m pytest_cpr.cleanup`.

The runner job hooks (ci/runner/hooks) call it before and after every CI job. In this order it
1. kills QEMU processes that pytest-cpr started and whose harness is gone (found by their command
   line, so also those whose record in the state directory is missing);
2. runs leftovers.clean_stale(): every record whose owning harness is gone is cleaned by the cleaner
   its module registered (processes, network namespaces, VFIO device bindings, mdev instances);
3. deletes network namespaces named cprt-* whose harness is gone and that no process is inside.
A harness that is still running is never touched: several pytest-cpr runs may share one host.

Exit status: 0 when the host is clean (whether or not something had to be cleaned), 1 when
something could not be cleaned (the next run would trip over it), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pytest_cpr import leftovers

try:  # deletes orphaned namespaces (the cleaners of records come from leftovers.CLEANERS)
    from pytest_cpr.host import netns as _netns
except ImportError:  # pragma: no cover - pyroute2 is a dependency; keep the CLI usable without it
    _netns = None  # type: ignore[assignment]

PROC = Path("/proc")
NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "cprt-"
# pytest-cpr runs every QEMU with its QMP socket in a private run directory /tmp/cpr-XXXXXXXX
# (vm.CprVM); tests/unit/test_cleanup.py checks this against the real command line (VmSpec.argv).
# a guest's QMP socket (/tmp/cpr-<id>/qmp-g0.sock) or the virtual host's L1 (/tmp/cpr-vhost-<id>/qmp.sock)
HARNESS_QMP = re.compile(r"(?:^|,)path=/tmp/cpr-[A-Za-z0-9_-]+/qmp(?:-[A-Za-z0-9_.-]+)?\.sock(?:,|$)")
HARNESS_NETNS = re.compile(r"^cprt-(\d+)-[A-Za-z0-9_]+$")
FAILED_PREFIX = "could not clean"


@dataclass
class Outcome:
    """What one cleanup pass did; `failed` are things it could not clean."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        (self.failed if line.startswith(FAILED_PREFIX) else self.done).append(line)


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    argv: tuple[str, ...]


def read_proc(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """The parent, name and command line of a process; None if it is gone (or a kernel thread)."""
    base = proc / str(pid)
    try:
        stat = (base / "stat").read_text()
        raw = (base / "cmdline").read_bytes()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1: stat.rindex(")")]
    ppid = int(stat[stat.rindex(")") + 1:].split()[1])
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return ProcInfo(pid, ppid, comm, argv) if argv else None


def _pids(directory: Path) -> list[int]:
    try:
        return sorted(int(e.name) for e in os.scandir(directory) if e.name.isdigit())
    except OSError:
        return []


def processes(proc: Path = PROC) -> Iterator[ProcInfo]:
    for pid in _pids(proc):
        if (info := read_proc(pid, proc)) is not None:
            yield info


def is_harness(info: ProcInfo | None) -> bool:
    """pytest-cpr runs inside a Python interpreter (`python -m pytest`, the `pytest` script)."""
    if info is None:
        return False
    names = {info.comm, Path(info.argv[0]).name}
    return any(re.match(r"^(python[\d.]*|pytest)$", n) for n in names)


def is_harness_qemu(info: ProcInfo) -> bool:
    return Path(info.argv[0]).name.startswith("qemu-system") and any(HARNESS_QMP.search(a) for a in info.argv)


def orphaned_qemus(proc: Path = PROC) -> list[ProcInfo]:
    """QEMU processes started by pytest-cpr whose parent is no longer a pytest-cpr harness."""
    return [p for p in processes(proc)
            if is_harness_qemu(p) and not (p.ppid > 1 and is_harness(read_proc(p.ppid, proc)))]


def kill(pid: int, timeout: float = 5.0, proc: Path = PROC) -> bool:
    """SIGKILL and wait until the process is gone (QEMU holds taps, RAM and device fds until then)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read_proc(pid, proc) is None or _is_zombie(pid, proc):
            return True
        time.sleep(0.02)
    return False


def _is_zombie(pid: int, proc: Path) -> bool:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 1:].split()[0] == "Z"


def kill_orphaned_qemus(outcome: Outcome, dry_run: bool, proc: Path = PROC) -> None:
    for p in orphaned_qemus(proc):
        name = next((b.split(",")[0] for a, b in zip(p.argv, p.argv[1:], strict=False) if a == "-name"), "")
        what = f"orphaned QEMU process {p.pid} ({Path(p.argv[0]).name} -name {name or '?'}; parent {p.ppid})"
        if dry_run:
            outcome.add(f"would kill {what}")
        elif kill(p.pid, proc=proc):
            outcome.add(f"killed {what}")
        else:
            outcome.add(f"{FAILED_PREFIX} {what}: still alive 5 s after SIGKILL (stuck in the kernel?)")


def _netns_inodes_in_use(proc: Path) -> set[int]:
    """Inodes of every network namespace a process (or one of its threads) is in."""
    inodes = set()
    for pid in _pids(proc):
        for tid in _pids(proc / str(pid) / "task"):
            try:
                target = os.readlink(proc / str(pid) / "task" / str(tid) / "ns" / "net")
            except OSError:
                continue
            if m := re.match(r"net:\[(\d+)\]", target):
                inodes.add(int(m.group(1)))
    return inodes


def _recorded_owner_alive(name: str) -> bool:
    return any(r.get("kind") == "netns" and r.get("key") == name and not leftovers.is_stale(r)
               for r in leftovers.records())


def stale_namespaces(netns_dir: Path | None = None, proc: Path = PROC) -> list[str]:
    """cprt-* namespaces whose harness (the pid in the name) is gone and that no process is in (in
    NETNS_DIR unless told: read at call time, so a test's private folder holds)."""
    netns_dir = NETNS_DIR if netns_dir is None else netns_dir
    if not netns_dir.is_dir():
        return []
    in_use = _netns_inodes_in_use(proc)
    stale = []
    for path in sorted(netns_dir.glob(NETNS_PREFIX + "*")):
        m = HARNESS_NETNS.match(path.name)
        if m and is_harness(read_proc(int(m.group(1)), proc)):
            continue
        try:
            if path.stat().st_ino in in_use:
                continue
        except OSError:
            continue
        if not _recorded_owner_alive(path.name):
            stale.append(path.name)
    return stale


def delete_stale_namespaces(outcome: Outcome, dry_run: bool) -> None:
    for name in stale_namespaces():
        if dry_run:
            outcome.add(f"would delete network namespace {name}")
            continue
        try:
            if _netns is None:
                raise OSError("pyroute2 is not installed")
            _netns.remove_netns(name)
            leftovers.forget("netns", name)
            outcome.add(f"deleted stale network namespace {name}")
        except OSError as exc:
            outcome.add(f"{FAILED_PREFIX} network namespace {name}: {exc}")


def stale_records() -> list[str]:
    return [f"would clean {r.get('kind')} {r.get('key')} (owner {r.get('owner')} gone)"
            for r in leftovers.records() if leftovers.is_stale(r)]


def clean(dry_run: bool = False) -> Outcome:
    """One full pass; see the module docstring."""
    outcome = Outcome()
    kill_orphaned_qemus(outcome, dry_run)
    try:
        for line in stale_records() if dry_run else leftovers.clean_stale():
            outcome.add(line)
    except PermissionError as exc:
        outcome.add(f"{FAILED_PREFIX} the records in {leftovers.STATE_DIR}: {exc} (run as root)")
    except leftovers.StateDirError as exc:
        outcome.add(f"{FAILED_PREFIX} the records: {exc}")
        return outcome  # namespaces are matched against those records: leave them too
    delete_stale_namespaces(outcome, dry_run)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_cpr.cleanup", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would be cleaned, change nothing")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.add_argument("--label", default="pytest-cpr cleanup", help="prefix of each printed line")
    args = parser.parse_args(argv)
    outcome = clean(dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"done": outcome.done, "failed": outcome.failed}))
    else:
        for line in outcome.done + outcome.failed:
            print(f"{args.label}: {line}")
        if not outcome.done and not outcome.failed:
            print(f"{args.label}: nothing to clean")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
