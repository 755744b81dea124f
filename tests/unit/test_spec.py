from __future__ import annotations

import json
from pathlib import Path

from pytest_cpr.qemu.spec import ExecIncoming, Incoming, Nic, VmSpec


def spec(**kw: object) -> VmSpec:
    base = dict(name="t", accel="tcg", memory_mib=512, cpus=1, kernel=Path("/k"), initrd=Path("/i"),
                rootfs=Path("/r"), nics=(Nic("n0", "52:54:00:00:00:02", 7, "10.77.0.2/24"),))
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def argv(s: VmSpec, incoming: Incoming | ExecIncoming | None = None) -> list[str]:
    return s.argv("qemu", Path("/run/c.sock"), Path("/a/c.log"), Path("/run/q.sock"), incoming, paused=True)


def test_source_uses_shared_memfd_and_aux_ram_share() -> None:
    a = argv(spec())
    assert "memory-backend-memfd,id=ram0,size=512M,share=on" in a
    assert "q35,memory-backend=ram0,aux-ram-share=on" in a
    assert "-S" in a and "-incoming" not in a
    assert "tap,id=n0,fd=7" in a


def test_target_is_source_plus_incoming_channels() -> None:
    inc = Incoming(Path("/run/mig.sock"), Path("/run/cpr.sock"))
    src, tgt = argv(spec()), argv(spec(), inc)
    assert tgt[: len(src) - 1] == src[:-1]  # identical but for -S and the channels
    i = tgt.index("-incoming")
    assert tgt[i + 1] == "unix:/run/mig.sock"
    cpr = json.loads(tgt[i + 3])
    assert cpr == {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/run/cpr.sock"}}
    assert [c["channel-type"] for c in inc.channels()] == ["main", "cpr"]


def test_no_tcp_listeners_in_argv() -> None:
    inc = Incoming(Path("/run/mig.sock"), Path("/run/cpr.sock"))
    joined = " ".join(argv(spec(), inc))
    assert "tcp:" not in joined and "host=" not in joined and '"inet"' not in joined


def test_kvm_uses_host_cpu_and_file_backend() -> None:
    a = argv(spec(accel="kvm", ram_file=Path("/dev/shm/g")))
    assert a[a.index("-cpu") + 1] == "host" and a[a.index("-accel") + 1] == "kvm"
    assert "memory-backend-file,id=ram0,size=512M,share=on,mem-path=/dev/shm/g" in a


def test_kernel_cmdline_carries_nic_addresses() -> None:
    s = spec(cmdline=("cpr.sshkey=AAAA",))
    assert "cpr.net0=52:54:00:00:00:02,10.77.0.2/24" in s.append_line()
    assert s.append_line().endswith("cpr.sshkey=AAAA")


def test_kernel_cmdline_skips_the_boot_work_a_test_guest_needs_not_under_tcg_only() -> None:
    fast = {"cryptomgr.notests", "no_timer_check", "init_on_alloc=0", "mitigations=off"}
    assert fast <= set(spec(accel="tcg").append_line().split())
    assert not fast & set(spec(accel="kvm").append_line().split())  # L2 guests on KVM reset with them


def test_the_nic_has_no_option_rom_for_seabios_to_start() -> None:
    nic = [a for a in argv(spec()) if a.startswith("virtio-net-pci")]
    assert len(nic) == 1 and nic[0].endswith(",romfile=")


def test_probe_of_a_build_that_dies_mid_probe_is_one_clear_error(tmp_path: Path) -> None:
    """A broken build (e.g. missing its modules) accepts the QMP connection, then dies: the probe
    must say which setting, which binary and what it printed, not raise a protocol traceback."""
    import stat

    import pytest

    from pytest_cpr.errors import CprSettingError
    from pytest_cpr.qemu.probe import probe

    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import socket, sys\n"
        "path = [a for a in sys.argv if a.startswith('socket,')][0].split('path=')[1].split(',')[0]\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)\n"
        "c, _ = s.accept()\n"
        "print(\"fatal: could not load module for type 'tcg-accel-ops'\", flush=True)\n"
        "sys.exit(1)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(CprSettingError) as err:
        probe(str(fake), "--cpr-qemu / CPR_QEMU", timeout=10)
    msg = str(err.value)
    assert msg.startswith("--cpr-qemu / CPR_QEMU: ") and "could not load module" in msg and "\n" not in msg


def test_commas_in_paths_are_doubled_in_qemu_option_values() -> None:
    s = spec(rootfs=Path("/img,x/rootfs.img"), seed_iso=Path("/run,1/seed.iso"), ram_file=Path("/dev/shm/a,b"))
    a = s.argv("qemu", Path("/t,1/c.sock"), Path("/art,ifacts/c.log"), Path("/t,1/q.sock"))
    assert "file=/img,,x/rootfs.img,if=none,id=root,format=raw,readonly=on" in a
    assert "file=/run,,1/seed.iso,if=none,id=seed,format=raw,readonly=on" in a
    assert "socket,id=console0,path=/t,,1/c.sock,server=on,wait=off,logfile=/art,,ifacts/c.log" in a
    assert "socket,id=qmp0,path=/t,,1/q.sock,server=on,wait=off" in a
    assert "memory-backend-file,id=ram0,size=512M,share=on,mem-path=/dev/shm/a,,b" in a


def test_cpr_exec_target_is_source_plus_a_file_incoming() -> None:
    """cpr-exec: the exec'd argv is the same VM with -incoming file: (QEMU documents a file-like main
    channel, the two QEMUs never run at once) and no cpr channel."""
    inc = ExecIncoming(Path("/run/state-g1.bin"))
    src, tgt = argv(spec()), argv(spec(), inc)
    assert tgt[: len(src) - 1] == src[:-1]
    assert tgt[len(src) - 1:] == ["-incoming", "file:/run/state-g1.bin"]
    assert inc.channels() == [{"channel-type": "main",
                               "addr": {"transport": "file", "filename": "/run/state-g1.bin", "offset": 0}}]
