"""Whether this host posts device interrupts straight to guests (Intel VT-d posted interrupts with
APICv, or AMD-Vi guest virtual APIC with AVIC), read from sysfs and the kernel command line.

It decides whether KVM registers irq-bypass consumers for a VM's irqfds (x86
`kvm_arch_has_irq_bypass()`), and so whether the host-log symptom of the irq-bypass -16 bug
(QEMU 7ed0919119, "irq bypass consumer ... registration fails: -16") can appear at all. Kernels from
6.16 give the answer themselves as the vendor module's `enable_device_posted_irqs`, cleared at load
when APICv/AVIC or the IOMMU's posting capability is missing; older ones are asked piece by piece.
Before Linux 6.5 (commit 5e1fe4a21c0c, "KVM: x86/irq: Conditionally register IRQ bypass consumer
again") KVM registered the consumers whether it posted or not, so there the message can appear anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pytest_cpr.host.hostconfig import HostPaths, read_attr

VTD_CAP_PI = 59  # VT-d capability register: posted interrupts supported
VTD_ECAP_IR = 3  # VT-d extended capability register: interrupt remapping supported
AMD_FEATURE_GA = 7  # AMD IOMMU extended feature register: guest virtual APIC (GASup)
AMD_FEATURE_GAM_VAPIC = 21  # ... and its vAPIC mode (GAMSup), without which the kernel uses legacy GA
# kernel command-line options that turn posting (or interrupt remapping) off
NO_POSTING = ("intremap=off", "nointremap", "intremap=nopost", "intel_iommu=off", "amd_iommu=off",
              "amd_iommu_intr=legacy", "amd_iommu_intr=legacy_ga")
VENDORS = (("kvm_intel", "enable_apicv"), ("kvm_amd", "avic"))
CPU_FLAG = {"kvm_intel": "vmx", "kvm_amd": "svm"}  # the CPU feature each vendor module drives
CONDITIONAL_BYPASS = (6, 5)  # first Linux release whose KVM registers irq-bypass consumers only when it posts


@dataclass(frozen=True)
class PostedInterrupts:
    active: bool | None  # None: unknown
    reason: str
    consumers_anyway: str = ""  # why KVM registers irq-bypass consumers without posting (old kernels)

    def text(self) -> str:
        answer = {True: "yes", False: "no", None: "unknown"}[self.active]
        return f"{answer} ({self.reason}{'; ' + self.consumers_anyway if self.consumers_anyway else ''})"

    def header_line(self) -> str:
        can = ("can" if self.active or self.consumers_anyway else "cannot" if self.active is False
               else "may or may not")
        return (f"  device posted interrupts: {self.text()}: the irq-bypass -16 host-log check {can} fire "
                "here; the old-QEMU-KVM-fds check covers the mechanism everywhere")


NOT_PROBED = PostedInterrupts(None, "not probed")


def _on(value: str) -> bool:
    return value in ("Y", "1")


def _hex_register(path: Path) -> int | None:
    """A register sysfs shows in hex (AMD's features file is 'efr:efr2'; the first is the one)."""
    text = read_attr(path)
    try:
        return int(text.split(":")[0], 16) if text else None
    except ValueError:
        return None


def _units_lacking(units: list[Path], register: str, bit: int) -> list[str] | None:
    """Names of the IOMMU units whose `register` lacks `bit`; None if one cannot be read."""
    values = {u.name: _hex_register(u / register) for u in units}
    if any(v is None for v in values.values()):
        return None
    return [name for name, v in values.items() if v is not None and not v >> bit & 1]


def _iommu_posting(paths: HostPaths, intel: bool) -> PostedInterrupts:
    """The IOMMU side: every unit must post (the kernel clears the capability if one does not)."""
    pattern, needs = (("dmar*", (("intel-iommu/cap", VTD_CAP_PI, "VT-d posted interrupts (cap bit 59)"),
                                 ("intel-iommu/ecap", VTD_ECAP_IR, "interrupt remapping (ecap bit 3)")))
                      if intel else
                      ("ivhd*", (("amd-iommu/features", AMD_FEATURE_GA, "guest virtual APIC (GASup, bit 7)"),
                                 ("amd-iommu/features", AMD_FEATURE_GAM_VAPIC, "vAPIC mode (GAMSup, bit 21)"))))
    units = sorted((paths.sysfs / "class" / "iommu").glob(pattern))
    if not units:
        return PostedInterrupts(False, f"no {'VT-d' if intel else 'AMD-Vi'} unit in /sys/class/iommu")
    for register, bit, what in needs:
        lacking = _units_lacking(units, register, bit)
        if lacking is None:
            return PostedInterrupts(None, f"cannot read {register} of {', '.join(u.name for u in units)}")
        if lacking:
            return PostedInterrupts(False, f"{', '.join(lacking)} without {what}")
    cmdline = (read_attr(paths.proc / "cmdline") or "").split()
    if off := [o for o in NO_POSTING if o in cmdline]:
        return PostedInterrupts(False, f"kernel command line {' '.join(off)}")
    names = ", ".join(u.name for u in units)
    return PostedInterrupts(True, f"{'VT-d PI' if intel else 'AMD-Vi GA vAPIC'} on {names}")


def _release(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of a kernel release such as '6.1.0-18-amd64'."""
    parts = (text or "").split(".")
    return (int(parts[0]), int(parts[1])) if len(parts) > 1 and parts[0].isdigit() and parts[1].isdigit() else None


def posted_interrupts(paths: HostPaths = HostPaths()) -> PostedInterrupts:  # noqa: B008
    """Whether KVM on this host posts passthrough devices' interrupts to guests, and why (not); on a
    kernel whose KVM registers irq-bypass consumers anyway, says so."""
    found = _posting(paths)
    release = read_attr(paths.proc / "sys" / "kernel" / "osrelease")
    older = (version := _release(release)) is not None and version < CONDITIONAL_BYPASS
    if found.active is not True and older and any((paths.sysfs / "module" / v).is_dir() for v, _ in VENDORS):
        return replace(found, consumers_anyway=f"Linux {release} registers KVM irq-bypass consumers without posting "
                       "too (until 6.5)")
    return found


def _cpu_flags(paths: HostPaths) -> set[str] | None:
    """The first CPU's flags from /proc/cpuinfo; None if unreadable."""
    for line in (read_attr(paths.proc / "cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def _vendors(paths: HostPaths) -> list[tuple[str, str]]:
    """VENDORS, those whose CPU feature this CPU lacks left out: a kernel with KVM built in shows both
    modules in /sys/module (the virtual host's L1: kvm_intel beside the kvm_amd it runs on)."""
    flags = _cpu_flags(paths)
    return [v for v in VENDORS if flags is None or CPU_FLAG[v[0]] in flags]


def _posting(paths: HostPaths) -> PostedInterrupts:
    modules = paths.sysfs / "module"
    if not modules.is_dir():
        return PostedInterrupts(None, f"no {modules}")
    for vendor, apicv_name in _vendors(paths):
        params = modules / vendor / "parameters"
        if not params.is_dir():
            continue
        if (kernel := read_attr(params / "enable_device_posted_irqs")) is not None:
            return PostedInterrupts(_on(kernel), f"{vendor} enable_device_posted_irqs={kernel}")
        apicv = read_attr(params / apicv_name)
        if apicv is None:
            return PostedInterrupts(None, f"{vendor} has no parameter {apicv_name}")
        if not _on(apicv):
            return PostedInterrupts(False, f"{vendor} {apicv_name}={apicv}")
        iommu = _iommu_posting(paths, intel=vendor == "kvm_intel")
        return PostedInterrupts(iommu.active, f"{iommu.reason}, {vendor} {apicv_name}={apicv}")
    return PostedInterrupts(False, "neither kvm_intel nor kvm_amd is loaded")
