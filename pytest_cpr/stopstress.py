"""Stop a pytest run at every point of a transfer, again and again, and count what each stop leaves.

    python -m pytest_cpr.stopstress --stops 50          # every stop point, SIGTERM and SIGINT in turn
    python -m pytest_cpr.stopstress --stops 10 --at spawn --signal SIGTERM --log stops.jsonl

Each stop is one fresh pytest run, in its own session, of a small transfer test with its own state
directory (CPR_STATE_DIR), artifacts and work directory: it never sees nor ends another run's QEMUs.
The guest is launched but need not boot (TCG, 128 MiB, no SSH): only the QEMU processes and what the
harness made for them matter here. The test transfers the guest in a loop (cpr-transfer) with a
StopAt observer, which sends the signal at the chosen point of transfer 2 (source g1, target g2),
triggered by the transfer's own events rather than by a clock:

  spawn      while the target QEMU is forked and recorded (sent when its process appears)
  spawned    the target started, not yet listening (on_spawned)
  listening  the target listens on its cpr channel (on_before_migrate)
  migrate    the source accepted `migrate` (on_after_migrate)
  retire     the old QEMU in postmigrate, before it is told to quit (on_before_retire)
  quitting   the old QEMU took `quit`; the harness waits for it to exit
  random     a random offset (seeded) after transfer 1, up to the length of transfer 1
  teardown   the test passed after 2 transfers; its teardown waits for the guest's QEMU to quit

SIGTERM goes to pytest alone (a CI job's timeout, `kill`), SIGINT to its process group (Ctrl-C at a
terminal). Once pytest exited, the run's leftovers are counted: its QEMU processes, its network
namespaces (with their taps and mounts), its run and key directories and the records in its state
directory; whatever is found is then removed. One JSON line per stop goes to --log; the last line
printed is the summary. Exit status 1 when a stop left something behind or did not land where
planned, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_cpr import leftovers
from pytest_cpr.errors import CprError, CprSettingError
from pytest_cpr.host import netns
from pytest_cpr.observers import Observer

if TYPE_CHECKING:
    from pytest_cpr.cpr import TransferResult
    from pytest_cpr.qemu.process import QemuProcess
    from pytest_cpr.vm import CprVM

POINTS = ("spawn", "spawned", "listening", "migrate", "retire", "quitting", "random", "teardown")
SIGNALS = ("SIGTERM", "SIGINT")
ENV = "CPR_STOPSTRESS"  # the inner run's Stop, as JSON
WATCH_S = 60.0  # a watcher armed for a point gives up after this long (the stop then never lands)
RUN_TIMEOUT_S = 180.0  # one inner pytest run, from its start to its exit after the stop
NOT_OURS = "not ours:"  # a KeyboardInterrupt the stop did not send
TEARDOWN = "teardown"

INNER_TEST = '''\
from pytest_cpr import stopstress


def test_transfers_until_stopped(cpr_vm_factory, cpr_session_key):
    # the session key's private directory: /tmp/cpr-key-*/ssh/id_ed25519
    stopstress.transfers_until_stopped(cpr_vm_factory(), cpr_session_key.path.parents[1])
'''


@dataclass(frozen=True)
class Stop:
    """Where one run is stopped: `point` of transfer `transfer`, with `signal`."""

    point: str
    signal: str
    marks: str  # the directory the inner run writes what happened to
    transfer: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise CprSettingError(f"stop point {self.point!r}: use one of {', '.join(POINTS)}")
        if self.signal not in SIGNALS:
            raise CprSettingError(f"signal {self.signal!r}: use one of {', '.join(SIGNALS)}")
        if self.transfer < 2:
            raise CprSettingError(f"transfer {self.transfer}: stops land in transfer 2 or later (transfer 1 "
                                  "sets the pace of the random offsets)")

    @classmethod
    def from_env(cls) -> Stop:
        try:
            return cls(**json.loads(os.environ[ENV]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CprSettingError(f"{ENV}: no stop given to the inner run ({exc}); run it through "
                                  "`python -m pytest_cpr.stopstress`") from None


class StopAt(Observer):
    """Sends the stop's signal to this process at its point of its transfer (see the module docstring).
    The points between two events (spawn, quitting, random, teardown) are reached by a watcher thread
    armed at the event before them; the signal then reaches the main thread wherever it is."""

    def __init__(self, stop: Stop) -> None:
        self.stop = stop
        self.marks = Path(stop.marks)
        self.results = 0  # transfers finished (on_result)
        self.t_last = time.monotonic()
        self.fired = threading.Event()

    @property
    def _in_transfer(self) -> bool:
        return self.results + 1 == self.stop.transfer

    def on_spawned(self, target: QemuProcess) -> None:
        self._at("spawned")

    def on_before_migrate(self, target: QemuProcess) -> None:
        self._at("listening")

    def on_after_migrate(self, target: QemuProcess) -> None:
        self._at("migrate")

    def on_before_retire(self, source: QemuProcess) -> None:
        self._at("retire")
        if self._in_transfer and self.stop.point == "quitting":
            self._watch(lambda: source.quit_sent)

    def on_result(self, result: TransferResult) -> None:
        self.results += 1
        now = time.monotonic()
        period, self.t_last = now - self.t_last, now
        if not self._in_transfer:
            return
        if self.stop.point == "spawn":  # the next child of this thread is the target QEMU
            before = children_of_main_thread()
            self._watch(lambda: bool(children_of_main_thread() - before))
        elif self.stop.point == "random":
            delay = random.Random(self.stop.seed).uniform(0, period)  # noqa: S311 - a test offset, no secret
            self.note("offset", f"{delay:.4f}")
            timer = threading.Timer(delay, self._send)
            timer.daemon = True
            timer.start()

    def arm_teardown(self, vm: CprVM) -> None:
        """The test passed: the stop comes once its teardown told the QEMU running the guest to quit."""
        self._watch(lambda: vm.current.quit_sent, landed=f"{TEARDOWN}: while the QEMU running the guest quits")

    def _at(self, point: str) -> None:
        if self._in_transfer and self.stop.point == point:
            self._send()

    def _watch(self, reached: Callable[[], bool], landed: str = "") -> None:
        """Send the signal from a thread once `reached()` (polled without pause: the spawn window is
        a millisecond); give up after WATCH_S. `landed`: where the stop lands, noted for a stop the
        test body cannot see (teardown)."""
        def run() -> None:
            deadline = time.monotonic() + WATCH_S
            while not reached():
                if time.monotonic() > deadline:
                    self.note("missed", f"{self.stop.point} not reached within {WATCH_S:.0f}s")
                    return
            self._send()
            if landed:
                self.note("landed", landed)

        threading.Thread(target=run, name=f"stop-at-{self.stop.point}", daemon=True).start()

    def _send(self) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        if self.stop.signal == "SIGINT":  # Ctrl-C at a terminal: the foreground process group
            os.killpg(os.getpgrp(), signal.SIGINT)
        else:  # a job's timeout, `kill`: pytest alone
            os.kill(os.getpid(), signal.SIGTERM)

    def note(self, name: str, text: str) -> None:
        (self.marks / name).write_text(text)


def children_of_main_thread() -> set[str]:
    """The children of this process's main thread (new ones appear at the fork, before the exec)."""
    return set(Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())


def transfers_until_stopped(vm: CprVM, key_dir: Path) -> None:
    """The inner run's test: launch the guest, transfer it until the stop comes (it raises
    KeyboardInterrupt where it lands; that place is noted), else fail: the stop never came."""
    stop = Stop.from_env()
    at = StopAt(stop)
    at.note("dirs", json.dumps([str(vm.rundir), str(key_dir)]))
    vm.launch()
    at.t_last = time.monotonic()
    if stop.point == TEARDOWN:
        for _ in range(stop.transfer):
            vm.transfer()
        at.arm_teardown(vm)
        return
    try:
        with vm.observing(at):
            for _ in range(stop.transfer + 2):
                vm.transfer()
    except KeyboardInterrupt as exc:
        at.note("landed", landing_site(exc) if at.fired.is_set() else f"{NOT_OURS} {landing_site(exc)}")
        raise
    raise CprError(f"the stop at {stop.point} of transfer {stop.transfer} never came "
                   f"({stop.transfer + 2} transfers made)")


def landing_site(exc: BaseException) -> str:
    """Where a KeyboardInterrupt was raised: the innermost frame outside the signal handler and the stop
    machinery (this module, the observers), and the innermost frame of pytest-cpr around it
    ("file:line function < file:line function")."""
    machinery = ("/pytest_cpr/stopstress.py", "/pytest_cpr/observers.py")
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.name != "on_sigint" and not f.filename.endswith(machinery)]
    if not frames:
        return "unknown"
    ours = [f for f in frames if "/pytest_cpr/" in f.filename]
    sites = [frames[-1]] + ([ours[-1]] if ours and ours[-1] is not frames[-1] else [])
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in sites)


# ---- the outer side: one run per stop, its leftovers counted


@dataclass
class StopRun:
    """One stop: what was planned, how pytest ended, where the stop landed, what was left behind."""

    index: int
    point: str
    signal: str
    seconds: float = 0.0
    exit_code: int | None = None
    landed: str = ""
    left: list[str] = field(default_factory=list)
    problem: str = ""  # the stop did not happen as planned (no leftover, but no evidence either)

    def line(self) -> str:
        what = f"left {len(self.left)}: {'; '.join(self.left)}" if self.left else "nothing left"
        return (f"stop {self.index:3d} {self.signal:7s} at {self.point:9s} {self.seconds:6.1f}s exit "
                f"{self.exit_code}  landed {self.landed or '?'}  {what}"
                + (f"  PROBLEM: {self.problem}" if self.problem else ""))


def plan(count: int, points: Iterable[str] = POINTS, signals: Iterable[str] = SIGNALS) -> list[tuple[str, str]]:
    """`count` (point, signal) pairs: every point with each signal in turn, round after round."""
    pairs = [(p, s) for s in signals for p in points]
    if not pairs:
        raise CprSettingError("no stop point or no signal chosen: give --at and --signal values")
    return [pairs[i % len(pairs)] for i in range(count)]


def _inner_env(run: Path, stop: Stop) -> dict[str, str]:
    """The environment of the inner run: this one's QEMU and image choices, its own state, artifacts and
    settings for a guest that need not boot."""
    keep = ("CPR_QEMU", "CPR_TARGET_QEMU", "CPR_CACHE_DIR", "CPR_IMAGE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPR_", "PYTEST_")) or k in keep}
    env |= {"CPR_STATE_DIR": str(run / "state"), "CPR_ARTIFACTS": str(run / "artifacts"),
            "CPR_ACCEL": "tcg", "CPR_MEMORY": "128M", ENV: json.dumps(dataclasses.asdict(stop))}
    return env


def run_stop(work: Path, index: int, point: str, sig: str, seed: int, timeout: float = RUN_TIMEOUT_S) -> StopRun:
    """Run the inner test once, stopped at `point` with `sig`; count and then remove its leftovers."""
    run = work / f"stop-{index:03d}"
    marks = run / "marks"
    marks.mkdir(parents=True)
    (run / "test_stop.py").write_text(INNER_TEST)
    stop = Stop(point, sig, str(marks), seed=seed)
    outcome = StopRun(index, point, sig)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                             "test_stop.py"], cwd=run, env=_inner_env(run, stop), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=as_from_a_terminal)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        outcome.problem = f"pytest did not end within {timeout:.0f}s (killed)"
    finally:  # also when this tool is stopped: the run is killed, and what it left still removed
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        dirs = [Path(d) for d in json.loads(_read(marks / "dirs") or "[]")]
        outcome.left = leftovers_of(run, proc.pid, dirs)
        if outcome.left:
            remove_leftovers(run, proc.pid, dirs)
    outcome.seconds = time.monotonic() - t0
    outcome.exit_code = proc.returncode
    (run / "pytest.log").write_text(out)
    outcome.landed = _read(marks / "landed")
    if not outcome.problem:
        outcome.problem = _stop_problem(proc.returncode, out, marks)
    return outcome


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _stop_problem(code: int, out: str, marks: Path) -> str:
    """Why this run is no evidence of a stop at its point ('' when it is)."""
    if missed := _read(marks / "missed"):
        return f"missed: {missed}"
    landed = _read(marks / "landed")
    if not landed or landed.startswith(NOT_OURS):
        return f"the stop did not land in the transfers ({landed or 'no KeyboardInterrupt'}; exit {code})"
    if code != 2 or "KeyboardInterrupt" not in out:
        return f"pytest ended with exit {code}, not as interrupted (2); see pytest.log"
    if landed.startswith(TEARDOWN) and "1 passed" not in out:
        return "the test did not pass before its teardown was stopped; see pytest.log"
    return ""


def leftovers_of(run: Path, harness: int, dirs: list[Path]) -> list[str]:
    """What the run in `run` (pytest pid `harness`, private directories `dirs`) left behind: QEMU
    processes naming its directories, its network namespaces (their taps, their mounts), the
    directories themselves, and anything in its state directory (records, half-written records)."""
    left = [f"QEMU pid {pid} ({generation})" for pid, generation in _qemu_pids(run, dirs).items()]
    for name in netns.namespaces_of(harness):
        left.append(f"netns {name} (taps: {', '.join(_taps_in(name)) or 'none'})")
    left += [f"mount {m}" for m in _netns_mounts(harness)]
    left += [f"directory {d}" for d in dirs if d.exists()]
    state = run / "state"
    if state.is_dir():
        left += [f"record {r['kind']} {r['key']}" for r in leftovers.records(state)]
        left += [f"state file {p.name}" for p in sorted(state.iterdir())
                 if p.is_file() and not p.name.endswith(".json")]
    return sorted(set(left))


def _qemu_pids(run: Path, dirs: list[Path]) -> dict[int, str]:
    """The live QEMU processes naming the run's directories, each with its generation (g0, g1, ...)."""
    found = {}
    for path in {run, *dirs}:
        for p in leftovers.processes_naming(path):
            if b"qemu-system" in p.cmdline:
                label = re.search(rb"qmp-([\w-]+)\.sock", p.cmdline)
                found[p.pid] = f"generation {label.group(1).decode() if label else 'unknown'}"
    return found


def _taps_in(name: str) -> list[str]:
    out = subprocess.run(["ip", "-n", name, "-o", "link", "show", "type", "tun"], capture_output=True,
                         text=True, timeout=30).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _netns_mounts(harness: int) -> list[str]:
    """Mount points of namespaces of `harness` (a namespace is a bind mount on /run/netns/<name>)."""
    prefix = f"/{netns.PREFIX}-{harness}-"
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        points = [line.split()[4] for line in fh]
    return sorted(p for p in points if "/netns/" in p and prefix in p)


def remove_leftovers(run: Path, harness: int, dirs: list[Path]) -> None:
    """Remove what leftovers_of() found (only this run's: its QEMUs are found by its own paths)."""
    for pid in _qemu_pids(run, dirs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in netns.namespaces_of(harness):
        netns.remove_netns(name)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(run / "state", ignore_errors=True)


def summary(runs: list[StopRun]) -> str:
    """One line: stops run, stops that left something (and how much), stops that did not land, time."""
    leaky = [r for r in runs if r.left]
    failed = [r for r in runs if r.problem]
    per_stop = sum(r.seconds for r in runs) / len(runs) if runs else 0.0
    kinds = Counter(item.split(" ")[0] for r in runs for item in r.left)
    return (f"stopstress: {len(runs)} stops, {len(leaky)} left something behind "
            f"({sum(len(r.left) for r in runs)} leftovers{': ' if kinds else ''}"
            f"{', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {len(failed)} did not stop as "
            f"planned; {per_stop:.1f}s per stop")


def stress(count: int, points: Iterable[str], signals: Iterable[str], work: Path, seed: int = 0,
           log: Path | None = None, echo: Callable[[str], Any] = print) -> list[StopRun]:
    """Run `count` stops (see plan()) in `work`; echo one line per stop and append it to `log` as JSON."""
    rng = random.Random(seed)  # noqa: S311 - seeds of test offsets, no secret
    runs = []
    for index, (point, sig) in enumerate(plan(count, points, signals), 1):
        run = run_stop(work, index, point, sig, rng.randrange(1 << 30))
        runs.append(run)
        echo(run.line())
        if log is not None:
            with log.open("a") as fh:
                fh.write(json.dumps(dataclasses.asdict(run)) + "\n")
    return runs


def as_from_a_terminal() -> None:
    """In a child before exec: Ctrl-C acts as at a terminal. A run started in the background
    (`cmd &` in a script) inherits SIGINT ignored, so a SIGINT stop would never land (seen: the
    interrupt tests of a CI run started that way found the Ctrl-C ignored and the transfers going on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if bad := [n for n in names if n not in allowed]:
        raise CprSettingError(f"{what} {', '.join(bad)}: use any of {','.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_cpr.stopstress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stops", type=int, default=len(POINTS) * len(SIGNALS), help="how many stops")
    parser.add_argument("--at", default=",".join(POINTS), help="stop points, comma-separated")
    parser.add_argument("--signal", default=",".join(SIGNALS), help="signals, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random offsets")
    parser.add_argument("--work", type=Path, help="work directory (default: a new one in $TMPDIR); "
                        "kept: each stop's pytest.log and artifacts")
    parser.add_argument("--log", type=Path, help="append one JSON line per stop here")
    args = parser.parse_args(argv)

    def command() -> int:
        points = _names(args.at, POINTS, "--at: unknown stop point")
        signals = _names(args.signal, SIGNALS, "--signal: unknown signal")
        if args.stops < 1:
            raise CprSettingError(f"--stops {args.stops}: give a whole number >= 1")
        # Ctrl-C reaches this tool and its runs also when started in the background: a shell starts
        # `cmd &` with SIGINT ignored, which the runs would inherit (a SIGINT stop would never land)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        work = args.work or Path(tempfile.mkdtemp(prefix="stopstress-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"stopstress: work directory {work}", flush=True)
        runs = stress(args.stops, points, signals, work, args.seed, args.log,
                      echo=lambda line: print(line, flush=True))
        print(summary(runs))
        return 1 if any(r.left or r.problem for r in runs) else 0

    from pytest_cpr.vhost import run_as_cli
    return run_as_cli("stopstress", command, "the running stop's pytest was killed")


if __name__ == "__main__":
    sys.exit(main())
