"""Passthrough devices in a guest, without pytest: the devices bound for one test (VfioDevices) and
why QEMU or the kernel would refuse them, a booted guest with them (PassthroughGuest), the DMA traffic
that runs on a passthrough NVMe (NvmeDma), and the host side of a transfer (HostWatch, an observer).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pytest_cpr import checks
from pytest_cpr.cpr import TransferResult
from pytest_cpr.errors import CprError, CprTimeout, CprUnsupported, TransferFailed
from pytest_cpr.host import procfds, vfio
from pytest_cpr.host.hostconfig import DeviceConfig, HostConfig
from pytest_cpr.host.vfio import HostKernelLog, HostProbe, Passthrough, VfioBinding
from pytest_cpr.kinds import Accel, Backend, Mode, Phase, Role
from pytest_cpr.observers import Observer
from pytest_cpr.procfs import IrqLine, LockedMemory
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import QemuProcess
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.waits import (
    DEVICE_APPEAR_TIMEOUT_S,
    DMA_LOG_READ_TIMEOUT_S,
    DMA_ROUND_TIMEOUT_S,
    DMA_VERIFY_TIMEOUT_S,
    GUEST_SHELL_MARGIN_S,
)

if TYPE_CHECKING:
    from pytest_cpr.probing import Traffic
    from pytest_cpr.vm import CprVM


# Default bounds of tests with passthrough devices ("no loss of guest connectivity", DMA that goes on),
# from the virtual host (TCG L1, KVM L2, 2-core machine under load), README "Passthrough defaults":
# blackout: 969 ms the most in 78 transfers over a passthrough NIC, x2; lost probes: none in those 78
# (a frame the NIC received while the guest was paused is DMA'd into its ring, answered late, not
# lost); DMA stall: under the NVMe driver's 30 s I/O timeout (a completion lost and recovered only by
# that timeout fails), above the longest gap between completed I/Os seen in the virtual host under
# load, transfer or not (17.4 s; 14.3 s across the transfer).
PASSTHROUGH_THRESHOLDS: dict[str, float] = {"max_blackout_ms": 2000.0, "max_lost_probes": 0.0,
                                            "max_dma_stall_ms": 25000.0}


@dataclass(frozen=True)
class Want:
    role: Role
    count: int
    backend: Backend | None


def select(host: HostConfig, want: list[Want]) -> list[DeviceConfig] | str:
    """The config's devices for the wants (first ones of each role), or why the host cannot serve."""
    chosen: list[DeviceConfig] = []
    for w in want:
        have = [d for d in host.with_role(w.role) if d not in chosen]
        if len(have) < w.count:
            return (f"host config {host.path} names {len(have)} free device(s) of role '{w.role}'; the test "
                    f"needs {w.count}")
        chosen += have[: w.count]
    return chosen


@dataclass
class VfioDevices:
    """The devices bound to vfio-pci for one test, and why QEMU would refuse cpr-transfer with them."""

    host: HostConfig
    backend: Backend
    devices: list[tuple[DeviceConfig, Passthrough]]
    binding: VfioBinding
    blockers: list[str] = field(default_factory=list)

    def with_role(self, role: Role) -> list[tuple[DeviceConfig, Passthrough]]:
        return [(c, p) for c, p in self.devices if c.role == role]

    @property
    def nics(self) -> list[tuple[DeviceConfig, Passthrough]]:
        """The network cards, of every NIC role, in host-config order."""
        return [(c, p) for c, p in self.devices if Role(c.role).is_nic]

    @property
    def addresses(self) -> list[str]:
        return [c.address for c, _ in self.devices]

    def groups(self) -> list[str]:
        return self.binding.groups()

    def qemu_args(self) -> tuple[str, ...]:
        return tuple(vfio.qemu_args([p for _, p in self.devices], self.backend))

    def fd_passing(self) -> vfio.FdPassing:
        """The devices as fds the harness opens (iommufd backend: QEMU takes no other)."""
        if self.backend != Backend.IOMMUFD:
            raise CprUnsupported(f"VFIO devices passed by fd need the iommufd backend, not {self.backend}: "
                                 f"QEMU says {vfio.LEGACY_FD_REFUSAL!r} (hw/vfio/device.c) and has no fd "
                                 "property for a legacy container or group (it opens /dev/vfio/vfio and "
                                 "/dev/vfio/<group> itself, hw/vfio/container-legacy.c)")
        return vfio.FdPassing(tuple(p for _, p in self.devices), self.host.paths)

    def kernel_args(self) -> tuple[str, ...]:
        """cpr.net<N>=<guest PCI address>,<ip/prefix> for each NIC (N >= 1: net0 is the virtio NIC)."""
        return tuple(f"cpr.net{n}={p.guest_address},{c.guest_ip}"
                     for n, (c, p) in enumerate(self.nics, start=1))


def build_reasons(source: QemuBuild, target: QemuBuild, backend: Backend) -> tuple[list[str], list[str]]:
    """(unavailable, blockers) of the QEMU builds: no vfio-pci/iommufd = cannot run; no VFIO CPR =
    QEMU refuses cpr-transfer (a blocker)."""
    unavailable, blockers = [], []
    for build in dict.fromkeys((source, target)):
        for feature in ("vfio-pci", *(("iommufd",) if backend == Backend.IOMMUFD else ())):
            if (reason := build.missing(feature)) is not None:
                unavailable.append(reason)
        if (reason := build.missing("vfio-cpr")) is not None:
            blockers.append(reason)
    return unavailable, blockers


def kernel_blockers(probe: HostProbe, binding: VfioBinding, backend: Backend) -> list[str]:
    if backend == Backend.IOMMUFD:
        return [] if probe.change_process is True else [str(probe.change_process)]
    return [r for g in binding.groups() if (r := vfio.legacy_cpr_missing(g, binding.paths.dev)) is not None]


class Unserved(NamedTuple):
    """Why the host cannot serve a test; `lacking` False: it has more than the test needs."""

    reason: str
    lacking: bool = True


def after_bind(devices: VfioDevices, probe: HostProbe, expects_blocker: bool) -> Unserved | None:
    """Checks that need the devices on vfio-pci; returns why the test cannot run here, or None."""
    if devices.backend == Backend.IOMMUFD:
        for address in devices.addresses:
            if (reason := vfio.cdev_missing(devices.binding.paths, address)) is not None:
                return Unserved(reason)
    devices.blockers += kernel_blockers(probe, devices.binding, devices.backend)
    if devices.blockers and not expects_blocker:
        return Unserved("; ".join(devices.blockers))
    if expects_blocker and not devices.blockers:
        return Unserved(f"nothing blocks VFIO cpr-transfer here (backend {devices.backend}: the kernel and both "
                        "QEMU builds have every feature it needs): no blocker to provoke", lacking=False)
    return None



NVME_DMA_SCRIPT = r"""
dev=$1; slots=$2; w=/tmp/cpr-dma; mkdir -p $w; i=0
while [ ! -e $w.stop ]; do
  s=$((i % slots))
  head -c 1048576 /dev/urandom > $w/data
  want=$(sha256sum < $w/data | cut -d' ' -f1)
  if ! dd if=$w/data of=$dev bs=1M seek=$s count=1 oflag=direct conv=notrunc status=none 2>$w/err; then
    echo "FAIL write i=$i slot=$s: $(cat $w/err)"; break; fi
  echo "W $i $s $EPOCHREALTIME"
  got=$(dd if=$dev bs=1M skip=$s count=1 iflag=direct status=none 2>$w/err | sha256sum | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then echo "FAIL read i=$i slot=$s want=$want got=$got $(cat $w/err)"; break; fi
  echo $want > $w/slot.$s
  echo "OK $i $s $EPOCHREALTIME"
  i=$((i + 1))
done
for f in $w/slot.*; do
  [ -e "$f" ] || continue; s=${f##*.}
  got=$(dd if=$dev bs=1M skip=$s count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat $f)" ] || echo "FAIL verify slot=$s want=$(cat $f) got=$got"
done
echo "DONE $i"
"""


class DmaMark(NamedTuple):
    """Where the guest's DMA stream stood at a moment: the guest clock then, and the host clock minus
    the guest clock (kvmclock stands still while the VM is paused, so the offset grows by the pause)."""

    guest_time: float
    offset_s: float


def dma_completions(log: str) -> list[float]:
    """Guest times of the completed I/Os in the DMA script's log (a write done: W, its read-back
    compared: OK), in log order."""
    times = []
    for line in log.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] in ("W", "OK"):
            times.append(float(fields[3].replace(",", ".")))  # $EPOCHREALTIME follows the locale
    return times


def dma_stall_ms(log: str, before: DmaMark, after: DmaMark, stopped_at: float | None) -> float:
    """The longest gap in host time between completed I/Os from `before` to `after` (a transfer between
    them): guest times before the VM stopped (host time `stopped_at`) shift by the offset before, the
    rest by the offset after, so the pause the guest's clock did not see counts."""
    switch = None if stopped_at is None else stopped_at - before.offset_s  # guest time at the pause
    host = [t + (before.offset_s if switch is None or t <= switch else after.offset_s)
            for t in dma_completions(log) if before.guest_time <= t <= after.guest_time]
    if len(host) < 2:
        raise CprError(f"the NVMe DMA log has {len(host)} completed I/O(s) between the marks around the "
                       "transfer: no stall to measure (the stream had not started, or stopped)")
    return round(max(b - a for a, b in itertools.pairwise(host)) * 1000, 3)


class NvmeDma:
    """DMA traffic on a passthrough NVMe in the guest: 1 MiB writes of random data with O_DIRECT over
    the test area, each read back and compared by SHA-256; at the end every slot is read back again
    (data written before a transfer is read after it). Each completed write and read-back is logged
    with the guest's time, so the longest I/O stall across a transfer can be measured (mark() before
    and after it, then measure_stall)."""

    # controller name c, then its namespace's block device ns: the path device itself, or (native NVMe
    # multipath) the head /sys/block/nvmeXnY whose multipath/ lists the controller's nvmeXcYnZ
    _FIND = ("ns=; c=$(ls /sys/bus/pci/devices/%s/nvme 2>/dev/null | head -1); "
             "for n in /sys/class/nvme/$c/nvme*n*; do [ -e \"$n\" ] || continue; p=${n##*/}; "
             "if [ -b /dev/$p ]; then ns=$p; break; fi; "
             "for h in /sys/block/nvme*n*; do [ -e $h/multipath/$p ] && ns=${h##*/}; done; "
             # kernels before ~6.6 (Debian 12's 6.1) have no multipath/ links: the head disk sits
             # in the NVMe subsystem that holds the controller (%% is % after formatting)
             "for h in /sys/class/nvme-subsystem/*/nvme*n*; do [ -z \"$ns\" ] && [ -e \"${h%%/*}/$c\" ] && "
             "[ -b \"/dev/${h##*/}\" ] && ns=${h##*/}; done; "
             '[ -n "$ns" ] && break; done;')

    def __init__(self, vm: CprVM, guest_address: str, area_mib: int) -> None:
        self.vm, self.guest_address, self.area_mib = vm, guest_address, area_mib
        self.controller = ""
        self.namespace = ""
        self.log: str = ""

    def find(self, timeout: float = DEVICE_APPEAR_TIMEOUT_S) -> str:
        """The guest's namespace block device of this controller, waited for (the driver probes async)."""
        out = self.vm.run(f"for i in $(seq {int(timeout * 10)}); do {self._FIND % self.guest_address} "
                          '[ -n "$ns" ] && break; sleep 0.1; done; echo "$c/$ns"',
                          timeout=timeout + GUEST_SHELL_MARGIN_S).stdout.strip()
        self.controller, _, self.namespace = out.partition("/")
        if not self.namespace:
            raise CprTimeout(f"no NVMe namespace appeared at guest PCI {self.guest_address} within "
                             f"{timeout:.0f}s (controller {self.controller or 'none'}); "
                             f"logs: {self.vm.artifacts}")
        sectors = int(self.vm.run(f"cat /sys/block/{self.namespace}/size").stdout)
        if sectors * 512 < self.area_mib << 20:
            raise CprError(f"NVMe {self.namespace} has {sectors * 512 >> 20} MiB, less than test_area_mib = "
                           f"{self.area_mib}; lower test_area_mib in the host config")
        return self.namespace

    @property
    def irq_pattern(self) -> str:
        return rf"^{self.controller}q\d+$"

    def start(self) -> NvmeDma:
        if not self.namespace:
            self.find()
        self.vm.run("rm -rf /tmp/cpr-dma /tmp/cpr-dma.stop; "
                    f"cat > /tmp/cpr-dma.sh <<'EOF'\n{NVME_DMA_SCRIPT}\nEOF")
        self.vm.run(f"setsid nohup bash /tmp/cpr-dma.sh /dev/{self.namespace} {self.area_mib} "
                    "> /tmp/cpr-dma.log 2>&1 < /dev/null &")
        return self

    def progress(self) -> tuple[int, list[str]]:
        """(write/read-back rounds that passed, failure lines) so far."""
        text = self.vm.run("cat /tmp/cpr-dma.log", timeout=DMA_LOG_READ_TIMEOUT_S).stdout
        return sum(1 for ln in text.splitlines() if ln.startswith("OK ")), \
            [ln for ln in text.splitlines() if ln.startswith("FAIL")]

    def wait_rounds(self, more: int, timeout: float) -> int:
        """Wait until `more` further rounds passed; raises on a failure line or timeout."""
        start, _ = self.progress()
        deadline = time.monotonic() + timeout
        while True:
            done, failed = self.progress()
            if failed:
                raise checks.CheckFailed(f"NVMe DMA in the guest failed: {failed[0]} "
                                         f"(logs: {self.vm.artifacts})")
            if done >= start + more:
                return done
            if time.monotonic() > deadline:
                raise CprTimeout(f"NVMe DMA in the guest made {done - start} of {more} rounds in "
                                 f"{timeout:.0f}s (I/O stalled?); logs: {self.vm.artifacts}")
            time.sleep(0.2)

    def mark(self) -> DmaMark:
        """The guest clock and its offset to the host clock, now (the SSH round trip bounds the error)."""
        t0 = time.time()
        guest = float(self.vm.run("echo $EPOCHREALTIME").stdout.strip().replace(",", "."))
        return DmaMark(guest, (t0 + time.time()) / 2 - guest)

    def measure_stall(self, result: TransferResult, before: DmaMark, after: DmaMark) -> float:
        """The transfer's I/O stall (dma_stall_ms): the longest gap between completed I/Os from the
        mark `before` the transfer to the mark `after` it; set on the result and recorded."""
        log = self.vm.run("cat /tmp/cpr-dma.log", timeout=DMA_LOG_READ_TIMEOUT_S).stdout
        result.dma_stall_ms = dma_stall_ms(log, before, after, result.timeline.get(Phase.SOURCE_STOPPED))
        self.vm.write_transfers(result)
        return result.dma_stall_ms

    def stop(self, timeout: float = DMA_VERIFY_TIMEOUT_S) -> int:
        """Stop, verify every slot, and return the rounds done; raises CheckFailed on any mismatch."""
        self.vm.run("touch /tmp/cpr-dma.stop")
        deadline = time.monotonic() + timeout
        while "DONE" not in (text := self.vm.run("cat /tmp/cpr-dma.log", timeout=DMA_LOG_READ_TIMEOUT_S).stdout):
            if time.monotonic() > deadline:
                raise CprTimeout(f"NVMe DMA did not finish its read-back within {timeout:.0f}s")
            time.sleep(0.2)
        self.log = text
        (self.vm.artifacts / "nvme-dma.log").write_text(text)
        failed = [ln for ln in text.splitlines() if ln.startswith("FAIL")]
        if failed:
            raise checks.CheckFailed("NVMe DMA data not identical:\n  " + "\n  ".join(failed[:10])
                                     + f" (logs: {self.vm.artifacts})")
        return int(text.split("DONE")[-1].split()[0])


def pinned_numbers(pinned: dict[str, LockedMemory]) -> dict[str, int]:
    """The figures for the report: {"old_qemu_vmlck_before": KiB, ...}."""
    out = {}
    for key, memory in pinned.items():
        who, when = key.split("_")
        out[f"{who}_qemu_vmlck_{when}"] = memory.vmlck_kib
        out[f"{who}_qemu_vmpin_{when}"] = memory.vmpin_kib
    return out


IOMMUFD_UNACCOUNTED = ("iommufd pages mapped by a QEMU with CAP_IPC_LOCK are charged to no limit "
                       "(IOPT_PAGES_ACCOUNT_NONE) but counted in its VmPin; IOMMU_IOAS_CHANGE_PROCESS leaves "
                       "such pages (and their VmPin) with the mm of the QEMU that mapped them (the kernel's "
                       "need_charge_update), so the new QEMU shows none: the kernel's rule, not a leak")


def iommufd_unaccounted(before: LockedMemory, backend: Backend | None) -> bool:
    """The old QEMU's iommufd pages were mapped with CAP_IPC_LOCK (IOPT_PAGES_ACCOUNT_NONE)."""
    return backend == Backend.IOMMUFD and before.ipc_lock and before.vmlck_kib == 0


def pinned_problems(pinned: dict[str, LockedMemory], backend: Backend | None = None) -> list[str]:
    """What breaks the promise that a transfer moves the DMA pins' accounting to the new QEMU, given
    the old QEMU's locked+pinned memory before the transfer (old_before), both QEMUs' once it completed
    (old_after, new_after) and the new one's once the old one exited (new_exit): the old one held some
    before (else there is nothing to check), holds none after (not counted twice), the new one holds
    exactly what the old one held, and keeps it when the old one exits (nothing released or leaked).
    iommufd pages a QEMU with CAP_IPC_LOCK mapped stay with the QEMU that mapped them
    (IOMMUFD_UNACCOUNTED): there the old one keeps what it had (none from the second transfer on:
    they stayed with the first) and the new one shows none."""
    need = ("old_before", "old_after", "new_after", "new_exit")
    if missing := [k for k in need if k not in pinned]:
        return [f"figures missing: {', '.join(missing)} (the transfer did not complete, or the watch did "
                "not see it)"]
    before, old, new, new_exit = (pinned[k] for k in need)
    unaccounted = iommufd_unaccounted(before, backend)
    if not before.total_kib and not unaccounted:
        return ["the old QEMU had no locked or pinned memory before the transfer (VFIO pins guest RAM for "
                "DMA: VmLck with a legacy container, VmPin with iommufd): nothing to check"]
    moved_to, left = (old, new) if unaccounted else (new, old)
    problems = []
    if left.total_kib:
        problems.append(f"the {'new' if left is new else 'old'} QEMU accounts {left} after the transfer "
                        f"(counted twice: the {'old' if left is new else 'new'} one accounts {moved_to})")
    if moved_to.total_kib != before.total_kib:
        problems.append(f"the {'old' if moved_to is old else 'new'} QEMU accounts {moved_to} after the transfer, "
                        f"the old one held {before} before it")
    if new_exit.total_kib != new.total_kib:
        problems.append(f"the new QEMU's accounting changed when the old one exited: {new} -> {new_exit}")
    return problems


def exec_pinned_problems(pinned: dict[str, LockedMemory], backend: Backend | None,
                         result: TransferResult) -> list[str]:
    """cpr-exec keeps the process but not its mm: the exec'd QEMU maps the guest RAM again for DMA
    (VFIO_DMA_MAP_FLAG_VADDR, IOMMU_IOAS_CHANGE_PROCESS), and its accounting (exec_after) must equal what
    the old image held before (old_before). iommufd pages mapped with CAP_IPC_LOCK are charged to no
    limit and stay with the mm that mapped them (IOMMUFD_UNACCOUNTED), which the exec dropped: recorded,
    not compared."""
    if "old_before" not in pinned or "exec_after" not in pinned:
        return ["figures missing: the transfer did not complete, or the watch did not see it"]
    before, after = pinned["old_before"], pinned["exec_after"]
    if iommufd_unaccounted(before, backend):
        result.notes.append("cpr-exec: " + IOMMUFD_UNACCOUNTED + f"; before {before}, after the exec {after}")
        return []
    if not before.total_kib:
        return ["the QEMU had no locked or pinned memory before the exec: nothing to check"]
    if after.total_kib != before.total_kib:
        return [f"the exec'd QEMU accounts {after}, the old image held {before}"]
    return []


class HostWatch(Observer):
    """Host side of a transfer: the kernel log, the devices' vfio interrupt lines and the old QEMU's
    open files. As an observer of a transfer it samples the lines right after the target started and
    once the transfer ended, and reads the old QEMU's fds right before it is told to quit."""

    KVM_CLOSE_WAIT_S = 5.0  # the old QEMU closes KVM as the migration completes: a moment's grace

    def __init__(self, addresses: list[str], dev: Path = Path("/dev"), proc: Path = Path("/proc"),
                 backend: Backend | None = None, viommu: bool = False) -> None:
        self.addresses, self.proc, self.backend, self.viommu = addresses, proc, backend, viommu
        self.log = HostKernelLog(dev)
        self.irqs: list[dict[str, IrqLine]] = []
        self.notes: list[str] = []
        self.old_qemu_kvm_files: list[str] = []
        self._old_qemu_containers: int | None = None
        self._target: QemuProcess | None = None
        self.pinned: dict[str, LockedMemory] = {}  # "<old|new>_<before|after|exit>" of the last transfer

    def __enter__(self) -> HostWatch:
        self.log.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.read()
        self.log.close()

    def sample(self) -> None:
        self.irqs.append(vfio.host_vfio_irqs(self.addresses))

    def before_transfer(self, source_pid: int) -> None:
        """Read the old QEMU's locked and pinned memory before a transfer (the figures it must hand on)."""
        self.pinned = {"old_before": procfds.locked_memory(source_pid, self.proc)}

    def on_spawned(self, target: QemuProcess) -> None:
        self._target = target
        self.sample()

    def on_before_retire(self, source: QemuProcess) -> None:
        self.old_qemu_kvm_files = procfds.wait_kvm_closed(source.pid, self.KVM_CLOSE_WAIT_S, self.proc)
        self._old_qemu_containers = procfds.vfio_containers(procfds.open_files(source.pid, self.proc))
        if "old_before" in self.pinned and self._target is not None:
            self.pinned["old_after"] = procfds.locked_memory(source.pid, self.proc)
            self.pinned["new_after"] = procfds.locked_memory(self._target.pid, self.proc)

    def on_result(self, result: TransferResult) -> None:
        if result.status == "completed":
            self.sample()
            if result.mode == Mode.CPR_EXEC and "old_before" in self.pinned and result.target_pid is not None:
                # one process: the exec'd image's mm must account what the old image's did
                self.pinned["exec_after"] = procfds.locked_memory(result.target_pid, self.proc)
            result.old_qemu_kvm_fds = len(self.old_qemu_kvm_files)
            result.vfio_containers = self._old_qemu_containers
            if "new_after" in self.pinned and self._target is not None:  # the old QEMU has exited now
                self.pinned["new_exit"] = procfds.locked_memory(self._target.pid, self.proc)
            result.pinned_kib = pinned_numbers(self.pinned)
            if "old_before" in self.pinned and iommufd_unaccounted(self.pinned["old_before"], self.backend):
                result.notes.append(IOMMUFD_UNACCOUNTED)

    def check_pinned_moved(self, result: TransferResult, logs: object = None) -> None:
        """VFIO CPR's accounting promise (VFIO_DMA_MAP_FLAG_VADDR / IOMMU_IOAS_CHANGE_PROCESS): see
        pinned_problems. Not with a guest vIOMMU: the guest maps and unmaps through it while the
        transfer runs, so what is pinned changes on its own; recorded, not compared (in the virtual host
        the new QEMU's iommufd VmPin even went below zero, 18446744073709551596 kB, with a vIOMMU)."""
        if self.viommu:
            result.notes.append("pinned memory recorded, not compared: the guest has a vIOMMU")
            return
        problems = (exec_pinned_problems(self.pinned, self.backend, result) if result.mode == Mode.CPR_EXEC
                    else pinned_problems(self.pinned, self.backend))
        if problems:
            raise checks.CheckFailed(f"transfer {result.index}: locked/pinned memory did not move to the new "
                                     f"QEMU: " + "; ".join(problems) + f" (logs: {logs})")

    def check_kvm_closed(self, result: TransferResult, logs: object = None) -> None:
        """The irq bypass -16 fix (QEMU 7ed0919119): after a completed VFIO cpr-transfer the old QEMU
        holds no /dev/kvm, VM or vCPU fd, else the new KVM cannot take the device's irq bypass."""
        if self.old_qemu_kvm_files:
            raise checks.CheckFailed(f"transfer {result.index}: the old QEMU still held {self.old_qemu_kvm_files} "
                                     f"{self.KVM_CLOSE_WAIT_S:g} s after the migration completed (QEMU closes KVM "
                                     f"after a VFIO cpr-transfer) (logs: {logs})")

    def check_log(self, logs: object = None) -> None:
        bad = self.log.failures()
        if bad:
            raise checks.CheckFailed("host kernel log during the transfer:\n  " + "\n  ".join(bad[:10])
                                     + f" (logs: {logs})")

    def check_irqs(self, logs: object = None) -> dict[str, dict[str, int]]:
        """With samples [pre0, pre1, post0, post1]: host vfio lines that counted before the transfer
        count after it (lines that never count: interrupts posted straight to the guest)."""
        if len(self.irqs) < 4:
            raise ValueError("check_irqs needs four samples: two before the transfer, two after")
        pre0, pre1, post0, post1 = self.irqs[-4:]

        def fired(a: dict[str, IrqLine], b: dict[str, IrqLine]) -> dict[str, int]:
            return {k: b[k].total - a[k].total for k in b if k in a and b[k].total > a[k].total}

        before, after = fired(pre0, pre1), fired(post0, post1)
        if not pre1:
            self.notes.append(f"no vfio lines in the host's /proc/interrupts for {self.addresses}")
        elif not before:
            self.notes.append("host vfio lines did not count before the transfer (interrupts posted "
                              "to the guest)")
        silent = {k: n for k, n in before.items() if k not in after}
        if silent:
            raise checks.CheckFailed(f"host vfio interrupt lines stopped counting after the transfer: "
                                     f"{silent} (before: {before}, after: {after}) (logs: {logs})")
        return {"before": before, "after": after}


class PassthroughGuest:
    """A booted guest with the test's VFIO devices, and the traffic that runs over them."""

    def __init__(self, vm: CprVM, devices: VfioDevices) -> None:
        self.vm, self.devices = vm, devices
        self.link_settled_s: float | None = None  # guest uptime when nic_traffic had set up the peers

    @property
    def nics(self) -> list[tuple[DeviceConfig, Passthrough]]:
        return self.devices.nics

    @property
    def nvmes(self) -> list[tuple[DeviceConfig, Passthrough]]:
        return self.devices.with_role(Role.NVME)

    def guest_ifname(self, dev: Passthrough, timeout: float = DEVICE_APPEAR_TIMEOUT_S) -> str:
        out = self.vm.run(f"for i in $(seq {int(timeout * 10)}); do n=$(ls /sys/bus/pci/devices/"
                          f"{dev.guest_address}/net 2>/dev/null | head -1); [ -n \"$n\" ] && break; "
                          'sleep 0.1; done; echo "$n"', timeout=timeout + GUEST_SHELL_MARGIN_S).stdout.strip()
        if not out:
            raise CprTimeout(f"no network interface at guest PCI {dev.guest_address} within {timeout:.0f}s "
                             f"(driver missing in the guest kernel?); logs: {self.vm.artifacts}")
        return out

    def nic_irq_pattern(self, dev: Passthrough) -> str:
        """Guest MSI-X vectors of a passthrough NIC: '<ifname>-TxRx-<n>' (igb), '<ifname>' (other)."""
        return rf"^{self.guest_ifname(dev)}(-|$)"

    def nic_traffic(self, nic: tuple[DeviceConfig, Passthrough] | None = None, tcp: bool = True) -> Traffic:
        """Probe + TCP stream over a passthrough NIC: its cabled peer port is moved into the guest's
        network namespace (and back at the end), traffic goes guest_ip <-> peer_ip."""
        config, _ = self.connect_peer(nic)
        assert config.peer_ip and config.guest_ip
        return self.vm.traffic(tcp=tcp, target=config.guest_ip.split("/")[0],
                               host_ip=config.peer_ip.split("/")[0])

    def connect_peer(self, nic: tuple[DeviceConfig, Passthrough] | None = None) -> tuple[DeviceConfig, str]:
        """(config, guest ifname) of a passthrough NIC, addressed and up, its cabled peer port moved
        into the guest's network namespace (once; back at the end) and the link settled."""
        config, dev = nic or self.nics[0]
        assert config.peer_interface and config.peer_ip and config.guest_ip
        ifname = self.guest_ifname(dev)  # guest-setup addressed it from cpr.net<N>; make sure of it
        self.vm.run(f"ip addr replace {config.guest_ip} dev {ifname} && ip link set {ifname} up")
        if config.peer_interface not in self.vm.network.adopted:
            self.vm.network.adopt_interface(config.peer_interface, config.peer_ip)  # takes its link down once
            self.link_settled_s = self._link_settled(ifname)
        return config, ifname

    LINK_SETTLE_S = 3.0  # igb's watchdog reports a link change within 2 s

    def _link_settled(self, ifname: str, timeout: float = DEVICE_APPEAR_TIMEOUT_S) -> float:
        """Guest uptime once the NIC has carrier again after its peer port moved (and the driver had
        time to report the link change that caused)."""
        carrier = f"[ \"$(cat /sys/class/net/{ifname}/carrier 2>/dev/null)\" = 1 ]"
        out = self.vm.run(f"for i in $(seq {int(timeout * 10)}); do {carrier} && break; sleep 0.1; done; "
                          f"sleep {self.LINK_SETTLE_S:g}; {carrier} && echo up; cut -d' ' -f1 /proc/uptime",
                          timeout=timeout + self.LINK_SETTLE_S + GUEST_SHELL_MARGIN_S).stdout.split()
        if out[:1] != ["up"]:
            raise CprTimeout(f"guest NIC {ifname} has no carrier {timeout:.0f}s after its peer port came up "
                             f"(cable? peer_interface in the host config?); logs: {self.vm.artifacts}")
        return float(out[-1])

    def nvme_dma(self, nvme: tuple[DeviceConfig, Passthrough] | None = None) -> NvmeDma:
        config, dev = nvme or self.nvmes[0]
        return NvmeDma(self.vm, dev.guest_address, config.test_area_mib)

    def host_watch(self) -> HostWatch:
        return HostWatch(self.devices.addresses, self.devices.host.paths.dev, backend=self.devices.backend,
                         viommu=self.vm.config.viommu)

    def check_guest_log(self) -> None:
        """No driver trouble in the guest kernel log: no lost interrupts or DMA, no NIC reset, no link
        down (but the one the harness causes when it moves a NIC's peer port into the namespace)."""
        checks.assert_clean_dmesg(self.vm.collect_dmesg(), self.vm.artifacts, self.link_settled_s)

    def nvme_transfer(self, thresholds: dict[str, float | None], max_dma_stall_ms: float | None) -> TransferResult:
        """One checked transfer (transfer_checked, probes over the virtio NIC) while O_DIRECT writes of
        random data run on the first passthrough NVMe's test area, each read back and compared: rounds
        complete after it, every slot reads back identical at the end, no I/O error in the guest, the
        host kernel log is clean, host vfio lines and the controller's vectors keep firing, and the I/O
        stall across the transfer (dma_stall_ms) is within `max_dma_stall_ms`."""
        dma = self.nvme_dma()
        dma.find()
        dma.start()
        with self.host_watch() as watch, self.vm.traffic() as traffic:
            dma.wait_rounds(3, DMA_ROUND_TIMEOUT_S)
            before = dma.mark()
            result = self.transfer_checked(traffic, dma.irq_pattern, watch, **thresholds)
            dma.wait_rounds(3, DMA_ROUND_TIMEOUT_S)
            dma.measure_stall(result, before, dma.mark())
            self.check_host(watch)
        dma.stop()
        self.check_guest_log()
        if not (result.interrupts and result.interrupts["after"]):
            raise checks.CheckFailed(f"NVMe vectors silent after the transfer (logs: {self.vm.artifacts})")
        checks.assert_dma_stall(result, max_dma_stall_ms, self.vm.artifacts)
        return result

    def transfer_checked(self, traffic: Traffic, irq_pattern: str, watch: HostWatch,
                         max_blackout_ms: float | None = None,
                         max_lost_probes: float | None = None) -> TransferResult:
        """vm.live_update with host samples around it: guest vectors and host vfio lines keep counting,
        and neither the main NIC nor a passthrough NIC was reset or flapped (carrier_changes)."""
        links = (self.vm.ifname_of(), *(self.guest_ifname(dev) for _, dev in self.nics))
        watch.sample()
        watch.before_transfer(self.vm.current.pid)
        with self.vm.observing(watch):  # samples inside live_update's windows, around the transfer
            result = self.vm.live_update(traffic, irq_pattern=irq_pattern, max_blackout_ms=max_blackout_ms,
                                         max_lost_probes=max_lost_probes, links=links)
        watch.sample()
        result.notes += watch.notes
        if self.vm.config.accel == Accel.KVM:
            watch.check_kvm_closed(result, self.vm.artifacts)
        watch.check_pinned_moved(result, self.vm.artifacts)
        return result

    def check_host(self, watch: HostWatch) -> None:
        """Host side of the last transfer: kernel log clean, vfio interrupt lines still counting."""
        watch.check_log(self.vm.artifacts)
        watch.check_irqs(self.vm.artifacts)

    def nic_traffic_through_transfers(self, count: int, thresholds: dict[str, float | None],
                                      after_each: Callable[[TransferResult], None] | None = None
                                      ) -> list[TransferResult]:
        """Probe + TCP stream over the first passthrough NIC (guest_ip <-> its cabled peer port) through
        `count` checked transfers to the configured target build: every probe stream recovers, the
        stream arrives intact, the NIC's MSI-X vectors that fired before fire after, the host's vfio
        lines keep counting, both kernel logs stay clean. `after_each`: more checks after each one."""
        pattern = self.nic_irq_pattern(self.nics[0][1])
        results = []
        with self.host_watch() as watch, self.nic_traffic() as traffic:
            for _ in range(count):
                results.append(self.transfer_checked(traffic, pattern, watch, **thresholds))
                self.check_host(watch)
                if after_each is not None:
                    after_each(results[-1])
        checks.assert_stream_intact(traffic.stream_result, self.vm.artifacts)
        self.check_guest_log()
        if silent := [i for i, r in enumerate(results) if not (r.interrupts and r.interrupts["after"])]:
            raise checks.CheckFailed(f"the NIC's vectors did not fire after transfer(s) {silent}; "
                                     f"logs {self.vm.artifacts}")
        return results

    def check_source_kept(self, traffic: Traffic, boot_id: str, why: object) -> None:
        """After a refused or failed transfer: the source QEMU runs the guest on (the one QEMU
        generation: the target is gone), the NIC of `traffic` answers 50 probes, same boot. `why`:
        what the transfer was refused for, in the messages."""
        vm = self.vm
        status = vm.current.qmp.execute("query-status")["status"]
        if status != "running":
            raise checks.CheckFailed(f"the source must keep running the guest after the refusal ({why}): "
                                     f"{status}; logs {vm.artifacts}")
        traffic.wait_answers(50, 60.0)
        if len(vm.generations) != 1:
            raise checks.CheckFailed(f"the refused target QEMU must be gone: {len(vm.generations)} QEMU generations")
        if (now := vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()) != boot_id:
            raise checks.CheckFailed(f"the guest rebooted through the refusal: boot_id {boot_id} -> {now}")


def refusal_problem(error: TransferFailed, blocked_reasons: list[str]) -> str | None:
    """Why a refused transfer was not refused for a migration blocker, or None: `migrate` itself must
    be answered with an error naming one of QEMU's blocked-reasons (query-migrate), not fail later."""
    cause = error.__cause__
    if not (isinstance(cause, QmpError) and cause.command == "migrate"):
        return f"the transfer failed, but not as the answer to `migrate` (a blocker's refusal): {error}"
    if not blocked_reasons:
        return f"`migrate` was refused, but QEMU lists no blocked-reasons: {error}"
    if not any(reason in str(error) for reason in blocked_reasons):
        return f"`migrate` was refused for another reason than its blockers {blocked_reasons}: {error}"
    return None


MEMLOCK_WRAPPER = """#!{python}
# {qemu} without CAP_IPC_LOCK (the pins are charged to RLIMIT_MEMLOCK) and with RLIMIT_MEMLOCK {limit}
import ctypes, os, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(24, 14, 0, 0, 0):  # PR_CAPBSET_DROP, CAP_IPC_LOCK: exec then grants root no ipc_lock
    sys.exit("memlock wrapper: PR_CAPBSET_DROP CAP_IPC_LOCK: " + os.strerror(ctypes.get_errno()))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
if any(int(status.get(k, "0"), 16) & (1 << 14) for k in ("CapInh", "CapAmb")):
    sys.exit("memlock wrapper: CAP_IPC_LOCK is inheritable or ambient here: exec would keep it")
resource.setrlimit(resource.RLIMIT_MEMLOCK, ({limit}, {limit}))
os.execv({qemu!r}, [{qemu!r}] + sys.argv[1:])
"""


def memlock_limited(build: QemuBuild, limit_bytes: int, folder: Path) -> QemuBuild:
    """`build` run through a wrapper (same PID: it execs QEMU) that drops CAP_IPC_LOCK and sets
    RLIMIT_MEMLOCK to `limit_bytes`, so the kernel charges the DMA pins QEMU takes over to that limit."""
    wrapper = folder / f"qemu-memlock-{limit_bytes}"
    wrapper.write_text(MEMLOCK_WRAPPER.format(python=sys.executable, qemu=build.binary, limit=limit_bytes))
    wrapper.chmod(0o755)
    return dataclasses.replace(build, binary=str(wrapper))


NO_MDEV = ("host config {path} names no [[mdev]]; to run the mdev tests, load a parent driver (e.g. "
           "`modprobe mtty`) and add [[mdev]] with parent = \"mtty\" and type = \"mtty-2\" "
           "(docs/hardware-runners.md)")


def mdev_unavailable(config: HostConfig, source: QemuBuild, target: QemuBuild,
                     backend: Backend = Backend.LEGACY) -> str | None:
    """Why this host or QEMU cannot run an mdev test on `backend`, or None. QEMU's mdev blocker belongs
    to the legacy container of its VFIO CPR support (QEMU >= 10.1): a build without VFIO CPR refuses
    for another reason, so it cannot show this one. On iommufd the mdev is opened through its vfio
    cdev (kernel CONFIG_VFIO_DEVICE_CDEV: /dev/vfio/devices) with an iommufd access (/dev/iommu)."""
    if not config.mdevs:
        return NO_MDEV.format(path=config.path)
    if backend == Backend.IOMMUFD:  # its vfio cdev is known once the instance exists: Mdev.cdev
        if not (config.paths.dev / "iommu").exists():
            return f"no {config.paths.dev / 'iommu'}: run `modprobe iommufd` (kernel with CONFIG_IOMMUFD)"
    elif not (config.paths.dev / "vfio" / "vfio").exists():
        return (f"no {config.paths.dev / 'vfio' / 'vfio'}: an mdev is tested on the legacy VFIO container; "
                "run `modprobe vfio` (kernel with CONFIG_VFIO_CONTAINER and vfio_iommu_type1)")
    unavailable, blockers = build_reasons(source, target, backend)
    return "; ".join(unavailable + blockers) or None
