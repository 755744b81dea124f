"""pytest_cpr.cleanup against a fake /proc and a fake /var/run/netns (the real ones: integration)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pytest_cpr import cleanup, leftovers
from pytest_cpr.qemu.spec import VmSpec


class FakeProc:
    """A /proc with the files cleanup reads: stat, cmdline, task/<tid>/ns/net."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, comm: str, ppid: int, argv: list[str], netns_inode: int | None = None,
            state: str = "S") -> None:
        base = self.root / str(pid)
        base.mkdir(parents=True)
        (base / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 "
                                   "20 0 1 0 12345 0 0\n")
        (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        if netns_inode is not None:
            (base / "task" / str(pid) / "ns").mkdir(parents=True)
            os.symlink(f"net:[{netns_inode}]", base / "task" / str(pid) / "ns" / "net")


QMP_ARGS = ["-chardev", "socket,id=qmp0,path=/tmp/cpr-ab12cd34/qmp-g1.sock,server=on,wait=off",
            "-qmp", "chardev:qmp0"]


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path / "proc")
    fake.add(1, "init", 0, ["/sbin/init"])
    fake.add(100, "python3", 1, ["/work/.venv/bin/python", "-m", "pytest"])
    fake.add(150, "bash", 1, ["bash"])
    return fake


def test_harness_fingerprint_matches_the_real_command_line() -> None:
    """The QMP socket path that identifies a pytest-cpr QEMU is the one VmSpec.argv really produces,
    in a run directory made the way vm.CprVM makes it."""
    rundir = Path(tempfile.mkdtemp(prefix="cpr-", dir="/tmp"))
    try:
        spec = VmSpec(name="vm0", accel="tcg", memory_mib=512, cpus=1, kernel=Path("/k"), initrd=Path("/i"),
                      rootfs=Path("/r"))
        argv = spec.argv("qemu-system-x86_64", rundir / "console-g0.sock", Path("/x/console-g0.log"),
                         rundir / "qmp-g0.sock")
    finally:
        rundir.rmdir()
    info = cleanup.ProcInfo(10, 1, "qemu-system-x86", tuple(argv))
    assert cleanup.is_harness_qemu(info)


def test_the_virtual_hosts_l1_qemu_is_a_harness_qemu_too(tmp_path: Path) -> None:
    """The L1 QEMU of the virtual host, whose L0 harness was killed (the CI of 2026-11-27 11:39: the rollback
    run's timeout), is found by its real command line (its QMP socket is <rundir>/qmp.sock in a
    /tmp/cpr-vhost-* run directory, as VirtualHost makes it); the control: libvirt's socket is not."""
    from pytest_cpr import vhost

    rundir = Path(tempfile.mkdtemp(prefix="cpr-vhost-", dir="/tmp"))
    try:
        cfg = vhost.VhostConfig(image=tmp_path / "img", guest_image=tmp_path / "guest", artifacts=tmp_path / "a")
        argv = vhost.l1_argv(cfg, "/c/qemu-l0-x/libexec/qemu-system-x86_64", "tcg", rundir, tmp_path / "nvme.img")
    finally:
        rundir.rmdir()
    assert cleanup.is_harness_qemu(cleanup.ProcInfo(10, 1, "qemu-system-x86", tuple(argv)))
    libvirt = ("/usr/bin/qemu-system-x86_64", "-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/qmp.sock")
    assert not cleanup.is_harness_qemu(cleanup.ProcInfo(11, 1, "qemu-system-x86", libvirt))


def test_orphans_are_pytest_cpr_qemus_without_a_python_parent(proc: FakeProc) -> None:
    proc.add(200, "qemu-system-x86", 1, ["/usr/bin/qemu-system-x86_64", "-name", "vm0,debug-threads=on",
                                         *QMP_ARGS])  # harness died: reparented to init
    proc.add(201, "qemu-system-x86", 100, ["/usr/bin/qemu-system-x86_64", *QMP_ARGS])  # running harness
    proc.add(202, "qemu-system-x86", 150, ["qemu-system-x86_64", *QMP_ARGS])  # adopted by a shell/subreaper
    libvirt_qmp = "socket,id=charmonitor,path=/var/lib/libvirt/qemu/m.sock"
    proc.add(203, "qemu-system-x86", 1, ["/usr/bin/qemu-system-x86_64", "-chardev", libvirt_qmp])
    proc.add(204, "sleep", 1, ["sleep", "path=/tmp/cpr-ab12cd34/qmp-g1.sock"])  # not QEMU
    assert [p.pid for p in cleanup.orphaned_qemus(proc.root)] == [200, 202]


def test_dry_run_names_the_orphan_and_kills_nothing(proc: FakeProc) -> None:
    proc.add(200, "qemu-system-x86", 1, ["/usr/bin/qemu-system-x86_64", "-name", "vm3,debug-threads=on",
                                         *QMP_ARGS])
    outcome = cleanup.Outcome()
    cleanup.kill_orphaned_qemus(outcome, dry_run=True, proc=proc.root)
    assert outcome.done == ["would kill orphaned QEMU process 200 (qemu-system-x86_64 -name vm3; parent 1)"]
    assert outcome.failed == []


def test_zombie_counts_as_gone(proc: FakeProc) -> None:
    proc.add(300, "qemu-system-x86", 1, ["x"], state="Z")
    assert cleanup._is_zombie(300, proc.root)
    assert cleanup._is_zombie(301, proc.root)  # no such process


def _netns_dir(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "netns"
    d.mkdir()
    for n in names:
        (d / n).write_text("")
    return d


def test_stale_namespaces(tmp_path: Path, proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    """cprt-<pid>-x is stale when <pid> is not a live harness and no process is inside it."""
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    d = _netns_dir(tmp_path, "cprt-100-live", "cprt-4242-gone", "cprt-150-pidreused", "cprt-777-occupied",
                   "other-ns", "cprt-odd")
    proc.add(500, "sshd", 1, ["sshd"], netns_inode=(d / "cprt-777-occupied").stat().st_ino)
    assert cleanup.stale_namespaces(d, proc.root) == ["cprt-150-pidreused", "cprt-4242-gone", "cprt-odd"]


def test_outcome_sorts_failures() -> None:
    outcome = cleanup.Outcome()
    outcome.add("killed stale QEMU process 1 (q)")
    outcome.add("could not clean vfio 0000:01:00.0: device busy")
    assert outcome.done == ["killed stale QEMU process 1 (q)"]
    assert outcome.failed == ["could not clean vfio 0000:01:00.0: device busy"]


def test_cli_dry_run_lists_stale_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A record whose owner is gone is reported (and nothing is changed) by --dry-run."""
    monkeypatch.setattr(leftovers, "STATE_DIR", tmp_path / "state")
    monkeypatch.setattr(cleanup, "NETNS_DIR", tmp_path / "no-netns")
    monkeypatch.setattr(cleanup, "orphaned_qemus", lambda proc=cleanup.PROC: [])
    leftovers.record("vfio", "0000_01_00.0", address="0000:01:00.0")
    rec = tmp_path / "state" / "vfio-0000_01_00.0.json"
    rec.write_text(rec.read_text().replace(f'"owner": {os.getpid()}', '"owner": 999999999'))
    assert cleanup.main(["--dry-run", "--label", "t"]) == 0
    assert capsys.readouterr().out == "t: would clean vfio 0000_01_00.0 (owner 999999999 gone)\n"
    assert rec.exists()
