"""host.posted against fake sysfs/proc trees: whether the host posts device interrupts to guests,
which decides whether the irq-bypass -16 host-log check can fire."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_cpr.host import vfio
from pytest_cpr.host.hostconfig import HostPaths
from pytest_cpr.host.posted import PostedInterrupts, posted_interrupts

pytest_plugins = ["pytester"]

VTD_PI_IR = hex(1 << 59 | 0x0C7), hex(1 << 3 | 0xF0A)  # cap with PI, ecap with IR (other bits set too)
AMD_GA_VAPIC = hex(1 << 21 | 1 << 7 | 0x3)


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.paths = HostPaths(root / "sys", root / "dev", root / "proc")
        (root / "sys" / "module" / "kvm" / "parameters").mkdir(parents=True)
        self.paths.proc.mkdir()
        self.cmdline("BOOT_IMAGE=/vmlinuz root=/dev/sda1")

    def cmdline(self, text: str) -> None:
        (self.paths.proc / "cmdline").write_text(text + "\n")

    def module(self, name: str, **params: str) -> None:
        directory = self.paths.sysfs / "module" / name / "parameters"
        directory.mkdir(parents=True)
        for key, value in params.items():
            (directory / key).write_text(value + "\n")

    def iommu(self, name: str, **registers: str) -> None:
        kind = "intel-iommu" if name.startswith("dmar") else "amd-iommu"
        directory = self.paths.sysfs / "class" / "iommu" / name / kind
        directory.mkdir(parents=True)
        for key, value in registers.items():
            (directory / key).write_text(value.removeprefix("0x") + "\n")


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_intel_with_apicv_and_vtd_posting_on_every_unit_posts(host: FakeHost) -> None:
    host.module("kvm_intel", enable_apicv="Y")
    host.iommu("dmar0", cap=VTD_PI_IR[0], ecap=VTD_PI_IR[1])
    host.iommu("dmar1", cap=VTD_PI_IR[0], ecap=VTD_PI_IR[1])
    assert posted_interrupts(host.paths) == PostedInterrupts(True, "VT-d PI on dmar0, dmar1, kvm_intel "
                                                             "enable_apicv=Y")


def test_intel_without_pi_on_one_unit_or_without_apicv_or_turned_off_does_not(host: FakeHost) -> None:
    host.module("kvm_intel", enable_apicv="Y")
    host.iommu("dmar0", cap=VTD_PI_IR[0], ecap=VTD_PI_IR[1])
    host.iommu("dmar1", cap=hex(0x0C7), ecap=VTD_PI_IR[1])  # a unit without PI
    assert posted_interrupts(host.paths) == PostedInterrupts(
        False, "dmar1 without VT-d posted interrupts (cap bit 59), kvm_intel enable_apicv=Y")
    (host.paths.sysfs / "class" / "iommu" / "dmar1" / "intel-iommu" / "cap").write_text(VTD_PI_IR[0])
    assert posted_interrupts(host.paths).active is True
    host.cmdline("root=/dev/sda1 intremap=nopost")
    assert posted_interrupts(host.paths).reason.startswith("kernel command line intremap=nopost")
    (host.paths.sysfs / "module" / "kvm_intel" / "parameters" / "enable_apicv").write_text("N\n")
    assert posted_interrupts(host.paths).text() == "no (kvm_intel enable_apicv=N)"


def test_intel_without_interrupt_remapping_does_not(host: FakeHost) -> None:
    host.module("kvm_intel", enable_apicv="Y")
    host.iommu("dmar0", cap=VTD_PI_IR[0], ecap=hex(0xF02))
    assert posted_interrupts(host.paths).reason.startswith("dmar0 without interrupt remapping (ecap bit 3)")


def test_amd_with_avic_and_ga_vapic_posts(host: FakeHost) -> None:
    host.module("kvm_amd", avic="1")  # an int parameter on older kernels
    host.iommu("ivhd0", features=AMD_GA_VAPIC + ":0")  # "efr:efr2" on newer kernels
    assert posted_interrupts(host.paths).text() == "yes (AMD-Vi GA vAPIC on ivhd0, kvm_amd avic=1)"


def test_amd_in_legacy_ga_or_legacy_interrupt_mode_does_not(host: FakeHost) -> None:
    host.module("kvm_amd", avic="Y")
    host.iommu("ivhd0", features=hex(1 << 7))
    assert posted_interrupts(host.paths).reason.startswith("ivhd0 without vAPIC mode (GAMSup, bit 21)")
    (host.paths.sysfs / "class" / "iommu" / "ivhd0" / "amd-iommu" / "features").write_text(AMD_GA_VAPIC)
    host.cmdline("amd_iommu_intr=legacy")
    assert posted_interrupts(host.paths).reason.startswith("kernel command line amd_iommu_intr=legacy")


def test_virtual_host_l1_amd_under_tcg_without_avic_does_not(host: FakeHost) -> None:
    """What L1 of the virtual host has (kernel 7.3): kvm_amd on TCG's SVM, which offers no AVIC, so
    the kernel clears enable_device_posted_irqs; beside it QEMU's emulated VT-d."""
    host.module("kvm_amd", avic="N", enable_device_posted_irqs="N", nested="1")
    host.iommu("dmar0", cap=hex(0x0C7), ecap=VTD_PI_IR[1])
    probe = posted_interrupts(host.paths)
    assert probe.text() == "no (kvm_amd enable_device_posted_irqs=N)"
    assert probe.header_line() == ("  device posted interrupts: no (kvm_amd enable_device_posted_irqs=N): the "
                                   "irq-bypass -16 host-log check cannot fire here; the old-QEMU-KVM-fds check "
                                   "covers the mechanism everywhere")
    (host.paths.sysfs / "module" / "kvm_amd" / "parameters" / "enable_device_posted_irqs").unlink()
    assert posted_interrupts(host.paths).text() == "no (kvm_amd avic=N)"  # a kernel before 6.16


def test_a_kernel_with_both_kvm_modules_built_in_is_read_for_the_cpu_it_runs_on(host: FakeHost) -> None:
    """L1's kernel has KVM built in: /sys/module shows kvm_intel (enable_apicv=N: no VMX here) beside
    the kvm_amd it runs on (TCG's SVM); the answer names kvm_amd, chosen by the CPU's svm flag."""
    host.module("kvm_intel", enable_apicv="N")
    host.module("kvm_amd", avic="N", enable_device_posted_irqs="N")
    (host.paths.proc / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 svm npt\n")
    assert posted_interrupts(host.paths).text() == "no (kvm_amd enable_device_posted_irqs=N)"
    (host.paths.proc / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 vmx ept\n")
    assert posted_interrupts(host.paths).text() == "no (kvm_intel enable_apicv=N)"
    (host.paths.proc / "cpuinfo").unlink()  # unreadable: the modules in their fixed order
    assert posted_interrupts(host.paths).text() == "no (kvm_intel enable_apicv=N)"


def test_the_kernels_own_answer_wins(host: FakeHost) -> None:
    """Linux >= 6.16: enable_device_posted_irqs is already cleared where APICv or the IOMMU cannot post."""
    host.module("kvm_intel", enable_apicv="Y", enable_device_posted_irqs="N")
    host.iommu("dmar0", cap=VTD_PI_IR[0], ecap=VTD_PI_IR[1])
    assert posted_interrupts(host.paths).text() == "no (kvm_intel enable_device_posted_irqs=N)"


def test_no_vendor_module_does_not_and_unreadable_registers_are_unknown(host: FakeHost) -> None:
    assert posted_interrupts(host.paths).text() == "no (neither kvm_intel nor kvm_amd is loaded)"
    host.module("kvm_intel", enable_apicv="Y")
    host.iommu("dmar0", cap="garbage", ecap=VTD_PI_IR[1])
    probe = posted_interrupts(host.paths)
    assert (probe.active, probe.reason) == (None, "cannot read intel-iommu/cap of dmar0, kvm_intel enable_apicv=Y")
    assert "check may or may not fire here" in probe.header_line()
    assert posted_interrupts(HostPaths(host.paths.sysfs / "nothing")).active is None


def test_host_probe_header_carries_the_answer(host: FakeHost) -> None:
    host.module("kvm_amd", avic="N")
    lines = vfio.probe_host(host.paths).header_lines()
    assert lines[-1].startswith("  device posted interrupts: no (kvm_amd avic=N): the irq-bypass -16 host-log")


def test_report_header_says_whether_the_irq_bypass_log_check_can_fire(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--cpr-accel=tcg")
    result.stdout.fnmatch_lines(["pytest-cpr host (VFIO):", "*device posted interrupts: * (*): the irq-bypass -16 "
                                 "host-log check * fire here; the old-QEMU-KVM-fds check covers the mechanism "
                                 "everywhere"])


def test_before_linux_6_5_kvm_registers_consumers_without_posting_so_the_check_can_fire(host: FakeHost) -> None:
    host.module("kvm_amd", avic="N")
    (host.paths.proc / "sys" / "kernel").mkdir(parents=True)
    (host.paths.proc / "sys" / "kernel" / "osrelease").write_text("6.1.0-18-amd64\n")
    probe = posted_interrupts(host.paths)
    assert probe.text() == ("no (kvm_amd avic=N; Linux 6.1.0-18-amd64 registers KVM irq-bypass consumers without "
                            "posting too (until 6.5))")
    assert "the irq-bypass -16 host-log check can fire here" in probe.header_line()
    (host.paths.proc / "sys" / "kernel" / "osrelease").write_text("6.5.0\n")
    assert posted_interrupts(host.paths).consumers_anyway == ""
