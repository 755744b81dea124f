#!/usr/bin/env python3
"""pytest-cpr benchmark: what a guest sees of cpr-transfer on this machine, and what the harness costs.

    python bench/cpr_bench.py [--boots 5] [--transfers 10] [--soak 100] [--accel tcg] [--modes]

Measures, in one run, with real QEMU processes and the default guest (pytest_cpr.vm.CprVM, no pytest):
  boots      boot-to-SSH of fresh guests (median, max)
  transfers  one guest under ICMP probe + TCP stream, N cpr-transfers: QEMU downtime vs guest
             blackout, lost probes, harness overhead ratio (step wall / (spawn-to-listen + QEMU total))
  soak       another guest, M consecutive transfers under the same traffic: failures, harness fd
             count and RSS at start and end, guest reachable throughout (every transfer answered
             SSH and probes, no probe gap over --reachable-gap-ms, TCP stream intact at the end)
  memory     cost against guest size (--memory 512M,2G,8G,16G): at each size a guest that dirtied
             most of its RAM, cpr-transfers and one normal migration beside them; sizes that do not
             fit in MemAvailable now are skipped with the reason
  modes      (--modes) every CPR mode both builds have, one guest each, --mode-transfers transfers
             under the same traffic: guest blackout, QEMU downtime, total (migrate to the new QEMU
             running), lost probes, and each mode's ratio to cpr-transfer
Prints a short table, then as its last line one JSON object. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from pytest_cpr import checks
from pytest_cpr.cpr import TransferResult
from pytest_cpr.errors import CprError
from pytest_cpr.images import GuestImage, default_cache_dir, guest_image_dir
from pytest_cpr.kinds import Mode, Phase
from pytest_cpr.net.traffic import LOSS_PHASES
from pytest_cpr.plot import plot_ram_scaling
from pytest_cpr.qemu.probe import QemuBuild, choose_accel, probe
from pytest_cpr.units import parse_mib
from pytest_cpr.vm import CprVM, Traffic, VmConfig

QEMU_OVERHEAD_MIB = 512  # a QEMU process beside its guest RAM (TCG translation cache, devices)
FILL_FRACTION = 0.75  # of guest RAM dirtied before the transfers of the memory phase
GUEST_OWN_MIB = 256  # what the guest's kernel and processes hold beside the fill


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boots", type=int, default=5, help="guests booted for boot-to-SSH (default 5)")
    p.add_argument("--transfers", type=int, default=10, help="measured transfers (default 10)")
    p.add_argument("--soak", type=int, default=100, help="consecutive transfers of the soak (default 100)")
    p.add_argument("--qemu", default=os.environ.get("CPR_QEMU", "qemu-system-x86_64"), help="source QEMU")
    p.add_argument("--target-qemu", default=os.environ.get("CPR_TARGET_QEMU"),
                   help="target QEMU (default: the source binary)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=os.environ.get("CPR_ACCEL", "auto"))
    p.add_argument("--image", default=os.environ.get("CPR_IMAGE"), help="guest image directory")
    p.add_argument("--cache-dir", default=str(default_cache_dir()))
    p.add_argument("--artifacts", type=Path, default=None,
                   help="output folder (default artifacts/bench/<UTC time>)")
    p.add_argument("--probe-interval-ms", type=float, default=1.0)
    p.add_argument("--memory", default="512M,2G,8G,16G",
                   help="guest sizes of the memory phase, comma separated ('' skips it; default %(default)s)")
    p.add_argument("--memory-transfers", type=int, default=3, help="cpr-transfers per size (default 3)")
    p.add_argument("--reserve-mib", type=int, default=2048,
                   help="memory phase: MiB of MemAvailable left to the rest of the machine (default 2048)")
    p.add_argument("--reachable-gap-ms", type=float, default=1000.0,
                   help="soak: a longer interval without any probe answer means 'not reachable'")
    p.add_argument("--no-plots", action="store_true", help="no timeline pictures for the measured transfers")
    p.add_argument("--modes", action="store_true",
                   help="also measure every CPR mode the builds have (cpr-transfer, cpr-exec, cpr-reboot)")
    p.add_argument("--mode-transfers", type=int, default=5, help="transfers per mode with --modes (default 5)")
    return p.parse_args(argv)


# ---- setup

@dataclass
class Bench:
    args: argparse.Namespace
    image: GuestImage
    source: QemuBuild
    target: QemuBuild
    accel: str
    out: Path
    notes: list[str] = field(default_factory=list)
    load_start: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-minute load average

    def config(self, name: str, plots: bool, memory_mib: int = 512, mode: Mode = Mode.CPR_TRANSFER) -> VmConfig:
        return VmConfig(name=name, image=self.image, source=self.source, target=self.target, accel=self.accel,
                        artifacts=self.out / name, probe_interval_ms=self.args.probe_interval_ms, plots=plots,
                        memory_mib=memory_mib, mode=mode)

    def modes(self) -> list[Mode]:
        """The CPR modes both builds have (normal migration is measured by the memory phase)."""
        return [m for m in Mode if m is not Mode.NORMAL and self.source.missing(m) is None
                and self.target.missing(m) is None]


def setup(args: argparse.Namespace) -> Bench:
    directory = guest_image_dir(args.image, Path(args.cache_dir))
    image = GuestImage.load(directory, "--image")
    source = probe(args.qemu, "--qemu")
    target = probe(args.target_qemu, "--target-qemu") if args.target_qemu else source
    for build in (source, target):
        if (missing := build.missing("cpr-transfer")) is not None:
            raise SystemExit(f"cpr_bench: {missing}")
    accel = choose_accel(args.accel, source, image.kernel)
    out = args.artifacts or Path("artifacts/bench") / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    return Bench(args, image, source, target, accel, out.resolve())


def harness_resources() -> tuple[int, int]:
    """(open fds, RSS KiB) of this process."""
    fds = len(os.listdir("/proc/self/fd"))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1])
    return fds, -1


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- phases

BOOT_PHASES = ("qemu_s", "firmware_s", "kernel_s", "initrd_s", "setup_s", "sshd_s")
_DMESG = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
_SETUP_DONE = re.compile(r"CPR-SETUP-DONE uptime=(\d+\.\d+)")


def boot_phases(dmesg: str, console: str, uptime_s: float, uptime_at_s: float, ssh_ready_s: float,
                resumed_s: float) -> dict[str, float]:
    """Where the seconds from QEMU's start to the first SSH answer went, from the guest's own clock:
    qemu (QEMU starting paused, the harness connecting QMP and console, to the RESUME of its `cont`,
    `resumed_s`), firmware (SeaBIOS, then QEMU's PVH option ROM entering the kernel ELF, or for a bzImage
    its setup and decompressor: up to the kernel's t=0), kernel (to 'Run /init'), initrd (to the root
    file system mounted), setup (busybox init and cpr-guest-setup: addresses, host key; to
    CPR-SETUP-DONE on the console), sshd (the SSH server, dropbear, starting and the harness's SSH
    connect, authentication and first command). `uptime_s` was read `uptime_at_s` seconds
    after QEMU started; `ssh_ready_s` is boot-to-SSH on the same clock."""
    lines = [(float(m.group(1)), m.group(2)) for line in dmesg.splitlines() if (m := _DMESG.match(line))]
    init = next((t for t, text in lines if text.startswith("Run /init")), None)
    root = next((t for t, text in lines if text.startswith("EXT4-fs (vda): mounted")), None)
    done = _SETUP_DONE.search(console)
    if init is None or root is None or done is None:
        return {}
    kernel_zero = uptime_at_s - uptime_s  # seconds after QEMU's start
    setup_done = float(done.group(1))
    return {"qemu_s": round(resumed_s, 3), "firmware_s": round(kernel_zero - resumed_s, 3),
            "kernel_s": round(init, 3), "initrd_s": round(root - init, 3),
            "setup_s": round(setup_done - root, 3), "sshd_s": round(ssh_ready_s - kernel_zero - setup_done, 3)}


VCPU_KEYS = ("vcpu_run_s", "vcpu_wait_s")


def vcpu_seconds(pid: int) -> dict[str, float]:
    """What a QEMU's vCPU threads have done so far, from the scheduler's statistics: seconds on a host CPU
    (the guest's own work, translation included under TCG) and seconds runnable but waiting for one (what
    other load on the host added). On a loaded host boot-to-SSH minus the wait is near an idle host's."""
    run = wait = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not task.joinpath("comm").read_text().startswith("CPU "):  # -name debug-threads=on: "CPU 0/TCG"
                continue
            ran, waited, _ = task.joinpath("schedstat").read_text().split()
        except OSError:  # a thread that just ended
            continue
        run, wait = run + int(ran) / 1e9, wait + int(waited) / 1e9
    return {"vcpu_run_s": round(run, 3), "vcpu_wait_s": round(wait, 3)}


def bench_boots(bench: Bench) -> tuple[list[float], list[dict[str, float]]]:
    times, phases = [], []
    for i in range(bench.args.boots):
        with CprVM(bench.config(f"boot{i}", plots=False)) as vm:
            times.append(round(vm.boot(), 3))
            vcpu = vcpu_seconds(vm.current.pid)
            t_spawn = vm.current.t_spawn
            out = vm.run("cat /proc/uptime; dmesg").stdout
            uptime_at = time.time() - t_spawn
            (vm.artifacts / "uptime-dmesg.txt").write_text(out)
            resume = next(e for e in vm.current.qmp.events if e.get("event") == "RESUME")
            resumed = resume["timestamp"]["seconds"] + resume["timestamp"]["microseconds"] / 1e6 - t_spawn
            phases.append(boot_phases(out, vm.current.console_log.read_text(errors="replace"),
                                      float(out.split()[0]), uptime_at, times[-1], resumed) | vcpu)
        progress(f"boot {i + 1}/{bench.args.boots}: {times[-1]:.2f} s to SSH "
                 f"({', '.join(f'{k[:-2]} {v:.2f}' for k, v in phases[-1].items())})")
    return times, phases


def checked_transfer(vm: CprVM, mode: Mode | None = None) -> TransferResult:
    """One transfer; raises if it did not complete or the guest did not answer after it."""
    result = vm.transfer(mode=mode)
    checks.assert_completed(result, vm.artifacts)
    checks.assert_connectivity(result, vm.artifacts)
    return result


def bench_transfers(bench: Bench, mode: Mode = Mode.CPR_TRANSFER, count: int | None = None,
                    name: str = "transfers") -> list[TransferResult]:
    results: list[TransferResult] = []
    count = bench.args.transfers if count is None else count
    with CprVM(bench.config(name, plots=not bench.args.no_plots, mode=mode)) as vm:
        vm.boot()
        with vm.traffic() as traffic:
            traffic.wait_answers(40, 60.0)
            for i in range(count):
                results.append(checked_transfer(vm))
                progress(f"{mode} {i + 1}/{count}: blackout {results[-1].blackout_ms} ms, "
                         f"QEMU downtime {results[-1].qemu_downtime_ms} ms")
        checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
    return results


def bench_modes(bench: Bench) -> dict[str, dict[str, Any]]:
    """Every mode the builds have, one guest each: the medians of its transfers."""
    modes: dict[str, dict[str, Any]] = {}
    for mode in bench.modes():
        done = [r for r in bench_transfers(bench, mode, bench.args.mode_transfers, f"mode-{mode}")
                if r.status == "completed"]
        modes[str(mode)] = {
            "blackout_ms": median([r.blackout_ms for r in done if r.blackout_ms is not None]),
            "qemu_downtime_ms": median([float(r.qemu_downtime_ms) for r in done if r.qemu_downtime_ms is not None]),
            "total_ms": median([v for r in done if (v := r.ms(Phase.MIGRATE_ISSUED, Phase.TARGET_RUNNING))
                                is not None]),
            "vm_pause_ms": median([v for r in done if (v := r.ms(Phase.SOURCE_STOPPED, Phase.TARGET_RUNNING))
                                   is not None]),
            "lost_probes": sum(int((r.probe or {}).get("lost", 0)) for r in done),
            "transfers": len(done),
        }
    return modes


MODE_COLUMNS = (("guest blackout ms", "blackout_ms"), ("QEMU downtime ms", "qemu_downtime_ms"),
                ("total ms", "total_ms"), ("VM paused ms", "vm_pause_ms"))


def modes_table(modes: dict[str, dict[str, Any]]) -> str:
    """Medians per mode, each with its ratio to cpr-transfer's."""
    base = modes.get(str(Mode.CPR_TRANSFER), {})
    head = f"{'mode':<13}" + "".join(f"  {title:>24}" for title, _ in MODE_COLUMNS) + f"  {'lost':>4}  {'n':>2}"
    lines = [head]
    for mode, m in modes.items():
        cells = []
        for _, key in MODE_COLUMNS:
            ratio = f" (x{m[key] / base[key]:.1f})" if m[key] and base.get(key) else ""
            cells.append(f"  {_f(m[key]) + ratio:>24}")
        lines.append(f"{mode:<13}" + "".join(cells) + f"  {m['lost_probes']:>4}  {m['transfers']:>2}")
    return "\n".join(lines)


@dataclass
class Soak:
    transfers: int = 0
    failures: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # start, after the first transfer, end
    rss_kib: list[int] = field(default_factory=list)
    max_gap_ms: float | None = None
    lost_probes: int | None = None
    probe_records: int = 0
    stream_intact: bool | None = None
    seconds: float = 0.0
    results: list[TransferResult] = field(default_factory=list)

    @property
    def reachable(self) -> bool:
        answered = all({"ssh_answered", "first_probe_after"} <= r.timeline.keys() for r in self.results)
        return self.stream_intact is True and self.max_gap_ms is not None and answered


def bench_soak(bench: Bench) -> Soak:
    soak = Soak()
    if bench.args.soak <= 0:
        return soak
    with CprVM(bench.config("soak", plots=False)) as vm:
        vm.boot()
        with vm.traffic() as traffic:
            traffic.wait_answers(40, 60.0)
            _soak_loop(bench, vm, traffic, soak)
        soak.stream_intact = traffic.stream_result is not None and traffic.stream_result.intact
    return soak


def _soak_loop(bench: Bench, vm: CprVM, traffic: Traffic, soak: Soak) -> None:
    _sample(soak)
    t_start = time.time()
    for i in range(bench.args.soak):
        try:
            soak.results.append(checked_transfer(vm))
        except (CprError, checks.CheckFailed) as exc:
            soak.failures.append(f"transfer {i + 1}: {exc}")
            progress(f"soak transfer {i + 1} FAILED: {exc}")
            if vm.ssh is None or not vm.ssh.is_active():
                progress("soak: SSH session lost, stopping")
                break
        soak.transfers += 1
        if i == 0:
            _sample(soak)
        if (i + 1) % 10 == 0:
            fds, rss = harness_resources()
            progress(f"soak {i + 1}/{bench.args.soak}: {len(soak.failures)} failure(s), fds {fds}, "
                     f"RSS {rss} KiB")
    traffic.wait_answers(20, 30.0)
    t_end = time.time()
    stats = traffic.probe.stats(t_start, t_end, grace_s=0.0)
    soak.seconds = round(t_end - t_start, 1)
    soak.max_gap_ms, soak.lost_probes = stats.max_gap_ms, stats.lost
    soak.probe_records = len(traffic.probe.snapshot())
    if soak.max_gap_ms > bench.args.reachable_gap_ms:
        soak.failures.append(f"guest unreachable for {soak.max_gap_ms} ms during the soak")
    traffic.finish_stream()
    _sample(soak)


def _sample(soak: Soak) -> None:
    fds, rss = harness_resources()
    soak.fds.append(fds)
    soak.rss_kib.append(rss)


def memory_sizes(text: str) -> list[int]:
    """--memory as MiB, e.g. '512M,2G' -> [512, 2048]."""
    try:
        return [parse_mib(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise SystemExit(f"cpr_bench: --memory {text!r}: {exc}; use sizes like 512M,2G,8G,16G") from None


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    raise SystemExit("cpr_bench: no MemAvailable in /proc/meminfo")


def fits(need_mib: int, reserve_mib: int, what: str) -> str | None:
    """None if `need_mib` more fits in MemAvailable now (keeping `reserve_mib`), else the reason."""
    available = mem_available_mib()
    if need_mib + reserve_mib <= available:
        return None
    return (f"{what} needs {need_mib} MiB + {reserve_mib} MiB reserve, MemAvailable is {available} MiB "
            f"(of {total_mib()} MiB)")


def total_mib() -> int:
    return int(Path("/proc/meminfo").read_text().split()[1]) >> 10


FILL_CHUNK_MIB = 64


def fill_command(memory_mib: int) -> str:
    """Guest command: dirty FILL_FRACTION of its RAM with non-zero data held in a tmpfs (so the pages
    stay in use, and a normal migration cannot skip them as zero pages). One 64 MiB chunk is made by
    doubling 1 MiB of text, then copied in the kernel (cp): a pipe of `yes` runs at a few MB/s under
    TCG, kernel copies at memory speed. Prints the MiB held."""
    chunks = max(1, int(memory_mib * FILL_FRACTION) // FILL_CHUNK_MIB)
    doublings = (FILL_CHUNK_MIB - 1).bit_length()
    return (f"mkdir -p /run/cpr-fill && mount -t tmpfs -o size={(chunks + 1) * FILL_CHUNK_MIB}M cpr-fill "
            f"/run/cpr-fill && cd /run/cpr-fill && yes cpr-bench-fill | head -c 1M > c && "
            f"for i in $(seq {doublings}); do cat c c > d && mv d c; done && "
            f"for i in $(seq {chunks - 1}); do cp c d$i; done && du -sm . | cut -f1")


def bench_memory_size(bench: Bench, memory_mib: int) -> dict[str, Any]:
    row: dict[str, Any] = {"memory_mib": memory_mib, "blackout_ms": None, "qemu_downtime_ms": None,
                           "total_ms": None, "normal_total_ms": None, "normal_blackout_ms": None,
                           "normal_downtime_ms": None, "filled_mib": None, "reason": None, "normal_reason": None}
    if (why := fits(memory_mib + 2 * QEMU_OVERHEAD_MIB, bench.args.reserve_mib, "cpr-transfer")) is not None:
        row["reason"] = row["normal_reason"] = why
        progress(f"memory {memory_mib} MiB: skipped: {why}")
        return row
    timeout = 600.0 + memory_mib / 16  # booting and dirtying a large guest under TCG takes minutes
    with CprVM(replace(bench.config(f"mem{memory_mib}", plots=False, memory_mib=memory_mib),
                       boot_timeout=timeout, transfer_timeout=timeout, command_timeout=timeout)) as vm:
        vm.boot()
        t0 = time.monotonic()
        row["filled_mib"] = int(vm.run(fill_command(memory_mib), timeout=timeout).stdout.split()[-1])
        progress(f"memory {memory_mib} MiB: guest dirtied {row['filled_mib']} MiB in "
                 f"{time.monotonic() - t0:.0f} s")
        with vm.traffic(tcp=False) as traffic:
            traffic.wait_answers(40, 60.0)
            done = [checked_transfer(vm) for _ in range(bench.args.memory_transfers)]
            row["blackout_ms"] = median([r.blackout_ms for r in done if r.blackout_ms is not None])
            row["qemu_downtime_ms"] = median([float(r.qemu_downtime_ms) for r in done
                                              if r.qemu_downtime_ms is not None])
            row["total_ms"] = median([float(r.qemu_total_ms) for r in done if r.qemu_total_ms is not None])
            progress(f"memory {memory_mib} MiB: cpr-transfer blackout {row['blackout_ms']} ms, QEMU downtime "
                     f"{row['qemu_downtime_ms']} ms, total {row['total_ms']} ms")
            # a normal migration holds a second copy of what the guest wrote (zero pages are not
            # allocated on the target) until the old QEMU quits
            second_copy = row["filled_mib"] + GUEST_OWN_MIB + QEMU_OVERHEAD_MIB
            if (why := fits(second_copy, bench.args.reserve_mib, "normal migration")):
                row["normal_reason"] = why
                progress(f"memory {memory_mib} MiB: normal migration skipped: {why}")
            else:
                normal = checked_transfer(vm, Mode.NORMAL)
                row["normal_total_ms"] = normal.qemu_total_ms
                row["normal_downtime_ms"] = normal.qemu_downtime_ms
                row["normal_blackout_ms"] = normal.blackout_ms
                progress(f"memory {memory_mib} MiB: normal migration total {row['normal_total_ms']} ms, "
                         f"blackout {row['normal_blackout_ms']} ms")
    return row


def bench_memory(bench: Bench) -> list[dict[str, Any]]:
    """One row per size; Ctrl-C ends the phase (the rest: null, 'interrupted') and the run still reports."""
    rows: list[dict[str, Any]] = []
    for size in memory_sizes(bench.args.memory):
        empty = {"memory_mib": size, "blackout_ms": None, "qemu_downtime_ms": None, "total_ms": None,
                 "normal_total_ms": None}
        if rows and rows[-1].get("reason") == "interrupted":
            rows.append({**empty, "reason": "interrupted"})
            continue
        try:
            rows.append(bench_memory_size(bench, size))
        except (CprError, checks.CheckFailed) as exc:
            progress(f"memory {size} MiB FAILED: {exc}")
            rows.append({**empty, "reason": f"failed: {exc}"})
        except KeyboardInterrupt:
            progress(f"memory {size} MiB: interrupted; reporting what was measured")
            rows.append({**empty, "reason": "interrupted"})
    return rows


RATIO_KEYS = ("blackout_ms", "qemu_downtime_ms", "total_ms", "normal_total_ms")


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure's ratio to the smallest measured size's (`<key>_ratio`)."""
    base = next((r for r in rows if r.get("blackout_ms") is not None), None)
    for row in rows:
        for key in RATIO_KEYS:
            ok = base is not None and row.get(key) is not None and base.get(key)
            row[f"{key[:-3]}_ratio"] = round(row[key] / base[key], 2) if ok and base else None
    return rows


# ---- output

def summary(bench: Bench, boots: list[float], phases: list[dict[str, float]], results: list[TransferResult], soak: Soak,
            ram_scaling: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in results if r.status == "completed"]
    probed = [r.probe for r in done + soak.results if r.probe]
    ratios = [r.overhead_ratio for r in done if r.overhead_ratio is not None]
    blackouts = [r.blackout_ms for r in done if r.blackout_ms is not None]
    downtimes = [float(r.qemu_downtime_ms) for r in done if r.qemu_downtime_ms is not None]
    soak_blackouts = [r.blackout_ms for r in soak.results if r.blackout_ms is not None]
    return {
        "boot_to_ssh_s": median(boots), "boot_to_ssh_max_s": max(boots, default=None), "boots": len(boots),
        "boot_phases_s": {k: median([p[k] for p in phases if k in p]) for k in BOOT_PHASES},
        **{f"boot_{k}": median([p[k] for p in phases if k in p]) for k in VCPU_KEYS},
        "load_average_start": bench.load_start, "load_average_end": round(os.getloadavg()[0], 2),
        "overhead_ratio": median(ratios), "overhead_ratio_max": max(ratios, default=None),
        "blackout_ms": median(blackouts), "blackout_max_ms": max(blackouts, default=None),
        "qemu_downtime_ms": median(downtimes), "qemu_downtime_max_ms": max(downtimes, default=None),
        "qemu_total_ms": median([float(r.qemu_total_ms) for r in done if r.qemu_total_ms is not None]),
        "spawn_to_listen_ms": median([v for r in done
                                      if (v := r.ms("target_spawned", "target_listening")) is not None]),
        "step_ms": median([v for r in done if (v := r.ms("step_start", "target_running")) is not None]),
        "lost_probes": sum(int((r.probe or {}).get("lost", 0)) for r in done), "transfers": len(results),
        "probe_send_stall_max_ms": max((float(r.probe["max_send_gap_ms"]) for r in done + soak.results
                                        if r.probe and "max_send_gap_ms" in r.probe), default=None),
        "blackouts_overlapping_send_stall": sum(1 for r in done + soak.results
                                                if (r.probe or {}).get("blackout_overlaps_send_stall")),
        "probe_send_jitter_p99_ms": max((float(p["send_jitter_p99_ms"]) for p in probed
                                         if p.get("send_jitter_p99_ms") is not None), default=None),
        "probe_realtime": all(p.get("probe_realtime") for p in probed) if probed else None,
        "probe_uncaptured": sum(int(p.get("probe_uncaptured", 0)) for p in probed),
        **{key: sum(int(p.get(key, 0)) for p in probed) for key in LOSS_PHASES},
        "soak_transfers": soak.transfers, "soak_failures": len(soak.failures),
        "soak_seconds": soak.seconds, "soak_blackout_ms": median(soak_blackouts),
        "soak_blackout_max_ms": max(soak_blackouts, default=None),
        "soak_lost_probes": soak.lost_probes, "soak_max_probe_gap_ms": soak.max_gap_ms,
        "soak_reachable": soak.reachable, "soak_stream_intact": soak.stream_intact,
        "fd_start": soak.fds[0] if soak.fds else None, "fd_end": soak.fds[-1] if soak.fds else None,
        "fd_growth": soak.fds[-1] - soak.fds[0] if soak.fds else None,
        "rss_start_kib": soak.rss_kib[0] if soak.rss_kib else None,
        "rss_end_kib": soak.rss_kib[-1] if soak.rss_kib else None,
        "rss_growth_kib": soak.rss_kib[-1] - soak.rss_kib[0] if soak.rss_kib else None,
        "rss_growth_after_first_kib": soak.rss_kib[-1] - soak.rss_kib[1] if len(soak.rss_kib) > 2 else None,
        "probe_records": soak.probe_records,
        "qemu": f"{bench.source.short_version} -> {bench.target.short_version}", "accel": bench.accel,
        "probe_interval_ms": bench.args.probe_interval_ms, "artifacts": str(bench.out),
        "ram_scaling": ram_scaling,
    }


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(s: dict[str, Any], results: list[TransferResult]) -> str:
    lines = [f"pytest-cpr benchmark: QEMU {s['qemu']}, {s['accel']}, "
             f"probe every {s['probe_interval_ms']:g} ms",
             f"boot-to-SSH       median {_f(s['boot_to_ssh_s'], 2)} s, max {_f(s['boot_to_ssh_max_s'], 2)} s "
             f"({s['boots']} boots, load average {s['load_average_start']:.1f}); medians: "
             + ", ".join(f"{k[:-2]} {_f(v, 2)} s" for k, v in s["boot_phases_s"].items())
             + f"; vCPU on a host CPU {_f(s['boot_vcpu_run_s'], 2)} s, "
             f"waiting for one {_f(s['boot_vcpu_wait_s'], 2)} s",
             "",
             f"{'#':>3}  {'QEMU downtime ms':>16}  {'QEMU total ms':>13}  {'guest blackout ms':>17}  "
             f"{'lost':>4}  {'spawn->listen ms':>16}  {'step ms':>7}  {'overhead':>8}"]
    for r in results:
        lines.append(f"{r.index:>3}  {_f(r.qemu_downtime_ms):>16}  {_f(r.qemu_total_ms):>13}  "
                     f"{_f(r.blackout_ms):>17}  {_f((r.probe or {}).get('lost')):>4}  "
                     f"{_f(r.ms('target_spawned', 'target_listening')):>16}  "
                     f"{_f(r.ms('step_start', 'target_running')):>7}  {_f(r.overhead_ratio, 2):>8}")
    lines += [f"{'med':>3}  {_f(s['qemu_downtime_ms']):>16}  {_f(s['qemu_total_ms']):>13}  "
              f"{_f(s['blackout_ms']):>17}  {s['lost_probes']:>4}  {_f(s['spawn_to_listen_ms']):>16}  "
              f"{_f(s['step_ms']):>7}  {_f(s['overhead_ratio'], 2):>8}", "",
              f"soak              {s['soak_transfers']} transfers in {s['soak_seconds']} s, "
              f"{s['soak_failures']} failure(s), blackout median {_f(s['soak_blackout_ms'])} ms max "
              f"{_f(s['soak_blackout_max_ms'])} ms, reachable throughout: {s['soak_reachable']}",
              f"harness           fds {s['fd_start']} -> {s['fd_end']}, RSS {s['rss_start_kib']} -> "
              f"{s['rss_end_kib']} KiB ({s['probe_records']} probe records held)",
              f"probe sender      every {s['probe_interval_ms']:g} ms "
              f"({'SCHED_FIFO' if s['probe_realtime'] else 'normal priority'}), send jitter p99 "
              f"{_f(s['probe_send_jitter_p99_ms'], 3)} ms (worst transfer), longest send gap "
              f"{_f(s['probe_send_stall_max_ms'])} ms; {s['blackouts_overlapping_send_stall']} blackout(s) "
              f"overlap a stall",
              f"lost probes       before stop {s['lost_before_stop']}, in the downtime {s['lost_in_downtime']}, "
              f"after resume {s['lost_after_resume']} (transfers and soak)"]
    if s["ram_scaling"]:
        lines += ["", f"{'guest MiB':>9}  {'blackout ms':>14}  {'QEMU downtime ms':>16}  {'QEMU total ms':>14}  "
                      f"{'normal total ms':>16}  note"]
        for row in s["ram_scaling"]:
            lines.append(f"{row['memory_mib']:>9}  {_ratio(row, 'blackout_ms'):>14}  "
                         f"{_ratio(row, 'qemu_downtime_ms'):>16}  {_ratio(row, 'total_ms'):>14}  "
                         f"{_ratio(row, 'normal_total_ms'):>16}  {row.get('reason') or row.get('normal_reason') or ''}")
    return "\n".join(lines)


def _ratio(row: dict[str, Any], key: str) -> str:
    """'value (x ratio)' of a memory-phase figure."""
    ratio = row.get(f"{key[:-3]}_ratio")
    return _f(row.get(key)) + (f" (x{ratio:.2f})" if ratio is not None else "")


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C cleans up (QEMUs, namespace) also when started in the background, where SIGINT comes
    # ignored; SIGTERM stays fatal: pyroute2's forked helpers inherit handlers and end with SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    bench = setup(args)
    progress(f"cpr_bench: artifacts in {bench.out}")
    boots, phases = bench_boots(bench)
    results = bench_transfers(bench) if args.transfers > 0 else []
    soak = bench_soak(bench)
    ram_scaling = with_ratios(bench_memory(bench))
    s = summary(bench, boots, phases, results, soak, ram_scaling)
    if ram_scaling and not args.no_plots:
        plot_ram_scaling(ram_scaling, bench.out / "ram-scaling", f"cost against guest size: QEMU {s['qemu']}, "
                         f"{s['accel']}, load {s['load_average_start']:.1f} -> {s['load_average_end']:.1f}")
    modes = bench_modes(bench) if args.modes else None
    if modes is not None:
        s["modes"] = modes
    (bench.out / "bench.json").write_text(json.dumps({**s, "soak_failure_details": soak.failures}, indent=1))
    print(table(s, results))
    if modes is not None:
        print("\nmodes (medians; xN = ratio to cpr-transfer)\n" + modes_table(modes))
    for failure in soak.failures[:10]:
        print(f"soak failure: {failure}")
    print(json.dumps(s))
    return 1 if soak.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
