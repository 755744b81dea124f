"""The virtual hardware host (tier 2): an L1 VM that looks to the plugin like a hardware runner.

L1 runs under TCG here (KVM where it boots a guest) with an emulated VT-d (intel-iommu with
interrupt remapping and caching mode), an igb NIC and an NVMe controller, each behind its own PCIe
root port, and a second NIC (the "peer port") cabled to the igb's wire through a QEMU hub. Inside
L1, TCG's ``-cpu max`` offers AMD SVM, so kvm_amd loads and the L2 guests run on KVM.

The working tree (the code under test), the guest image and an artifacts folder are shared into L1
over virtio-9p (/mnt/src and /mnt/guest read-only, /mnt/out writable). The harness talks to L1
through a small agent on a virtio console (see images/vhost/vhost-agent): it writes the host config
file the plugin reads, runs pytest on the given arguments and brings back the exit status, the
JUnit XML and the artifacts.

    python -m pytest_cpr.vhost run [--accel auto|tcg|kvm] [...] -- tests/hardware -x
    with VirtualHost(VhostConfig.from_cache(...)) as l1: l1.run("lspci -nn")

Inside L1: ``python -m pytest_cpr.vhost hostconfig --out /run/cpr/host.toml``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import codecs
import contextlib
import gzip
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_cpr.errors import CprError, CprSettingError, CprTimeout, QemuExited
from pytest_cpr.images import cached_path, default_cache_dir, guest_image_dir, verify_existing
from pytest_cpr.ioctl_faults import build_shim
from pytest_cpr.progress import heartbeat
from pytest_cpr.qemu.native import TCG_DISCON_SOURCE, build_shared
from pytest_cpr.qemu.probe import kvm_boots, resolve_binary
from pytest_cpr.qemu.process import QemuProcess, tail

SOURCE_TREE = Path(__file__).resolve().parent.parent
IGB = "8086:10c9"  # QEMU's igb (82576)
E1000E = "8086:10d3"  # QEMU's e1000e (82574L): its guest driver's IntMode picks INTx, MSI or MSI-X
NVME = "1b36:0010"  # QEMU's NVMe controller
MTTY, MTTY_TYPES = "mtty", ("mtty-2", "mtty-1")  # the kernel's mdev sample: parent, types (preferred first)
PEER_MAC = "52:54:00:c9:00:02"
PEER_NAME = "cprpeer0"  # the peer port's name inside L1 (renamed by vhost-init)
IGB_MAC = "52:54:00:c9:00:01"
E1000E_MAC = "52:54:00:c9:00:03"
GUEST_NET = ("10.78.0.2/24", "10.78.0.1/24")  # (L2 on the igb, peer port inside the test's netns)
# the e1000e hangs on the same wire (hub 0) and has the same peer port, on a subnet of its own
GUEST_NET_E1000E = ("10.79.0.2/24", "10.79.0.1/24")
L1_SRC, L1_GUEST, L1_OUT = "/mnt/src", "/mnt/guest", "/mnt/out"
# The second QEMU build of the cross-version passthrough tests (images/qemu-forky, when cached): shared
# read-only, mounted here by the harness (not vhost-init: that would change the vhost image's recipe)
CROSS_IMAGE, L1_CROSS = "qemu-forky", "/mnt/cross"
L1_HOST_CONFIG = "/run/cpr/host.toml"
L1_PYTHON = "/opt/cpr-venv/bin/python"
VHOST_FILES = ("vmlinuz", "initrd.img", "rootfs.img")
Sink = Callable[[str], None]


# ---- inside L1: the host config file -------------------------------------------------------------

def find_pci(vendor_device: str, sysfs: Path = Path("/sys")) -> list[str]:
    """PCI addresses of every device with this vendor:device ID, sorted."""
    vendor, device = (f"0x{part.lower()}" for part in vendor_device.split(":"))
    found = []
    for dev in sorted((sysfs / "bus/pci/devices").glob("*")):
        try:
            ids = ((dev / "vendor").read_text().strip(), (dev / "device").read_text().strip())
        except OSError:
            continue
        if ids == (vendor, device):
            found.append(dev.name)
    return found


@dataclass(frozen=True)
class L1Facts:
    """What the generated host config is made from (all found inside L1)."""

    nic: str
    nvme: str
    peer_interface: str
    iommufd: bool
    kvm: bool
    kernel: str
    qemu: str = "/usr/bin/qemu-system-x86_64"
    mdev_type: str | None = None  # an mtty type when the kernel has the mtty sample (the custom kernel)
    nic_e1000e: str | None = None  # the e1000e (role nic-e1000e), when L1 has one


def iommufd_reason(facts: L1Facts) -> str:
    return (f"/dev/iommu is absent: kernel {facts.kernel} is built without CONFIG_IOMMUFD (Debian's is); "
            "boot L1 with the iommufd-capable kernel: `cpr-image build vhost-kernel` (11-17 min, cached)")


def host_config_text(facts: L1Facts) -> str:
    """The host config TOML for L1, in the format a hardware runner admin writes by hand."""
    backends = ["legacy"] + (["iommufd"] if facts.iommufd else [])
    lines = [
        "# Generated inside the pytest-cpr virtual host (L1) by `python -m pytest_cpr.vhost hostconfig`.",
        *([] if facts.iommufd else [f"# iommufd not listed: {iommufd_reason(facts)}"]),
        *([] if facts.kvm else ["# /dev/kvm absent in L1: L2 falls back to TCG (VFIO cpr-transfer "
                                "crashes QEMU 11.x there)"]),
        "[host]",
        'name = "cpr-vhost (L1 VM: emulated VT-d, igb, NVMe)"',
        f'qemu = "{facts.qemu}"',
        f"backends = {json.dumps(backends)}",
        'memory = "512M"',
        f'accel = "{"kvm" if facts.kvm else "tcg"}"',
        "",
        "[[device]]",
        f'address = "{facts.nic}"',
        'role = "nic"',
        f'guest_ip = "{GUEST_NET[0]}"',
        f'peer_interface = "{facts.peer_interface}"',
        f'peer_ip = "{GUEST_NET[1]}"',
        "",
        "[[device]]",
        f'address = "{facts.nvme}"',
        'role = "nvme"',
        "test_area_mib = 64",
    ]
    if facts.nic_e1000e:  # after the igb: tests that ask for role "nic" keep the igb
        lines += ["", "# an e1000e on the igb's wire: the blackout-interrupt tests choose its interrupt mode",
                  "[[device]]", f'address = "{facts.nic_e1000e}"', 'role = "nic-e1000e"',
                  f'guest_ip = "{GUEST_NET_E1000E[0]}"', f'peer_interface = "{facts.peer_interface}"',
                  f'peer_ip = "{GUEST_NET_E1000E[1]}"']
    else:
        lines += [f"# no nic-e1000e: no e1000e ({E1000E}) in this L1"]
    if facts.mdev_type:
        lines += ["", "# the kernel's mtty sample: a mediated device QEMU must refuse to cpr-transfer",
                  "[[mdev]]", f'parent = "{MTTY}"', f'type = "{facts.mdev_type}"']
    else:
        lines += [f"# no [[mdev]]: kernel {facts.kernel} has no mtty sample (CONFIG_SAMPLE_VFIO_MDEV_MTTY)"]
    return "\n".join(lines) + "\n"


def gather_facts(sysfs: Path = Path("/sys"), dev: Path = Path("/dev"),
                 peer_interface: str = PEER_NAME) -> L1Facts:
    """Find the emulated igb and NVMe by vendor:device; fail with what is missing."""
    nics, nvmes, e1000es = find_pci(IGB, sysfs), find_pci(NVME, sysfs), find_pci(E1000E, sysfs)
    if len(e1000es) > 1:
        raise CprError(f"virtual host: expected at most one e1000e ({E1000E}) in {sysfs}/bus/pci, found {e1000es}")
    if len(nics) != 1 or len(nvmes) != 1:
        raise CprError(f"virtual host: expected one igb ({IGB}) and one NVMe ({NVME}) in {sysfs}/bus/pci, "
                       f"found {nics} and {nvmes}")
    if not (sysfs / "class/net" / peer_interface).exists():
        raise CprError(f"virtual host: peer port {peer_interface} missing from {sysfs}/class/net "
                       "(vhost-init renames the NIC with MAC {PEER_MAC})")
    types = sysfs / "class/mdev_bus" / MTTY / "mdev_supported_types"
    mdev_type = next((t for t in MTTY_TYPES if (types / t).is_dir()), None)
    return L1Facts(nic=nics[0], nvme=nvmes[0], peer_interface=peer_interface,
                   iommufd=(dev / "iommu").exists(), kvm=(dev / "kvm").exists(), kernel=os.uname().release,
                   mdev_type=mdev_type, nic_e1000e=e1000es[0] if e1000es else None)


# ---- on L0: the agent channel ---------------------------------------------------------------------

@dataclass(frozen=True)
class AgentResult:
    command: str
    exit_code: int
    output: str
    seconds: float

    def check(self) -> AgentResult:
        if self.exit_code != 0:
            raise CprError(f"virtual host: {self.command!r} failed with exit code {self.exit_code}:\n"
                           f"{self.output[-3000:]}")
        return self


class AgentChannel:
    """The harness end of images/vhost/vhost-agent, over QEMU's chardev socket of the virtio console.
    Everything received is appended to `log_path`."""

    def __init__(self, sock: socket.socket, log_path: Path, alive: Callable[[], str | None]) -> None:
        self._sock = sock
        self.log_path = log_path
        self._alive = alive  # None while QEMU runs, else why it exited
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._log = log_path.open("a", encoding="utf-8")

    def _receive(self, deadline: float, what: str, sink: Sink | None) -> None:
        ready, _, _ = select.select([self._sock], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if not ready:
            if (reason := self._alive()) is not None:
                raise QemuExited(f"virtual host exited while waiting for {what}: {reason}")
            return
        chunk = self._sock.recv(65536)
        if not chunk:  # QEMU closes the socket as it exits: give the exit a moment to be reaped
            end = time.monotonic() + 5.0
            while (reason := self._alive()) is None and time.monotonic() < end:
                time.sleep(0.05)
            raise QemuExited(f"virtual host agent socket closed while waiting for {what}: "
                             f"{reason or 'QEMU still running'}; agent log {self.log_path}")
        text = self._decoder.decode(chunk)
        self._log.write(text)
        self._log.flush()
        if sink is not None:
            sink(text)
        self._buffer += text

    def expect(self, pattern: str, timeout: float, what: str, sink: Sink | None = None,
               quiet_check: Callable[[], None] | None = None, quiet_after: float = 90.0) -> re.Match[str]:
        """Wait for a regex in the agent's output; consumes the output up to the end of the match.
        After `quiet_after` seconds without output, `quiet_check` runs (it raises if L1 is stuck)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while (match := regex.search(self._buffer)) is None:
            if time.monotonic() > deadline:
                raise CprTimeout(f"virtual host: {what} not seen within {timeout:.0f}s; agent log "
                                 f"{self.log_path}:\n{tail(self.log_path, 8)}")
            size = len(self._buffer)
            self._receive(deadline, what, sink)
            if len(self._buffer) != size:
                last = time.monotonic()
            elif quiet_check is not None and time.monotonic() - last > quiet_after:
                quiet_check()
                last = time.monotonic()
        return match

    def run(self, command: str, timeout: float, sink: Sink | None = None,
            quiet_check: Callable[[], None] | None = None) -> AgentResult:
        """Run a bash command in L1; output is streamed to `sink` as it arrives."""
        token = uuid.uuid4().hex[:12]
        payload = base64.b64encode(command.encode()).decode()
        t0 = time.monotonic()
        self._log.write(f"\n>>> [{token}] {command}\n")
        self._sock.sendall(f"{token} {payload}\n".encode())
        match = self.expect(rf"@@CPR-DONE {token} (\d+)@@\n?", timeout, f"the end of {command!r}", sink,
                            quiet_check)
        output = self._buffer[:match.start()]
        self._buffer = self._buffer[match.end():]
        return AgentResult(command, int(match.group(1)), output, time.monotonic() - t0)

    def close(self) -> None:
        self._log.close()
        with contextlib.suppress(OSError):
            self._sock.close()


# ---- on L0: the L1 VM ------------------------------------------------------------------------------

def l1_qemu(wanted: str, cache: Path, plugin: bool = False) -> str:
    """The QEMU that runs L1. auto: the cached qemu-l0 build (Debian's 10.0 source with our fix of TCG's
    hflags2 race, images/qemu-l0: without it another vCPU's XRSTOR can undo CPU 0's GIF and nested-paging
    bits, which reset L2 guests and L1 itself; read in 10.0.13's source, and 11.1.3 fails the same way;
    docs/virtual-host.md, "The emulator's race"), else the cached qemu-next build (QEMU 11.x), else the
    system's. With `plugin` (the TCG plugin of CPR_VHOST_TRACE needs plugin API 7, QEMU >= 10.1)
    qemu-l0 is passed over."""
    if wanted != "auto":
        return wanted
    for name in ("qemu-next",) if plugin else ("qemu-l0", "qemu-next"):
        built = cached_path(name, cache) / "bin/qemu-system-x86_64"
        if built.is_file():
            return str(built)
    return "qemu-system-x86_64"


def l1_kernel(wanted: str, cache: Path) -> Path | None:
    """L1's kernel. auto: the iommufd-capable build (`cpr-image build vhost-kernel`) when cached, else
    the vhost image's Debian kernel (legacy VFIO only); distro: always Debian's; iommufd: the
    custom build, which must exist; anything else: a bzImage path."""
    custom = cached_path("vhost-kernel", cache) / "vmlinuz"
    if wanted == "auto":
        return custom if custom.is_file() else None
    if wanted == "distro":
        return None
    if wanted == "iommufd":
        if not custom.is_file():
            raise CprSettingError(f"CPR_VHOST_KERNEL=iommufd: {custom} is not built: run `cpr-image build "
                                  "vhost-kernel` (11-17 min on two cores) or use CPR_VHOST_KERNEL=auto")
        return custom
    return Path(wanted)


@dataclass(frozen=True)
class VhostConfig:
    """Everything that decides how L1 boots. `accel` auto: KVM if it boots a guest kernel here."""

    image: Path  # the built images/vhost (vmlinuz, initrd.img, rootfs.img)
    guest_image: Path  # the built images/guest, shared read-only as /mnt/guest
    artifacts: Path  # this run's folder on L0; its inner/ is /mnt/out in L1
    qemu: str = "qemu-system-x86_64"
    kernel: Path | None = None  # L1's kernel; None: the vhost image's Debian kernel (no iommufd)
    accel: str = "auto"
    memory: str = "5G"
    cpus: int = 2
    source_tree: Path = SOURCE_TREE
    boot_timeout: float = 240.0
    nvme_mib: int = 256
    junit_dir: Path | None = None  # where the inner JUnit XML is copied (default: <artifacts>/junit)
    append: str = ""  # extra L1 kernel parameters (e.g. kvm_amd.vgif=0), after ours
    tcg_thread: str = "multi"  # TCG's thread mode for L1: multi (a host thread per vCPU) or single
    tb_size: int = 512  # MiB of TCG translation cache for L1 (`info jit` in l1-jit.txt: flushes)
    cpu: str = "max"  # L1's CPU model under TCG (it must offer SVM: L2 runs on KVM inside L1)
    cross: Path | None = None  # the cached images/qemu-forky entry, shared as L1_CROSS (None: not built)
    qemu_args: tuple[str, ...] = ()  # extra arguments of L1's QEMU (CPR_VHOST_QEMU_ARGS), e.g. -d flags
    trace: bool = False  # CPR_VHOST_TRACE=1: under TCG, each vCPU's last interrupts and exceptions; L1's KVM trace

    @classmethod
    def from_cache(cls, artifacts: Path, cache_dir: Path | None = None, qemu: str | None = None,
                   kernel: str | None = None, **overrides: object) -> VhostConfig:
        """Images from the cache of the current recipes (`cpr-image build vhost`, `cpr-image build guest`,
        and `cpr-image build qemu-l0` / `qemu-next` / `vhost-kernel` when built); see `l1_qemu` and
        `l1_kernel`."""
        cache = cache_dir or default_cache_dir()
        guest = guest_image_dir(os.environ.get("CPR_IMAGE"), cache)
        trace = os.environ.get("CPR_VHOST_TRACE") == "1"
        l0_qemu = l1_qemu(qemu or os.environ.get("CPR_VHOST_QEMU") or "auto", cache, plugin=trace)
        l0_kernel = l1_kernel(kernel or os.environ.get("CPR_VHOST_KERNEL") or "auto", cache)
        cross = cached_path(CROSS_IMAGE, cache)
        # cache entries are checked against their manifests: root runs this QEMU and boots these files
        for used in (cached_path("vhost", cache), guest, Path(l0_qemu).parent.parent, l0_kernel and l0_kernel.parent,
                     cross):
            if used:
                verify_existing(used)
        return cls(image=cached_path("vhost", cache), guest_image=guest, artifacts=artifacts,
                   qemu=l0_qemu, kernel=l0_kernel, cross=cross if cross.is_dir() else None,
                   append=os.environ.get("CPR_VHOST_APPEND", ""),
                   tcg_thread=os.environ.get("CPR_VHOST_TCG_THREAD", "multi"),
                   tb_size=int(os.environ.get("CPR_VHOST_TB_SIZE", "512")),
                   qemu_args=tuple(shlex.split(os.environ.get("CPR_VHOST_QEMU_ARGS", ""))),
                   trace=trace, **overrides)  # type: ignore[arg-type]

    @property
    def vmlinuz(self) -> Path:
        return self.kernel or self.image / "vmlinuz"

    def validate(self) -> None:
        for f in VHOST_FILES:
            if not (self.image / f).is_file():
                raise CprSettingError(f"virtual host image {self.image} has no {f}: build it with "
                                      "`cpr-image build vhost` (minutes; needs root and the Debian mirror)")
        for f in ("vmlinuz-full", "initrd-full.img", "rootfs.img"):
            if not (self.guest_image / f).is_file():
                raise CprSettingError(f"guest image {self.guest_image} has no {f}: build it with "
                                      "`cpr-image build guest` (the L2 guest needs its 'full' kernel)")
        if self.kernel is not None and not self.kernel.is_file():
            raise CprSettingError(f"virtual host kernel {self.kernel} does not exist (CPR_VHOST_KERNEL / "
                                  "--kernel): build it with `cpr-image build vhost-kernel`")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise CprSettingError(f"virtual host accel {self.accel!r}: use auto, kvm or tcg")
        if self.tcg_thread not in ("multi", "single"):
            raise CprSettingError(f"virtual host TCG thread mode {self.tcg_thread!r} (CPR_VHOST_TCG_THREAD): "
                                  "use multi or single")


@dataclass(frozen=True)
class InnerRun:
    """The outcome of one pytest run inside L1, brought back to L0."""

    exit_code: int
    junit: Path | None
    artifacts: Path
    seconds: float
    log: Path


def l1_argv(cfg: VhostConfig, qemu: str, accel: str, rundir: Path, nvme_image: Path) -> list[str]:
    """The L1 command line: q35 + VT-d, igb, NVMe and e1000e each behind a root port, the igb's and
    the e1000e's wires and the peer port joined on hub 0, the 9p shares (a fourth with the
    cross-version build when cached), the agent consoles, QMP."""
    tcg = accel == "tcg"
    inner = cfg.artifacts / "inner"
    # no_timer_check: Linux's boot test of the IO-APIC timer counts ticks in a busy loop, which TCG on a
    # loaded host cannot serve in time; with interrupt remapping a failed test is a panic ("timer
    # doesn't work through Interrupt-remapped IO-APIC"), i.e. an L1 reset at boot (stability rounds of
    # 2026-11-26 at host load 19)
    append = (f"console=ttyS0 intel_iommu=on no_timer_check panic=-1 quiet cpr.peer={PEER_MAC},{PEER_NAME} "
              f"{cfg.append}").rstrip()
    return [
        qemu, "-name", "cpr-vhost,debug-threads=on",
        "-accel", f"tcg,thread={cfg.tcg_thread},tb-size={cfg.tb_size}" if tcg else "kvm",
        "-machine", "q35,kernel-irqchip=split", "-cpu", cfg.cpu if tcg else "host",
        "-smp", str(cfg.cpus), "-m", cfg.memory,
        "-nodefaults", "-no-user-config", "-display", "none",
        # an L1 reset (triple fault, or panic=-1) pauses L1 instead of ending QEMU: the harness reads the
        # CPUs as the fault left them (l1-halt.txt), then quits it; -d cpu_reset logs "Triple fault"
        "-action", "reboot=shutdown,shutdown=pause",
        *(("-d", "cpu_reset", "-D", str(cfg.artifacts / "l1-qemu.log")) if tcg else ()),
        # each vCPU's last interrupts and exceptions, written when QEMU exits (`python -m pytest_cpr.vhost discon`)
        *(("-plugin", f"{cfg.artifacts / TCG_DISCON_SO},out={cfg.artifacts / TCG_DISCON_OUT}") if tcg and cfg.trace
          else ()),
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-kernel", str(cfg.vmlinuz), "-initrd", str(cfg.image / "initrd.img"), "-append", append,
        "-drive", f"file={cfg.image / 'rootfs.img'},if=none,id=root,format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "pcie-root-port,id=rp1,chassis=1,slot=1",
        "-netdev", "hubport,id=wire0,hubid=0", "-netdev", "hubport,id=wire1,hubid=0",
        "-device", f"igb,bus=rp1,netdev=wire0,mac={IGB_MAC}",
        "-device", f"virtio-net-pci,netdev=wire1,mac={PEER_MAC}",
        "-device", "pcie-root-port,id=rp2,chassis=2,slot=2",
        "-drive", f"file={nvme_image},if=none,id=nvm,format=raw",
        "-device", "nvme,bus=rp2,serial=cpr-vhost-nvme,drive=nvm",
        "-device", "pcie-root-port,id=rp3,chassis=3,slot=3", "-netdev", "hubport,id=wire2,hubid=0",
        "-device", f"e1000e,bus=rp3,netdev=wire2,mac={E1000E_MAC}",
        "-virtfs", f"local,path={cfg.source_tree},mount_tag=src,security_model=none,readonly=on",
        "-virtfs", f"local,path={cfg.guest_image},mount_tag=guest,security_model=none,readonly=on",
        "-virtfs", f"local,path={inner},mount_tag=out,security_model=none",
        *(("-virtfs", f"local,path={cfg.cross},mount_tag=cross,security_model=none,readonly=on")
          if cfg.cross else ()),
        "-chardev", f"file,id=serial0,path={cfg.artifacts / 'l1-console.log'}", "-serial", "chardev:serial0",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent0,path={rundir / 'agent.sock'},server=on,wait=off",
        "-device", "virtconsole,chardev=agent0",
        "-chardev", f"socket,id=agent1,path={rundir / 'side.sock'},server=on,wait=off",
        "-device", "virtconsole,chardev=agent1",
        "-chardev", f"socket,id=qmp0,path={rundir / 'qmp.sock'},server=on,wait=off",
        "-qmp", "chardev:qmp0",
        *cfg.qemu_args,
    ]


# With CPR_VHOST_TRACE=1, L1's KVM tracepoints for its L2 guests (exits, injected exceptions and
# interrupts, page faults, exits to QEMU, fast zaps of the nested page tables: memory slot changes) in a
# 16 MiB ring per vCPU that stops at the first L2 triple fault (SVM_EXIT_SHUTDOWN, 0x7f: the L2's reset
# with a silent console), written at the end as inner/l1-kvm-trace.txt[.gz]: what led an L2 to its reset.
L1_KVM_TRACE = "l1-kvm-trace.txt"
L1_KVM_EVENTS = ("kvm/kvm_exit", "kvm/kvm_inj_exception", "kvm/kvm_inj_virq", "kvm/kvm_page_fault",
                 "kvm/kvm_userspace_exit", "kvmmmu/kvm_mmu_zap_all_fast")  # L1's 7.3 has no memslot event
L1_KVM_TRACE_ON = ("t=/sys/kernel/tracing; [ -d $t/events ] || mount -t tracefs nodev $t; echo 0 > $t/tracing_on; "
                   f"echo 16384 > $t/buffer_size_kb; for e in {' '.join(L1_KVM_EVENTS)}; "
                   "do echo 1 > $t/events/$e/enable || echo \"no event $e\"; done; "
                   "echo 'traceoff if exit_reason == 127' > $t/events/kvm/kvm_exit/trigger; echo 1 > $t/tracing_on; "
                   "cat $t/events/kvm/kvm_exit/trigger")
# L1's memory management at the end: page migration, compaction and huge page collapses move the pages
# under its L2 guests' nested page tables (each move a nested page table change the emulator must honour)
L1_MM_STATE = ("(grep -E '^(pgmigrate|compact_|thp_|numa_)' /proc/vmstat; "
               "head /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/shmem_enabled "
               "/sys/kernel/mm/transparent_hugepage/defrag /proc/sys/vm/compaction_proactiveness)")
# at the end: all of it (~100 MB, gzip) when an L2 triple fault stopped it, else its last 20000 lines
L1_KVM_TRACE_KEEP = ("t=/sys/kernel/tracing; if [ \"$(cat $t/tracing_on)\" = 0 ]; then gzip -1 < $t/trace > {out}.gz; "
                     "else cat $t/trace | tail -n 20000 > {out}; fi; ")  # tracefs: read it as a stream
TCG_DISCON_SO = "tcg-discon.so"  # in the run's artifacts, with CPR_VHOST_TRACE=1
TCG_DISCON_OUT = "l1-discon.txt"  # what the plugin writes when L1's QEMU exits


_KVM_EXIT = re.compile(r"^\s*(?P<task>.+?)\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<t>[\d.]+): kvm_exit: vcpu (?P<vcpu>\d+) "
                       r"reason (?P<reason>\S+) rip (?P<rip>0x[0-9a-f]+) info1 (?P<info1>0x[0-9a-f]+) "
                       r"info2 (?P<info2>0x[0-9a-f]+) intr_info (?P<intr>0x[0-9a-f]+) error_code (?P<err>0x[0-9a-f]+)")
_EVENT_TYPES = {0: "external interrupt", 2: "NMI", 3: "exception", 4: "software interrupt"}
_VECTORS = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF",
            17: "#AC", 18: "#MC"}


def event_info(intr: int, err: int) -> str:
    """SVM's exit interrupt information in words: the event the CPU was delivering when it exited
    (vector, type, error code; for a page fault its error code's bits)."""
    if not intr & 0x80000000:
        return "no event being delivered"
    vector, kind = intr & 0xFF, (intr >> 8) & 7
    name = _VECTORS.get(vector, "") if kind == 3 else ""
    words = f"{_EVENT_TYPES.get(kind, f'type {kind}')} {name} (vector {vector})"
    if intr & 0x800:
        words += f", error code {err:#x}"
        if vector == 14 and kind == 3:
            access = "instruction fetch" if err & 16 else "write" if err & 2 else "read"
            bits = ["page present" if err & 1 else "page not present", access,
                    "user mode" if err & 4 else "kernel mode", *(["reserved bit set"] if err & 8 else [])]
            words += f": {', '.join(bits)}"
    return " ".join(words.split())


def l2_triple_faults(trace: str, before: int = 12) -> list[str]:
    """From L1's KVM trace (CPR_VHOST_TRACE=1): each L2 triple fault (kvm_exit reason shutdown), the
    event the emulator was delivering then, and the `before` exits of that vCPU thread that led there."""
    lines = trace.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _KVM_EXIT.match(line)
        if m is None or m["reason"] != "shutdown":
            continue
        task = m["task"]
        mine = [ln for ln in lines[:i] if ln.lstrip().startswith(task) and "kvm_exit:" in ln]
        last_npf = next((j for j, ln in enumerate(reversed(mine)) if " reason npf " in ln), None)
        out.append(f"L2 vCPU {m['vcpu']} ({task.strip()}) triple fault at {m['t']} s, RIP {m['rip']}, delivering "
                   f"{event_info(int(m['intr'], 16), int(m['err'], 16))}; "
                   + ("no nested page fault exit before it in the trace" if last_npf is None else
                      f"{last_npf} exits since its last nested page fault exit"))
        out += [f"  {ln.strip()}" for ln in mine[-before:]]
    return out


def discon_events(text: str) -> dict[int, list[tuple[int, str, int, int]]]:
    """The TCG plugin's record (tcg_discon.c): per vCPU, (ns, kind, from PC, to PC), oldest first."""
    out: dict[int, list[tuple[int, str, int, int]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and not line.startswith("#"):
            cpu, ns, kind, frm, to = fields
            out.setdefault(int(cpu), []).append((int(ns), kind, int(frm, 16), int(to, 16)))
    return out


def describe_discon(events: dict[int, list[tuple[int, str, int, int]]], symbols: list[tuple[int, str]],
                    last: int = 20) -> list[str]:
    """Each vCPU's last `last` events, its PCs named by kernel symbol, times in ms before the newest
    event of all vCPUs (a vCPU whose newest event is long before the others' stopped taking any)."""
    newest = max((e[-1][0] for e in events.values() if e), default=0)
    lines = []
    for cpu, evs in sorted(events.items()):
        lines.append(f"vCPU {cpu}: {len(evs)} events recorded, the last {min(last, len(evs))}:")
        lines += [f"  {(ns - newest) / 1e6:11.3f} ms {kind:9} {where_is(frm, symbols)} -> {where_is(to, symbols)}"
                  for ns, kind, frm, to in evs[-last:]]
    return lines


def cpu_blocks(registers: str) -> list[tuple[int, str]]:
    """(cpu index, its block) of each vCPU in HMP `info registers -a` output."""
    out = []
    for block in re.split(r"^CPU#", registers, flags=re.M)[1:]:
        if (cpu := re.match(r"(\d+)", block)) is not None:
            out.append((int(cpu.group(1)), block))
    return out


def cpu_rips(registers: str) -> list[tuple[int, int, bool]]:
    """(cpu, RIP, halted) per vCPU from HMP `info registers -a`."""
    return [(cpu, int(rip.group(1), 16), "HLT=1" in block) for cpu, block in cpu_blocks(registers)
            if (rip := re.search(r"RIP=([0-9a-f]+)", block))]


def lost_wakeups(dump: str) -> list[str]:
    """Each vCPU that sleeps (HLT, interrupts enabled) while its local APIC holds a vector it could
    take (IRR above the processor priority), as a sentence: a wakeup the emulator lost, since the
    APIC raises the CPU for exactly that. `dump`: QMP answers with `info registers -a` and `info lapic
    N` (l1-stuck.txt). Seen 2026-11-27: an L1 "freeze" was CPU 1 spinning in smp_call_function_many_cond
    for CPU 0, asleep for 159 s with the timer (236), a reschedule IPI (253) and a device vector pending."""
    sleeping = {cpu for cpu, block in cpu_blocks(dump.split("info registers -a")[-1])
                if (flags := re.search(r"RFL=([0-9a-f]+).*HLT=1", block)) and int(flags.group(1), 16) & 0x200}
    out = []
    for lapic in re.split(r"dumping local APIC state for CPU ", dump)[1:]:
        cpu, irr, ppr = (re.match(r"(\d+)", lapic), re.search(r"^IRR\s+([0-9 ]+)$", lapic, flags=re.M),
                         re.search(r"PPR 0x([0-9a-f]+)", lapic))
        if not (cpu and irr and ppr) or int(cpu.group(1)) not in sleeping:
            continue
        vectors = [int(v) for v in irr.group(1).split()]
        if any(v & 0xf0 > int(ppr.group(1), 16) & 0xf0 for v in vectors):
            out.append(f"CPU#{cpu.group(1)} sleeps (HLT, interrupts on) with vectors {' '.join(map(str, vectors))} "
                       f"pending above its priority (PPR 0x{ppr.group(1)}): a wakeup the emulator lost")
    return out


def foreign_task_registers(registers: str) -> list[str]:
    """Each vCPU whose task register is not its kernel's, as a sentence. Linux puts a CPU's TSS two
    pages after its GDT (struct cpu_entry_area), so on an L1 CPU TR base = GDT base + 0x2000; a TR
    elsewhere is a guest's, loaded by VMLOAD: the CPU was inside KVM's world switch. Seen 2026-11-27:
    an L1 triple fault with the L2 kernel's TSS (fffffe0000003000) in TR."""
    out = []
    for cpu, block in cpu_blocks(registers):
        tr = re.search(r"^TR\s*=\s*[0-9a-f]{4} ([0-9a-f]{16})", block, flags=re.M)
        gdt = re.search(r"^GDT=\s*([0-9a-f]{16})", block, flags=re.M)
        if tr and gdt and int(tr.group(1), 16) != int(gdt.group(1), 16) + 0x2000:
            out.append(f"CPU#{cpu} holds a task register that is not its kernel's (TR base "
                       f"{tr.group(1)}, its GDT's TSS {int(gdt.group(1), 16) + 0x2000:016x}): a guest's, "
                       "so it was inside KVM's world switch")
    return out


def page_walks(registers: str) -> list[str]:
    """HMP commands that walk CPU 0's page tables (HMP's CPU) at the addresses a triple fault turns
    on: CR2 (the last page fault), RSP, RIP, and the TSS, IDT and GDT the CPU reads to deliver an
    exception; then the top-level table at CR3. Seen 2026-11-27: an L1 triple fault with CR2 in
    the TSS (its IST slot): was that page unmapped in L1's tables, or mistranslated by TCG?"""
    block = next((b for cpu, b in cpu_blocks(registers) if cpu == 0), "")
    found = {name: m.group(1) for name in ("CR2", "RSP", "RIP", "CR3")
             if (m := re.search(rf"\b{name}=([0-9a-f]+)", block))}
    for name in ("TR", "IDT", "GDT"):  # 'TR =0040 fffffe0000003000 ...', 'IDT=     fffffe0000000000 ...'
        if (m := re.search(rf"^{name}\s*=\s*(?:[0-9a-f]{{4}} )?([0-9a-f]{{16}})", block, flags=re.M)):
            found[name] = m.group(1)
    out = [f"gva2gpa 0x{found[n]}" for n in ("CR2", "RSP", "RIP", "TR", "IDT", "GDT") if n in found]
    if "CR3" in found:
        out.append(f"xp /512gx 0x{int(found['CR3'], 16) & ~0xfff:x}")
    return out


def load_kallsyms(path: Path) -> list[tuple[int, str]]:
    """Sorted (address, name) of a gzipped /proc/kallsyms text-symbol list; empty if unreadable."""
    try:
        text = gzip.decompress(path.read_bytes()).decode(errors="replace")
    except (OSError, EOFError):
        return []
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            rows.append((int(fields[0], 16), fields[2] + (f" {fields[3]}" if len(fields) > 3 else "")))
    return sorted(rows)


def where_is(address: int, symbols: list[tuple[int, str]]) -> str:
    """'symbol+0xoff' for a kernel address, or the bare address."""
    i = bisect.bisect_right(symbols, (address, "\U0010ffff")) - 1
    if i < 0 or not symbols:
        return f"{address:#x}"
    base, name = symbols[i]
    return f"{name}+{address - base:#x} ({address:#x})"


class VirtualHost:
    """Boot L1, run commands and pytest inside it, always shut it down (context manager)."""

    def __init__(self, config: VhostConfig, log: Sink | None = None) -> None:
        self.config = config
        self.say: Sink = log or (lambda line: print(f"[cpr-vhost] {line}", flush=True))
        self.accel = ""
        self.accel_reason = ""
        self.boot_seconds = 0.0
        self.host_config = ""
        self.process: QemuProcess | None = None
        self.agent: AgentChannel | None = None
        self.side: AgentChannel | None = None  # second agent (hvc1): usable while `agent` is busy
        self._rundir: Path | None = None
        self._gone: str | None = None  # why L1 is gone, once known (its CPUs recorded once)

    def __enter__(self) -> VirtualHost:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def inner(self) -> Path:
        """L0 path of L1's /mnt/out."""
        return self.config.artifacts / "inner"

    def _choose_accel(self, qemu: str) -> None:
        if self.config.accel != "auto":
            self.accel, self.accel_reason = self.config.accel, "set explicitly"
            return
        ok, reason = kvm_boots(qemu, self.config.vmlinuz)
        self.accel, self.accel_reason = ("kvm" if ok else "tcg"), reason

    def boot(self) -> float:
        """Start L1 and wait for its agent; returns seconds from QEMU start to the agent's answer."""
        cfg = self.config
        cfg.validate()
        qemu = resolve_binary(cfg.qemu, "virtual host --qemu")
        cfg.artifacts.mkdir(parents=True, exist_ok=True)
        self.inner.mkdir(parents=True, exist_ok=True)
        self._rundir = Path(tempfile.mkdtemp(prefix="cpr-vhost-"))
        nvme = self._rundir / "nvme.img"
        with nvme.open("wb") as fh:
            fh.truncate(cfg.nvme_mib << 20)
        self._choose_accel(qemu)
        self.say(f"booting L1 on {self.accel} ({self.accel_reason}) with {qemu}, kernel {cfg.vmlinuz}; "
                 f"artifacts {cfg.artifacts}")
        if cfg.trace and self.accel == "tcg":
            build_shared(TCG_DISCON_SOURCE, cfg.artifacts / TCG_DISCON_SO, "CPR_VHOST_TRACE=1 needs it")
        argv = l1_argv(cfg, qemu, self.accel, self._rundir, nvme)
        self.process = QemuProcess(qemu, argv, "vhost", self._rundir, cfg.artifacts,
                                   self._rundir / "qmp.sock", self._rundir / "agent.sock",
                                   cfg.artifacts / "l1-console.log")
        t0 = time.monotonic()
        self.process.start()
        self.process.connect_qmp(30)
        self.process.wait_for_path(self._rundir / "agent.sock", 30, "the agent socket of L1")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self._rundir / "agent.sock"))
        self.agent = AgentChannel(sock, cfg.artifacts / "l1-agent.log", self._exit_reason)
        side = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        side.connect(str(self._rundir / "side.sock"))
        self.side = AgentChannel(side, cfg.artifacts / "l1-side.log", self._exit_reason)
        try:
            console = cfg.artifacts / "l1-console.log"
            with heartbeat(self.say, "L1 booting", 30, lambda: f"console: {tail(console, 1)[:160] or '(empty)'}"):
                self.agent.expect(r"@@CPR-AGENT-READY@@\n?", cfg.boot_timeout, "the L1 agent (boot)")
        except CprTimeout as exc:
            raise CprTimeout(f"{exc}\nL1 console {cfg.artifacts / 'l1-console.log'}:\n"
                             f"{tail(cfg.artifacts / 'l1-console.log')}") from None
        self.boot_seconds = time.monotonic() - t0
        self.say(f"L1 agent ready {self.boot_seconds:.1f}s after QEMU start")
        self.side.expect(r"@@CPR-AGENT-READY@@\n?", 30, "the second L1 agent (hvc1)")
        self._setup()
        return self.boot_seconds

    def _exit_reason(self) -> str | None:
        """Why L1 is gone (None while it runs): its QEMU exited, or L1 reset itself (a panic under
        panic=-1, or a triple fault) and QEMU holds it paused; then with L1's kernel panic line when
        its console has one, "Triple fault" when QEMU logged one, and where each vCPU was."""
        assert self.process is not None
        if self._gone is not None:
            return self._gone
        reason = self.process.halt_reason()
        if reason is None:
            return None
        if (panic := l1_panic(self.config.artifacts / "l1-console.log")) is not None:
            reason = f"L1 kernel panic: {panic}; {reason}"
        elif "Triple fault" in tail(self.config.artifacts / "l1-qemu.log", 400):
            reason = f"L1 triple fault (QEMU's -d cpu_reset log); {reason}"
        if self.process.exit_reason() is None:  # held paused: record its CPUs, then it may go
            dump = self.config.artifacts / "l1-halt.txt"
            where, text = self._record_cpus(dump, ("query-status", "info registers -a", "info lapic"), walk=True)
            foreign = "".join(f"; {f}" for f in foreign_task_registers(text))
            reason = f"{reason}; L1 vCPUs: {', '.join(where) or '?'}{foreign} (registers {dump})"
        self._gone = reason
        return reason

    def _cpu_state_commands(self) -> tuple[str, ...]:
        """What a stuck or stalled L1's CPUs are recorded with: run state, registers twice (moving or not),
        each local APIC (IRR, ISR, timer) and the JIT's counters."""
        return ("query-status", "query-cpus-fast", "info registers -a", "info registers -a",
                *(f"info lapic {cpu}" for cpu in range(self.config.cpus)), "info jit")

    def _record_cpus(self, dump: Path, commands: Sequence[str], walk: bool = False) -> tuple[list[str], str]:
        """Write QMP commands' (or HMP command lines') answers to `dump`, each vCPU's RIP named from
        L1's kallsyms after each `info registers`; returns the names of the last, and what was written.
        With `walk`, then the page walks of CPU 0's fault-relevant addresses (page_walks)."""
        assert self.process is not None
        symbols = load_kallsyms(self.inner / "l1-kallsyms.txt.gz")
        where: list[str] = []
        out: list[str] = []
        pending = list(commands)
        while pending:
            command = pending.pop(0)
            cmd, args = (("human-monitor-command", {"command-line": command}) if " " in command
                         else (command, None))
            try:
                reply = self.process.qmp.execute(cmd, args, timeout=20)
                out.append(f"== {cmd} {args or ''}\n{reply}\n")
                if command.startswith("info registers") and isinstance(reply, str):
                    where = [f"CPU#{cpu} at {where_is(rip, symbols)}{' (halted)' if hlt else ''}"
                             for cpu, rip, hlt in cpu_rips(reply)]
                    out.append("".join(f"== {w}\n" for w in where))
                    if walk:
                        pending += page_walks(reply)
                        walk = False
            except Exception as exc:  # diagnostics only: record and go on
                out.append(f"== {cmd}: {exc}\n")
            dump.write_text("".join(out))  # as it grows: L1 may take the monitor with it
        return where, "".join(out)

    def _setup(self) -> None:
        """What the admin of a hardware runner does once: write the host config (and keep a copy)."""
        self.run(f"mkdir -p /run/cpr && cd {L1_SRC} && PYTHONDONTWRITEBYTECODE=1 {L1_PYTHON} -m "
                 f"pytest_cpr.vhost hostconfig --out {L1_HOST_CONFIG} && "
                 f"cp {L1_HOST_CONFIG} {L1_OUT}/host.toml", 120).check()
        self.host_config = (self.inner / "host.toml").read_text()
        if self.config.cross:
            self.run(f"mkdir -p {L1_CROSS} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro cross "
                     f"{L1_CROSS} && {L1_CROSS}/bin/qemu-system-x86_64 --version", 120).check()
        # L1's kernel text symbols of this boot (KASLR): names the vCPU RIPs should L1 freeze
        self.run(f"grep -E ' [tT] ' /proc/kallsyms | gzip -1 > {L1_OUT}/l1-kallsyms.txt.gz", 60)
        if self.config.trace:  # what L1's KVM saw of its L2 guests, kept up to the first L2 triple fault
            self.run(f"({L1_KVM_TRACE_ON}) > {L1_OUT}/{L1_KVM_TRACE}.setup 2>&1", 60)

    def run(self, command: str, timeout: float = 60.0, sink: Sink | None = None) -> AgentResult:
        """Run a bash command in L1 (as root, cwd /root)."""
        if self.agent is None:
            raise CprError("virtual host is not booted")
        return self.agent.run(command, timeout, sink, self._check_responsive if self.side else None)

    def _check_responsive(self) -> None:
        """A long quiet command: is L1 itself still alive? Seen here: L1 under TCG with an L2 on KVM
        inside it froze with both vCPU threads idle; without this the harness would wait for the
        command's whole timeout. Records L1's CPU state over QMP, then raises."""
        assert self.side is not None and self.process is not None
        try:
            self.side.run("cat /proc/uptime", 60)
        except CprTimeout:
            pass
        else:
            if (stuck := l1_nic_stuck(self.config.artifacts / "l1-console.log")) is not None:
                raise CprTimeout(f"virtual host's NIC stopped transmitting, L1's kernel says: {stuck} (the "
                                 f"emulator lost its notification or interrupt: the tests' traffic cannot flow; "
                                 f"console {self.config.artifacts / 'l1-console.log'})")
            if (stalled := l1_cpu_stalled(self.config.artifacts / "l1-console.log")) is not None:
                dump = self.config.artifacts / "l1-stalled.txt"  # halted or not, IF, the APIC's IRR/ISR, its timer
                where, _ = self._record_cpus(dump, self._cpu_state_commands())
                raise CprTimeout(f"virtual host's {stalled} (a wakeup the emulator lost: what runs there "
                                 f"never finishes; vCPUs: {', '.join(where) or '?'}; L1 CPU state {dump}, "
                                 f"console {self.config.artifacts / 'l1-console.log'})")
            return
        dump = self.config.artifacts / "l1-stuck.txt"
        where, text = self._record_cpus(dump, self._cpu_state_commands())
        lost = "".join(f"; {w}" for w in lost_wakeups(text))
        raise CprTimeout(f"virtual host stopped answering: a long command was quiet and the second agent "
                         f"did not answer `cat /proc/uptime` within 60s (L1 frozen; vCPUs: {', '.join(where) or '?'}"
                         f"{lost}); L1 CPU state {dump}, console {self.config.artifacts / 'l1-console.log'}")

    def side_run(self, command: str, timeout: float = 60.0) -> AgentResult:
        """Run a bash command in L1 on the second agent: works while run() or pytest() is busy
        (e.g. from a watchdog thread that looks at a stalled L2)."""
        if self.side is None:
            raise CprError("virtual host is not booted")
        return self.side.run(command, timeout)

    def pytest(self, args: Sequence[str], name: str = "vhost", timeout: float = 1800.0,
               sink: Sink | None = None, env: dict[str, str] | None = None) -> InnerRun:
        """Run pytest in L1 on the shared working tree; its JUnit XML lands in artifacts/junit/ on L0."""
        junit_l1 = f"{L1_OUT}/junit/{name}.xml"
        variables = {
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/root", "PY_COLORS": "0",
            "CPR_IMAGE": L1_GUEST, "CPR_ARTIFACTS": f"{L1_OUT}/cpr", "CPR_CACHE_DIR": "/tmp/cpr-cache",
            # an L2 boots in ~12 s here; the nested emulation hangs one now and then before it is up
            "CPR_BOOT_TIMEOUT": "120", "CPR_BOOT_ATTEMPTS": "2",
            "CPR_HOST_CONFIG": L1_HOST_CONFIG, **self._ioctl_shim(), **self._cross_qemu(), **(env or {}),
        }
        exports = " ".join(f"{k}={_sh(v)}" for k, v in variables.items())
        argv = " ".join(_sh(a) for a in args)
        command = (f"mkdir -p {L1_OUT}/junit && cd {L1_SRC} && env {exports} {L1_PYTHON} -m pytest "
                   f"-p no:cacheprovider --junitxml={junit_l1} -o junit_suite_name={name} {argv}")
        log = self.config.artifacts / f"pytest-{name}.log"
        with log.open("w", encoding="utf-8") as fh:
            def tee(text: str) -> None:
                fh.write(text)
                fh.flush()
                if sink is not None:
                    sink(text)

            result = self.run(command, timeout, tee)
        junit = self.inner / "junit" / f"{name}.xml"
        brought = None
        if junit.is_file():
            target = self.config.junit_dir or self.config.artifacts / "junit"
            target.mkdir(parents=True, exist_ok=True)
            brought = target / f"vhost-{name}.xml"
            shutil.copyfile(junit, brought)
        return InnerRun(result.exit_code, brought, self.inner, result.seconds, log)

    def _cross_qemu(self) -> dict[str, str]:
        """CPR_CROSS_QEMU for the inner run: the shared second build (tests/hardware/test_cross_passthrough.py);
        without it, nothing: those tests then say how to get it."""
        return {"CPR_CROSS_QEMU": f"{L1_CROSS}/bin/qemu-system-x86_64"} if self.config.cross else {}

    def _ioctl_shim(self) -> dict[str, str]:
        """CPR_IOCTL_SHIM for the inner run: the ioctl fault shim built here (L1 has no C compiler; a
        shared object built against this older C library loads in L1's newer one). Without a
        compiler here, nothing: the ioctl tests in L1 then say what is missing."""
        try:
            build_shim(self.inner / "ioctl-fault.so")
        except CprError:
            return {}
        return {"CPR_IOCTL_SHIM": f"{L1_OUT}/ioctl-fault.so"}

    def close(self) -> None:
        """Shut L1 down (quit over QMP, then signals) and remove the run folder; safe to call twice."""
        if self.process is not None and self.process.exit_reason() is None and self.accel == "tcg":
            with contextlib.suppress(Exception):  # TCG's translation cache: size, flushes
                jit = self.process.qmp.execute("human-monitor-command", {"command-line": "info jit"}, timeout=20)
                (self.config.artifacts / "l1-jit.txt").write_text(str(jit))
        if self.agent is not None:
            # L1's kernel log, memory counters and KVM trace (L1 may be gone: then none), on the second
            # agent when there is one: the first may still run a command a stop interrupted on L0
            keep = L1_KVM_TRACE_KEEP.format(out=f"{L1_OUT}/{L1_KVM_TRACE}") if self.config.trace else ""
            with contextlib.suppress(CprError, OSError):
                (self.side or self.agent).run(f"{keep}dmesg > {L1_OUT}/l1-dmesg.log; {L1_MM_STATE} > "
                                              f"{L1_OUT}/l1-mm.txt; sync", 120)
            self.agent.close()
            self.agent = None
        if self.side is not None:
            self.side.close()
            self.side = None
        if self.process is not None:
            self.process.shutdown(timeout=15)
            self.process = None
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None


NIC_STUCK_MS = 60000  # a transmit queue silent this long (L1's NETDEV WATCHDOG says) is no hiccup


# Faults of the virtual host itself, the emulated machine that stands in for a hardware runner (not the
# QEMU, kernel or plugin under test), by the words the harness names them with; first match wins. A gating
# set of the tier gets one announced retry in a fresh L1 for these only (l1_fault): any other failure fails
# CI at once. vhost_stability's failure classes start with these.
L1_FAULTS: tuple[tuple[str, str], ...] = (
    ("L1 freeze", r"virtual host stopped answering"),
    ("L1 NIC stuck", r"virtual host's NIC stopped transmitting"),
    ("L1 CPU stalled", r"virtual host's CPU \d+ takes no timer interrupt"),
    ("L1 panic", r"L1 kernel panic"),
    ("L1 reset", r"virtual host (exited|agent socket closed)|L1 triple fault"),
)


def first_class(text: str, classes: Sequence[tuple[str, str]] = L1_FAULTS) -> str | None:
    """The name of the first of `classes` (name, pattern) whose pattern `text` matches, or None."""
    return next((name for name, pattern in classes if re.search(pattern, text)), None)


def l1_fault(junit: Path) -> str | None:
    """'<fault class>: <first lines>' of the first failure an L0 tier JUnit XML (vhost-l0-<run>.xml)
    records whose text names an L1 fault (L1_FAULTS), else None (no such failure, or no readable file)."""
    try:
        root = ET.parse(junit).getroot()  # noqa: S314 (the JUnit XML our own pytest wrote)
    except (OSError, ET.ParseError):
        return None
    for case in root.iter("testcase"):
        if (failure := failure_of(case)) is None:
            continue
        if (name := first_class(f"{failure.get('message') or ''}\n{failure.text or ''}")) is not None:
            return f"{name}: {first_lines(failure, lines=2, limit=400)}"
    return None


def l1_nic_stuck(console: Path) -> str | None:
    """The last NETDEV WATCHDOG line of L1's console when its queue has been stuck NIC_STUCK_MS or
    more, else None. Seen 2026-11-27: L1's virtio-net to the tests' peer stopped transmitting for good
    while L1 itself answered; the inner tests then waited out their 900 s timeouts one after another."""
    found = _console_findall(console, r"(\S+): NETDEV WATCHDOG: (.*?transmit queue \d+ timed out (\d+) ms)")
    return f"{found[-1][0]}: {found[-1][1]}" if found and int(found[-1][2]) >= NIC_STUCK_MS else None


def l1_cpu_stalled(console: Path) -> str | None:
    """'CPU <n> takes no timer interrupt any more' when L1's RCU reported the same CPU twice with the same
    timer softirq count ('Possible timer handling issue on cpu=<n> timer-softirq=<k>': the count did not
    move between reports minutes apart), else None. Seen 2026-11-27 on CPU 0 in the CI's rollback run:
    CPU 1 and the second agent answered, and the inner test waited out the whole run's timeout."""
    seen: set[tuple[str, str]] = set()
    for cpu, count in _console_findall(console, r"Possible timer handling issue on cpu=(\d+) timer-softirq=(\d+)"):
        if (cpu, count) in seen:
            return (f"CPU {cpu} takes no timer interrupt any more (RCU reported it twice, "
                    f"timer-softirq={count} both times)")
        seen.add((cpu, count))
    return None


def l1_panic(console: Path) -> str | None:
    """The last 'Kernel panic - not syncing: <why>' of L1's console log, or None."""
    found = _console_findall(console, r"Kernel panic - not syncing: ([^\r\n]*)")
    return found[-1].strip() if found else None


def _console_findall(console: Path, pattern: str) -> list[Any]:  # str or tuple per match
    """re.findall of `pattern` over L1's console log; none before L1 wrote one."""
    try:
        return re.findall(pattern, console.read_text(errors="replace"))
    except FileNotFoundError:
        return []


def _sh(text: str) -> str:
    """Quote for bash (single quotes)."""
    return "'" + text.replace("'", "'\\''") + "'"


# ---- command line ------------------------------------------------------------------------------------

def _to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _cmd_hostconfig(args: argparse.Namespace) -> int:
    facts = gather_facts(peer_interface=args.peer)
    text = host_config_text(facts)
    Path(args.out).write_text(text)
    print(text, end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    artifacts = Path(args.artifacts).resolve() / "vhost" / f"{args.name}-{stamp}"
    cfg = VhostConfig.from_cache(artifacts, accel=args.accel, memory=args.memory, qemu=args.qemu,
                                 kernel=args.kernel, junit_dir=Path(args.artifacts).resolve() / "junit")
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    t0 = time.monotonic()
    summary: dict[str, object] = {"pytest_args": pytest_args, "l0_qemu": cfg.qemu}
    try:
        with VirtualHost(cfg) as l1:
            summary.update(accel=l1.accel, l1_boot_s=round(l1.boot_seconds, 1))
            l1.say("host config:\n" + l1.host_config.rstrip())
            l1.say(f"pytest {' '.join(pytest_args)} (timeout {args.timeout:.0f}s)")
            run = l1.pytest(pytest_args or ["tests/hardware"], args.name, args.timeout,
                            sink=_to_stdout)
            summary.update(exit_code=run.exit_code, junit=str(run.junit), pytest_s=round(run.seconds, 1))
    except CprError as exc:
        print(f"[cpr-vhost] FAILED: {exc}", file=sys.stderr, flush=True)
        summary.update(exit_code=3, error=str(exc))
    summary["total_s"] = round(time.monotonic() - t0, 1)
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[cpr-vhost] {json.dumps(summary)}", flush=True)
    code = summary["exit_code"]
    return code if isinstance(code, int) else 3


def failure_of(case: ET.Element) -> ET.Element | None:
    """A JUnit test case's <failure> (a check failed) or <error> (set-up or teardown broke), or None."""
    failure = case.find("failure")
    return failure if failure is not None else case.find("error")


def failed_tests(junit: Path) -> list[str]:
    """The node ids (tests/<dir>/<file>.py::<name>) of the test cases a JUnit XML file records as
    failed or errored: what an announced retry runs again. A missing or unreadable file: []."""
    try:
        root = ET.parse(junit).getroot()  # noqa: S314 (the JUnit XML our own pytest wrote)
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        if failure_of(case) is None:
            continue
        module, name = case.get("classname") or "", case.get("name") or ""
        node = f"{module.replace('.', '/')}.py::{name}" if module else name
        if node not in out:
            out.append(node)
    return out


def first_lines(failure: ET.Element | None, lines: int = 3, limit: int = 600) -> str:
    """The first lines of a JUnit failure's message, joined: what CI's log shows of an inner failure
    (the inner artifacts stay on the runner)."""
    message = (failure.get("message") or failure.text or "") if failure is not None else ""
    kept = [line.strip() for line in message.strip().splitlines() if line.strip()][:lines]
    return (" / ".join(kept) or "(no message)")[:limit]


def gate_problems(junit: Path, args: Sequence[str], backends: Sequence[str], core: Sequence[str]) -> list[str]:
    """What an inner run of the gate lacks, one sentence each; [] when it holds. It holds when no
    test failed (each failure named with its message's first lines), a test passed on each backend
    L1 offers with cpr_ numbers, and each core test the run selected (a set may select none) passed
    on every backend with its t1 downtime and blackout. A retry (`args` name node ids, or --deselect what the first
    attempt finished) is asked this of the tests it ran, not of those it left out."""
    cases = list(ET.parse(junit).getroot().iter("testcase"))  # noqa: S314 (our own pytest's JUnit XML)
    names = [c.get("name") or "" for c in cases]
    failed = [f"{c.get('name')}: {first_lines(failure_of(c))}" for c in cases if failure_of(c) is not None]
    if failed:
        return [f"inner tests failed: {f}" for f in failed]
    passed = [c for c in cases if all(e.tag in ("properties", "system-out", "system-err") for e in c)]
    numbers = {c.get("name") or "": {p.get("name") or "" for p in c.iter("property")} for c in passed}
    retry = any("::" in a for a in args) or "--deselect" in args
    problems = []
    for backend in backends:
        if retry and not any(f"[{backend}" in n for n in names):
            continue
        ok = [n for n in numbers if f"[{backend}" in n]
        if not any(p.startswith("cpr_") for n in ok for p in numbers[n]):
            problems.append(f"no {backend} passthrough test passed in L1 with cpr_ numbers: {names}")
    # a set without core tests (the rollback set) is held to the rest: something passed on each backend
    selected = [t for t in core if any(n.startswith(f"test_{t}[") for n in names)]
    for name in (f"test_{test}[{backend}]" for test in selected for backend in backends):
        if retry and name not in names:
            continue
        if name not in numbers:
            problems.append(f"{name} did not pass in L1: {names}")
        else:
            problems += [f"{name} has no {n}" for n in ("cpr_t1_qemu_downtime_ms", "cpr_t1_blackout_ms")
                         if n not in numbers[name]]
    return problems


# a test's outcome in the inner pytest's -v output, streamed to L0 line by line as it runs
_VERBOSE_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_DONE = ("PASSED", "SKIPPED", "XFAIL")


def finished_tests(log: Path) -> list[str]:
    """The node ids the inner pytest's streamed -v log shows done as they should be (passed, skipped,
    expected failure): what a retry can leave out when L1 died mid-run and brought no JUnit XML back
    (its first attempt in CI: L1 reset after most tests had passed). A test that failed, or that ran
    when L1 died, is not among them. A missing log: []."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    outcome: dict[str, str] = {}
    for line in lines:
        if (m := _VERBOSE_OUTCOME.match(line.strip())) is not None:
            outcome[m.group(1)] = m.group(2)  # a teardown ERROR after PASSED is the last word
    return [node for node, what in outcome.items() if what in _DONE]


def _cmd_failed(args: argparse.Namespace) -> int:
    print(" ".join(shlex.quote(n) for f in args.junit for n in failed_tests(Path(f))))
    return 0


def _cmd_finished(args: argparse.Namespace) -> int:
    print(" ".join(f"--deselect {shlex.quote(n)}" for f in args.log for n in finished_tests(Path(f))))
    return 0


def _cmd_l1fault(args: argparse.Namespace) -> int:
    fault = l1_fault(Path(args.junit))
    if fault is not None:
        print(fault)
    return 0 if fault is not None else 1


def _cmd_discon(args: argparse.Namespace) -> int:
    run = Path(args.run)
    try:
        text = (run / TCG_DISCON_OUT).read_text()
    except OSError as exc:
        raise CprSettingError(f"{run / TCG_DISCON_OUT}: {exc.strerror}; run L1 with CPR_VHOST_TRACE=1 "
                              "(the plugin writes it when L1's QEMU exits)") from None
    print("\n".join(describe_discon(discon_events(text), load_kallsyms(run / "inner" / "l1-kallsyms.txt.gz"),
                                    args.last)))
    return 0


def _cmd_l2reset(args: argparse.Namespace) -> int:
    inner = Path(args.run) / "inner"
    try:
        whole = inner / f"{L1_KVM_TRACE}.gz"
        text = (gzip.decompress(whole.read_bytes()).decode(errors="replace") if whole.is_file()
                else (inner / L1_KVM_TRACE).read_text(errors="replace"))
    except OSError as exc:
        raise CprSettingError(f"{inner / L1_KVM_TRACE}: {exc.strerror}; run L1 with CPR_VHOST_TRACE=1") from None
    print("\n".join(l2_triple_faults(text, args.before)) or "no L2 triple fault in L1's KVM trace")
    return 0


def sigterm_as_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, a job timeout) as Ctrl-C: the `with` blocks shut what they started down."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_cpr.vhost", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="boot L1, run pytest inside it, bring back JUnit XML + artifacts")
    r.add_argument("--accel", default=os.environ.get("CPR_VHOST_ACCEL", "auto"),
                   choices=("auto", "kvm", "tcg"))
    r.add_argument("--memory", default="5G", help="L1 memory (default 5G)")
    r.add_argument("--qemu", default=None,
                   help="QEMU that runs L1 (default $CPR_VHOST_QEMU, else auto: the cached qemu-l0 build, "
                        "else qemu-next, else qemu-system-x86_64)")
    r.add_argument("--kernel", default=None,
                   help="L1 kernel: auto (default, $CPR_VHOST_KERNEL), distro, iommufd or a bzImage path")
    r.add_argument("--name", default="vhost", help="name of the JUnit file: artifacts/junit/vhost-<name>.xml")
    r.add_argument("--artifacts", default="artifacts", help="artifacts root on L0 (default ./artifacts)")
    r.add_argument("--timeout", type=float, default=1800.0, help="seconds for the inner pytest run")
    r.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="-- then pytest arguments (default tests/hardware)")
    h = sub.add_parser("hostconfig", help="(inside L1) write the host config TOML for this virtual host")
    h.add_argument("--out", default=L1_HOST_CONFIG)
    h.add_argument("--peer", default=PEER_NAME)
    f = sub.add_parser("failed", help="the node ids a JUnit XML file records as failed (for an announced retry)")
    f.add_argument("junit", nargs="+")
    d = sub.add_parser("finished", help="--deselect for each test an inner pytest log shows done (passed, "
                                        "skipped, xfail): a retry after an L1 that died mid-run")
    d.add_argument("log", nargs="+")
    g = sub.add_parser("l1fault", help="the L1 fault an L0 tier JUnit XML records (exit 0, printed), or none "
                                       "(exit 1): a gating set's retry is for L1 faults only")
    g.add_argument("junit")
    t = sub.add_parser("discon", help="a traced L1 run's last interrupts and exceptions per vCPU, by kernel symbol "
                                      "(CPR_VHOST_TRACE=1)")
    t.add_argument("run", help="the run's artifacts folder (artifacts/vhost/<name>-<stamp>)")
    t.add_argument("--last", type=int, default=20)
    k = sub.add_parser("l2reset", help="a traced L1 run's L2 triple faults from L1's KVM trace, with the exits "
                                       "before each (CPR_VHOST_TRACE=1)")
    k.add_argument("run", help="the run's artifacts folder (artifacts/vhost/<name>-<stamp>)")
    k.add_argument("--before", type=int, default=12)
    args = parser.parse_args(argv)
    commands = {"run": _cmd_run, "hostconfig": _cmd_hostconfig, "failed": _cmd_failed, "finished": _cmd_finished,
                "l1fault": _cmd_l1fault, "discon": _cmd_discon, "l2reset": _cmd_l2reset}
    return run_as_cli("cpr-vhost", lambda: commands[args.cmd](args))


def run_as_cli(name: str, command: Callable[[], int], stopped: str = "L1 was shut down") -> int:
    """Run a command-line tool's `command`: SIGTERM (`kill`, a job timeout) counts as Ctrl-C, so what it
    started (L1) is shut down, not orphaned (`stopped` says so); an error is one line; exit 2 on an
    error, 130 when interrupted."""
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    try:
        return command()
    except CprError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted ({exc or 'Ctrl-C'}); {stopped}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
