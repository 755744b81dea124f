"""The benchmark's own arithmetic: where boot-to-SSH goes (from the guest's dmesg and console), the
memory phase's sizes, its fit check against MemAvailable, and each figure's ratio to the smallest size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpr_bench", ROOT / "bench" / "cpr_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cpr_bench"] = module
    spec.loader.exec_module(module)
    return module


DMESG = """[    0.000000] Linux version 6.1.0-31-cloud-amd64
[    0.912000] Freeing unused kernel image (initmem) memory: 2000K
[    0.950000] Run /init as init process
[    1.250000] EXT4-fs (vda): mounted filesystem 1234 ro without journal. Quota mode: none.
[    1.300000] random: crng init done
"""


def test_boot_phases_split_boot_to_ssh_at_the_kernel_init_root_mount_and_setup(bench: ModuleType) -> None:
    """QEMU started at 0 and resumed (cont) at 0.1 s; the guest's uptime read 5.0 s after the start
    was 4.2 s, so its kernel started at 0.8 s (firmware 0.7 s); /init at 0.95, root at 1.25, setup
    done at 2.0 (guest clock); SSH at 3.1 s."""
    console = "junk\r\nCPR-HOSTKEY ssh-ed25519 AAAA\r\nCPR-SETUP-DONE uptime=2.00\r\n"
    phases = bench.boot_phases(DMESG, console, uptime_s=4.2, uptime_at_s=5.0, ssh_ready_s=3.1, resumed_s=0.1)
    assert phases == pytest.approx({"qemu_s": 0.1, "firmware_s": 0.7, "kernel_s": 0.95, "initrd_s": 0.3,
                                    "setup_s": 0.75, "sshd_s": 0.3})
    assert sum(phases.values()) == pytest.approx(3.1)
    assert bench.boot_phases(DMESG, "no marker", 4.2, 5.0, 3.1, 0.1) == {}


def test_memory_sizes_and_fit(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.memory_sizes("512M, 2G,8G,16G") == [512, 2048, 8192, 16384]
    assert bench.memory_sizes("") == []
    with pytest.raises(SystemExit, match=r"--memory '2X'.*use sizes like 512M,2G"):
        bench.memory_sizes("2X")
    monkeypatch.setattr(bench, "mem_available_mib", lambda: 10_000)
    monkeypatch.setattr(bench, "total_mib", lambda: 24_000)
    assert bench.fits(7_000, 2_048, "cpr-transfer") is None
    assert bench.fits(8_500, 2_048, "normal migration") == (
        "normal migration needs 8500 MiB + 2048 MiB reserve, MemAvailable is 10000 MiB (of 24000 MiB)")


def test_ratios_are_to_the_smallest_measured_size(bench: ModuleType) -> None:
    rows = [{"memory_mib": 512, "blackout_ms": 50.0, "qemu_downtime_ms": 4.0, "total_ms": 40.0,
             "normal_total_ms": 900.0},
            {"memory_mib": 2048, "blackout_ms": 55.0, "qemu_downtime_ms": 4.0, "total_ms": 44.0,
             "normal_total_ms": 3600.0},
            {"memory_mib": 16384, "blackout_ms": None, "qemu_downtime_ms": None, "total_ms": None,
             "normal_total_ms": None}]
    out = bench.with_ratios(rows)
    assert [r["blackout_ratio"] for r in out] == [1.0, 1.1, None]
    assert out[1]["normal_total_ratio"] == 4.0 and out[1]["qemu_downtime_ratio"] == 1.0


BUSY = """import ctypes, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: the thread's comm
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("done", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(("comm", "counted"), [("CPU 0/TCG", True), ("worker", False)])
def test_vcpu_seconds_count_the_vcpu_threads_alone(bench: ModuleType, comm: str, counted: bool) -> None:
    """A thread named as QEMU names its vCPUs (debug-threads=on) is counted with its CPU time; another
    thread of the same process is not."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", BUSY, comm], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "done\n"
        seconds = bench.vcpu_seconds(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert (seconds["vcpu_run_s"] >= 0.25) is counted and seconds["vcpu_wait_s"] >= 0
    if not counted:
        assert seconds == {"vcpu_run_s": 0.0, "vcpu_wait_s": 0.0}
