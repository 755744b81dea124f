"""The leftovers registry (what a run started, cleaned when its owner is gone) and the security rules
that keep a run private: UNIX sockets only, private 0700 run and key directories, no shell strings.

Processes here are real (`sleep`), the registry lives in tmp_path; no QEMU, no namespace."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_cpr import leftovers
from pytest_cpr.images import GuestImage
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.spec import Incoming, Nic, VmSpec

PACKAGE = Path(leftovers.__file__).resolve().parent


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setattr(leftovers, "STATE_DIR", path)
    return path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def orphan(state_dir: Path, name: str, record: dict[str, object]) -> Path:
    """A record as a killed harness left it: its owner pid no longer runs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(json.dumps({"owner": dead_pid(), "owner_start": "1", "t": 0, **record}))
    return path


def test_record_and_forget_process(state_dir: Path, sleeper: subprocess.Popen[bytes]) -> None:
    leftovers.record_process(sleeper.pid, ["/usr/bin/qemu-system-x86_64", "-S"])
    (rec,) = leftovers.records()
    assert rec["kind"] == "proc" and rec["pid"] == sleeper.pid and rec["owner"] == os.getpid()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    leftovers.forget_process(sleeper.pid)
    assert leftovers.records() == []


def test_clean_stale_leaves_a_live_owner_alone(sleeper: subprocess.Popen[bytes]) -> None:
    leftovers.record_process(sleeper.pid, ["qemu"])
    assert leftovers.clean_stale() == []
    assert sleeper.poll() is None and len(leftovers.records()) == 1


def test_clean_stale_kills_the_process_of_a_dead_owner(state_dir: Path,
                                                        sleeper: subprocess.Popen[bytes]) -> None:
    start = leftovers._proc_start_time(sleeper.pid)
    orphan(state_dir, f"proc-{sleeper.pid}", {"kind": "proc", "key": str(sleeper.pid), "pid": sleeper.pid,
                                               "start": start, "argv0": "qemu-system-x86_64"})
    done = leftovers.clean_stale()
    assert done == [f"killed stale QEMU process {sleeper.pid} (qemu-system-x86_64)"]
    assert sleeper.wait(10) == -9
    assert leftovers.records() == []


def test_a_reused_pid_is_not_killed(state_dir: Path, sleeper: subprocess.Popen[bytes]) -> None:
    orphan(state_dir, f"proc-{sleeper.pid}", {"kind": "proc", "key": str(sleeper.pid), "pid": sleeper.pid,
                                               "start": "0", "argv0": "qemu"})
    assert leftovers.clean_stale() == [f"process {sleeper.pid} already gone"]
    assert sleeper.poll() is None


def test_clean_own_cleans_only_this_process_records(state_dir: Path,
                                                    sleeper: subprocess.Popen[bytes]) -> None:
    other = subprocess.Popen(["sleep", "120"])
    try:
        leftovers.record_process(sleeper.pid, ["qemu"])
        start = leftovers._proc_start_time(other.pid)
        orphan(state_dir, f"proc-{other.pid}", {"kind": "proc", "key": str(other.pid), "pid": other.pid,
                                                 "start": start, "argv0": "q"})
        assert leftovers.clean_own() == [f"killed stale QEMU process {sleeper.pid} (qemu)"]
        assert sleeper.wait(10) == -9 and other.poll() is None
        assert [r["pid"] for r in leftovers.records()] == [other.pid]
    finally:
        other.kill()
        other.wait(10)


def test_kinds_use_their_registered_cleaner_and_failures_are_reported(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leftovers, "_CLEANERS", dict(leftovers._CLEANERS))
    leftovers.register_cleaner("thing", lambda rec: f"cleaned thing {rec['key']}")
    leftovers.register_cleaner("stuck", lambda rec: (_ for _ in ()).throw(OSError("busy")))
    orphan(state_dir, "thing-a", {"kind": "thing", "key": "a"})
    orphan(state_dir, "stuck-b", {"kind": "stuck", "key": "b"})
    orphan(state_dir, "unknown-c", {"kind": "unknown", "key": "c"})
    done = leftovers.clean_stale()
    assert sorted(done) == ["cleaned thing a", "could not clean stuck b: busy"]
    assert sorted(r["key"] for r in leftovers.records()) == ["b", "c"]  # kept for the next run


def test_processes_are_cleaned_before_what_they_hold(state_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     sleeper: subprocess.Popen[bytes]) -> None:
    order: list[str] = []
    monkeypatch.setattr(leftovers, "_CLEANERS", dict(leftovers._CLEANERS))
    leftovers.register_cleaner("netns", lambda rec: order.append("netns") or "ns")  # type: ignore[func-returns-value]
    orphan(state_dir, "netns-cprt-1-a", {"kind": "netns", "key": "cprt-1-a", "name": "cprt-1-a"})
    start = leftovers._proc_start_time(sleeper.pid)
    orphan(state_dir, f"proc-{sleeper.pid}", {"kind": "proc", "key": str(sleeper.pid), "pid": sleeper.pid,
                                               "start": start, "argv0": "q"})
    leftovers.register_cleaner("proc", lambda rec: order.append("proc") or "p")  # type: ignore[func-returns-value]
    leftovers.clean_stale()
    assert order == ["proc", "netns"]


def test_a_corrupt_record_is_dropped(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / "proc-1.json").write_text("{not json")
    assert leftovers.records() == []
    assert not (state_dir / "proc-1.json").exists()


# ---- security: UNIX sockets only, private directories, no shell strings


def _vm_config(tmp_path: Path) -> object:
    from pytest_cpr.vm import VmConfig

    image = GuestImage(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "rootfs.img", {})
    build = QemuBuild("/usr/bin/qemu-system-x86_64", (10, 0, 2), "", frozenset({"cpr-transfer"}),
                      frozenset(), frozenset())
    return VmConfig(name="sec", image=image, source=build, target=build, accel="tcg",
                    artifacts=tmp_path / "artifacts")


def test_run_dir_and_key_are_private(tmp_path: Path) -> None:
    from pytest_cpr.vm import CprVM

    vm = CprVM(_vm_config(tmp_path))  # type: ignore[arg-type]
    try:
        assert stat.S_IMODE(vm.rundir.stat().st_mode) == 0o700, "sockets live in the run dir"
        assert stat.S_IMODE(vm.key.path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(vm.key.path.stat().st_mode) == 0o600
        assert vm.key.path.is_relative_to(vm.rundir), "the session key is ephemeral, in the run dir"
        assert [r["kind"] for r in leftovers.records()] == ["rundir"], "a killed run's dir is found later"
    finally:
        vm.close()
    assert not vm.rundir.exists() and leftovers.records() == []



def test_using_a_guest_before_boot_names_the_fix(tmp_path: Path) -> None:
    from pytest_cpr.errors import CprError
    from pytest_cpr.vm import CprVM

    vm = CprVM(_vm_config(tmp_path))  # type: ignore[arg-type]
    try:
        with pytest.raises(CprError, match=r"guest sec is created, not running: boot\(\) it first"):
            vm.run("true")
    finally:
        vm.close()
    assert not vm.rundir.exists()


def test_a_dead_runs_private_dir_is_removed(state_dir: Path, tmp_path: Path) -> None:
    import pytest_cpr.vm  # noqa: F401 - registers the "rundir" cleaner

    private = tmp_path / "cpr-abc"
    (private / "ssh").mkdir(parents=True)
    (private / "ssh" / "id_ed25519").write_text("key")
    orphan(state_dir, "rundir-cpr-abc", {"kind": "rundir", "key": "cpr-abc", "path": str(private)})
    other = tmp_path / "precious"
    other.mkdir()
    orphan(state_dir, "rundir-precious", {"kind": "rundir", "key": "precious", "path": str(other)})
    done = leftovers.clean_stale()
    assert f"removed stale run directory {private} (sockets, session key)" in done
    assert not private.exists() and other.exists(), "only pytest-cpr's own cpr-* directories are removed"


def _listeners(argv: list[str]) -> list[str]:
    """Every value of an option that can open a listening or connecting channel."""
    options = {"-chardev", "-incoming", "-qmp", "-monitor", "-serial", "-mon", "-netdev", "-vnc", "-spice",
               "-gdb", "-device", "-object"}
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in options]


def test_qemu_channels_are_unix_sockets_only(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    spec = VmSpec(name="sec", accel="tcg", memory_mib=512, cpus=1, kernel=Path("/k"), initrd=Path("/i"),
                  rootfs=Path("/r"), nics=(Nic("n0", "52:54:00:00:00:02", 7, "10.77.0.2/24"),))
    incoming = Incoming(rundir / "mig.sock", rundir / "cpr.sock")
    argv = spec.argv("qemu", rundir / "c.sock", tmp_path / "c.log", rundir / "q.sock", incoming)
    assert not {"-vnc", "-spice", "-gdb", "-monitor"} & set(argv), argv
    qmp = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-qmp"]
    assert qmp == ["chardev:qmp0"], f"QMP only on the unix-socket chardev: {qmp}"
    for value in _listeners(argv):
        low = value.lower()
        assert not any(t in low for t in ("tcp", "host=", "port=", "telnet", "websocket", "udp", '"inet"',
                                          "vsock")), f"network listener in {value!r}"
        if value.startswith("socket,"):
            assert f"path={rundir}/" in value, f"socket chardev outside the private run dir: {value!r}"
    channels = [argv[i + 1] for i, a in enumerate(argv) if a == "-incoming"]
    assert channels[0] == f"unix:{rundir}/mig.sock"
    assert json.loads(channels[1])["addr"] == {"transport": "socket", "type": "unix",
                                               "path": f"{rundir}/cpr.sock"}
    for channel in incoming.channels():  # what `migrate` sends to the source
        assert channel["addr"] == {"transport": "socket", "type": "unix",
                                   "path": str(rundir / ("mig.sock" if channel["channel-type"] == "main"
                                                         else "cpr.sock"))}


def _calls_with_shell(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("system", "popen") and isinstance(node.func.value, ast.Name) and \
                node.func.value.id == "os":
            lines.append(node.lineno)
    return lines


def test_no_shell_strings_in_the_plugin() -> None:
    found = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := _calls_with_shell(p.read_text()))}
    assert found == {}, f"shell=True / os.system / os.popen in {found}: pass an argv list instead"


def test_the_shell_check_catches_shell_true() -> None:
    assert _calls_with_shell("import subprocess\nsubprocess.run(f'ls {x}', shell=True)\n") == [2]
    assert _calls_with_shell("import os\nos.system('ls')\n") == [2]
    assert _calls_with_shell("import subprocess\nsubprocess.run(['ls'])\n") == []


# ---- records trust nothing: poisoned records, the state directory, bounded sysfs writes
@pytest.mark.parametrize(("name", "record", "why"), [
    ("mdev-x", {"kind": "mdev", "key": "../../bus/pci/devices/0000:00:1f.2"},
     "key '../../bus/pci/devices/0000:00:1f.2' is not a plain name"),
    ("mdev-..", {"kind": "mdev", "key": ".."}, "key '..' is not a plain name"),
    ("mdev-abc", {"kind": "mdev", "key": "abc"}, "key 'abc' is not a UUID"),
    ("vfio-0000_01_00.0", {"kind": "vfio", "key": "0000_01_00.0", "address": "0000:01:00.0/../.."},
     "address '0000:01:00.0/../..' is not a PCI address"),
    ("vfio-0000_01_00.0", {"kind": "vfio", "key": "0000_01_00.0", "address": "0000:01:00.0", "driver": "../x"},
     "driver '../x' is not a driver name"),
    ("vfio-0000_02_00.0", {"kind": "vfio", "key": "0000_02_00.0", "address": "0000:01:00.0"},
     "key '0000_02_00.0' is not the record key of its address '0000:01:00.0'"),
    ("vfio-0000_01_00.0", {"kind": "vfio", "key": "0000_01_00.0", "address": "0000:01:00.0",
                           "sysfs": "/tmp/../sys"}, "sysfs '/tmp/../sys' is not /sys"),
    ("proc-1", {"kind": "proc", "key": "1", "pid": "1"}, "pid '1' is not a process id"),
    ("proc-2", {"kind": "proc", "key": "2", "pid": 1}, "pid 1 is no process id matching key '2'"),
    ("netns-cprt-1-a", {"kind": "netns", "key": "cprt-1-a", "name": "cprt-1-a", "adopted": ["eth0/.."]},
     "adopted ['eth0/..'] is not a list of interface names"),
    ("netns-eth0", {"kind": "netns", "key": "eth0", "name": "eth0"},
     "name 'eth0' is not a cprt-* namespace named by key 'eth0'"),
    ("rundir-home", {"kind": "rundir", "key": "home", "path": "/home"},
     "path '/home' is not a cpr-* directory named by key 'home'"),
    ("rundir-cpr-a", {"kind": "rundir", "key": "cpr-a", "path": "/tmp/x/../cpr-a"},
     "path '/tmp/x/../cpr-a' is not an absolute, normalized path"),
    ("thing-a", {"kind": "thing", "key": "b"}, "file name thing-a.json does not match its kind and key"),
    ("list", [1, 2], "a list, not a JSON object"),
])
def test_poison_records_are_refused_and_set_aside(state_dir: Path, name: str, record: object, why: str) -> None:
    import pytest_cpr.host.mdev
    import pytest_cpr.host.netns  # noqa: F401 - register the mdev, vfio and netns checks

    state_dir.mkdir()
    path = state_dir / f"{name}.json"
    body = record if not isinstance(record, dict) else {"owner": dead_pid(), "owner_start": "1", **record}
    path.write_text(json.dumps(body))
    assert leftovers.records() == [] and path.exists(), "reading changes nothing"
    line = f"could not clean {name}.json: refused a poisoned record ({why})"
    assert leftovers.clean_stale() == [f"{line}; kept as {state_dir / f'{name}.json.rejected'}"]
    assert not path.exists() and leftovers.clean_stale() == []


def test_poison_kernel_trees_other_than_sys_and_dev_only_in_a_test_state_dir(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = {"kind": "vfio", "key": "0000_01_00.0", "address": "0000:01:00.0", "sysfs": "/tmp/fake/sys"}
    assert leftovers.problem(rec) is None
    monkeypatch.setattr(leftovers, "STATE_DIR", leftovers.DEFAULT_STATE_DIR)
    assert leftovers.problem(rec) == "sysfs '/tmp/fake/sys' is not /sys"
    assert leftovers.problem({**rec, "sysfs": "/sys"}) is None


@pytest.mark.parametrize(("prepare", "problem"), [
    (lambda d: d.mkdir(mode=0o777) or d.chmod(0o777), "writable by group or others (mode 777)"),
    (lambda d: d.mkdir() or os.chown(d, 12345, 12345), "owned by uid 12345"),
    (lambda d: d.symlink_to(d.parent), "a symlink"),
    (lambda d: d.write_text(""), "not a directory"),
])
def test_poison_a_state_dir_others_can_write_is_refused(state_dir: Path, prepare: object, problem: str) -> None:
    prepare(state_dir)  # type: ignore[operator]
    msg = (f"state directory {state_dir} (CPR_STATE_DIR) is {problem}: its records are acted on as root; "
           "make it a root-owned directory with mode 700 (or remove it) or point CPR_STATE_DIR at one")
    for act in (leftovers.records, leftovers.clean_stale, lambda: leftovers.record("proc", "1", pid=1)):
        with pytest.raises(leftovers.StateDirError) as err:
            act()
        assert str(err.value) == msg
    from pytest_cpr import cleanup

    assert cleanup.clean().failed == [f"could not clean the records: {msg}"]


def test_held_sysfs_write_fails_within_its_deadline(tmp_path: Path) -> None:
    """A write the kernel holds (unbind while a device's user has it open) is a FIFO nobody reads here."""
    from pytest_cpr.host.hostconfig import write_attr

    fifo = tmp_path / "unbind"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=rf"^writing '0000:01:00.0' to {fifo} did not return within 0.2s \(the "
                                      r"kernel waits for whatever holds the device; see the host's dmesg\); fix$"):
        write_attr(fifo, "0000:01:00.0", OSError, "fix", timeout=0.2)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the stuck writer thread finish
    os.close(reader)
