"""QEMU bugs this plugin has caught, one entry each: which builds and setups they affect.

Each bug has a test that shows it (a strict expected failure on the affected builds, so a fixed build
turns it red: then set `fixed_in`), and the checks every transfer runs name it when they meet its
signature instead of failing on it again, so the rest of what a test checks keeps its value.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_cpr.kinds import Accel
from pytest_cpr.qemu.probe import QemuBuild


@dataclass(frozen=True)
class KnownBug:
    key: str
    summary: str
    since: tuple[int, int, int]
    fixed_in: tuple[int, int, int] | None  # None: no fixed build seen yet
    accel: Accel | None  # the accelerator the old QEMU ran the guest with (None: any)
    vfio: bool  # only with a vfio-pci device in the guest
    reference: str
    source_exit: str  # how the old QEMU ends when it hits the bug (TransferResult.source_exit; "": n/a)
    stderr: str = ""  # a regex of what QEMU prints on stderr when it hits the bug ("": nothing)
    modes: tuple[str, ...] = ()  # only in these CPR modes (): any mode

    def affects(self, build: QemuBuild, accel: str, vfio: bool, mode: str | None = None) -> bool:
        """Whether a transfer from `build` on `accel` (with a vfio-pci device: `vfio`) in `mode` can meet
        it; a bug of some modes only affects a transfer whose mode is given and among them."""
        return (self.since <= build.version and (self.fixed_in is None or build.version < self.fixed_in)
                and (self.accel is None or accel == self.accel) and (vfio or not self.vfio)
                and (not self.modes or mode in self.modes))

    def describe(self, build: QemuBuild) -> str:
        return f"known QEMU bug in {build.short_version} ({self.key}): {self.summary} [{self.reference}]"


# Found in the virtual host (L2 on KVM inside L1, QEMU 11.1.3): every retired source with a vfio-pci
# device (legacy container and iommufd) died with SIGSEGV at kvm_vm_ioctl+0xae (s->vmfd with
# s == NULL) when told to quit, or earlier on `query-balloon`. Without a vfio device the old QEMU
# answers everything and exits 0 (KVM is closed after cpr only for VFIO CPR).
KVM_STATE_NULL_AFTER_CPR = KnownBug(
    key="kvm-state-null-after-cpr",
    summary="after a completed cpr-transfer of a guest with a vfio-pci device the old QEMU has closed "
            "KVM and set kvm_state to NULL, so what touches KVM afterwards crashes it (SIGSEGV): "
            "`quit` (kvm_vm_ioctl), `query-balloon` (kvm_has_sync_mmu)",
    since=(10, 1, 0), fixed_in=None, accel=Accel.KVM, vfio=True,
    reference="QEMU 7ed0919119b0 'migration: close kvm after cpr'; proposed fix 'accel/kvm: Fix SIGSEGV "
              "when execute \"query-balloon\" after CPR transfer' (qemu-devel, Sep 2025)",
    source_exit="signal 11")

# Found by the virtual host's feasibility experiment: the same NULL kvm_state, met with TCG.
KVM_CALL_UNDER_TCG = KnownBug(
    key="kvm-call-under-tcg",
    summary="cpr-transfer of a guest on TCG with a vfio-pci device crashes the old QEMU (SIGSEGV in "
            "kvm_vm_ioctl called from migration_call_notifiers: a KVM call with TCG as the accelerator)",
    since=(10, 1, 0), fixed_in=None, accel=Accel.TCG, vfio=True,
    reference="seen with Debian 1:11.1.3+ds-1~bpo13+1",
    source_exit="signal 11")

# Found by tests/integration/test_mode_preconditions.py (QEMU 11.1.3, TCG, virtio guest): QEMU refuses
# cpr-transfer of guest RAM that is not shared memory (share=off, anonymous -m RAM, aux-ram-share=off)
# with a migration blocker, but not cpr-exec: its RAM blocker is registered for cpr-transfer only
# (physmem.c ram_block_add_cpr_blocker: migrate_add_blocker_modes(..., MIG_MODE_CPR_TRANSFER, -1)),
# while cpr-exec skips every RAM block in the stream as preserved (migrate_ram_is_ignored). The old
# QEMU stops the guest, says completed and exec's; private RAM does not survive an exec, so the new
# QEMU finds zeroed RAM: with share=off or anonymous RAM it fails the load ("post load hook failed for:
# kvm-tpr-opt") and exits 1, the guest lost; with aux-ram-share=off it completes (the new QEMU
# rebuilds the same ROMs and ACPI tables), refused by neither.
CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED = KnownBug(
    key="cpr-exec-volatile-ram-not-blocked",
    summary="cpr-exec is not refused for guest RAM that is not shared memory (share=off, anonymous RAM, "
            "aux-ram-share=off): the old QEMU stops the guest and exec's, the RAM is not carried, the new "
            "QEMU loads the state over zeroed RAM ('post load hook failed for: kvm-tpr-opt') and exits 1",
    since=(10, 2, 0), fixed_in=None, accel=None, vfio=False,
    reference="QEMU physmem.c ram_block_add_cpr_blocker registers MIG_MODE_CPR_TRANSFER only; "
              "migrate_ram_is_ignored treats MIG_MODE_CPR_EXEC as preserving every block (cpr-exec series, 10.2)",
    source_exit="", modes=("cpr-exec",))

# Found by tests/hardware/test_rollback.py in the virtual host (QEMU 11.1.3, legacy container, L2 on KVM):
# the new QEMU's VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR, made while it loads the container's
# state, failed once (our ioctl shim, EIO). The new QEMU did not fail the load: it aborted (SIGABRT,
# "qemu: hardware error: vfio: DMA mapping failed, unable to continue" after "vfio_container_dma_map(...)
# = -5"), after the old QEMU had sent its last byte and reported the migration completed. The old QEMU
# stays in postmigrate, its DMA vaddrs abandoned and KVM closed: the guest runs nowhere. Not in
# KNOWN_BUGS: it ends a failed transfer, never a completed one, so the checks of a completed transfer
# never meet it; its test marks itself with `affects`.
TARGET_VADDR_MAP_FAILURE_LOSES_GUEST = KnownBug(
    key="target-vaddr-map-failure-loses-guest",
    summary="when the new QEMU's VFIO_IOMMU_MAP_DMA with the VADDR flag fails during cpr-transfer's load "
            "(legacy container), the new QEMU aborts ('hardware error: vfio: DMA mapping failed') instead of "
            "failing the load, after the old QEMU reported the migration completed: the old QEMU stays in "
            "postmigrate (vaddrs abandoned, KVM closed) and the guest runs nowhere",
    since=(10, 1, 0), fixed_in=None, accel=Accel.KVM, vfio=True,
    reference="hw/vfio/cpr-legacy.c vfio_container_post_load -> vfio_listener_register -> "
              "vfio_container_region_add (hw_error on a failed dma_map); cpr-transfer has no completion "
              "handshake with the target",
    source_exit="postmigrate", stderr=r"hardware error: vfio: DMA mapping failed")

# Found by tests/hardware/test_passthrough.py::test_mdev_on_iommufd_goes_through_cpr_transfer in the
# virtual host (QEMU 11.1.3, L1 kernel 7.3 with the mtty sample, L2 on KVM): an mdev opened through its
# vfio cdev on an iommufd gets no CPR blocker (the mdev blocker belongs to the legacy container), and
# mtty offers VFIO migration, so at `migrate` QEMU drives the device's migration state machine as in
# a normal migration: "Failed setting device state to STOP_COPY ... Invalid argument", "Failed setting
# device in recover state", then "migration_call_notifiers: Assertion `type == MIG_EVENT_SETUP'
# failed": the old QEMU aborts (SIGABRT), the new one fails its load ("Section footer error"), the
# guest runs nowhere. Not in KNOWN_BUGS (it ends a failed transfer); its test marks itself.
MDEV_ON_IOMMUFD_ABORTS_SOURCE = KnownBug(
    key="mdev-on-iommufd-aborts-source",
    summary="cpr-transfer of a guest with an mdev that offers VFIO migration (mtty), opened on an iommufd: "
            "no blocker, the device is put through STOP_COPY, which fails, and the old QEMU aborts "
            "(assertion in migration_call_notifiers); the new QEMU fails its load and the guest is lost",
    since=(10, 1, 0), fixed_in=None, accel=Accel.KVM, vfio=True,
    reference="hw/vfio/container-legacy.c adds the mdev blocker for the legacy container only; "
              "migration/migration.c migration_call_notifiers asserts a notifier fails only at SETUP",
    source_exit="signal 6", stderr=r"migration_call_notifiers: Assertion|Failed setting device state to STOP_COPY")

# Found by tests/hardware/test_blackout_interrupts.py in the virtual host (QEMU 11.1.3, legacy container
# and iommufd alike, L2 on KVM): with QEMU's e1000e (no FLR) passed through, every cpr-transfer left the
# guest dead: the device received nothing from the moment the new QEMU started (the peer port's
# transmit queue timed out in L1), and the new QEMU stopped the guest at its first MMIO access to the
# device ("error: kvm run failed Bad address": vfio-pci refuses mmap faults of a BAR whose memory
# decode is off). The igb (FLR) is not affected. QEMU skips vfio_pci_reset during an incoming CPR
# (cpr_is_incoming), but a device without FLR is reset by the system reset handler instead
# (vfio_reset_handler -> vfio_pci_hot_reset_multi -> vfio_pci_pre_reset, which clears memory decode,
# bus master and I/O in the PCI command register), and that path has no such guard. Not in
# KNOWN_BUGS: the checks of every transfer do not meet it (no other test passes a device without
# FLR); its tests mark themselves with `affects`.
TARGET_RESETS_DEVICE_WITHOUT_FLR = KnownBug(
    key="target-resets-device-without-flr",
    summary="the new QEMU of a cpr-transfer resets a vfio-pci device without FLR (e.g. QEMU's e1000e) at its "
            "start-up: the system reset's bus-reset path (vfio_reset_handler -> vfio_pci_hot_reset_multi -> "
            "vfio_pci_pre_reset) is not skipped for an incoming CPR as vfio_pci_reset is, so it clears the "
            "device's memory decode and bus master while the old QEMU's guest still uses it; after the "
            "switchover the guest's first access to the device stops it ('kvm run failed Bad address')",
    since=(10, 1, 0), fixed_in=None, accel=None, vfio=True,
    reference="hw/vfio/pci.c: vfio_pci_reset returns early on cpr_is_incoming(); vfio_reset_handler -> "
              "vfio_pci_compute_needs_reset (no FLR, PM reset) -> vfio_pci_hot_reset_multi has no such check "
              "(the 2024 cpr-exec RFC's vfio_pci_hot_reset did: 'if (restore) return 0')",
    source_exit="", stderr=r"kvm run failed Bad address")

# Found in the virtual host's own emulator (the L0 QEMU that runs L1 under TCG), 2026-11-27: not a CPR bug,
# but the one that made the virtual host's passthrough tests unreliable (L2 guests reset themselves, L1
# triple faults, L1 CPUs that never wake). cpu_clear_ignne() clears HF2_IGNNE_MASK in *CPU 0's* hflags2 and
# is called from every vCPU's thread whenever it restores an x87 state with no exception pending (FRSTOR,
# FXRSTOR, XRSTOR: each context switch of a Linux guest). Under MTTCG that plain read-modify-write races
# with CPU 0's own updates of hflags2, so it can write back a stale value: caught with an instrumented
# build, a VMRUN whose VMCB asks for nested paging ran the L2 without HF2_NPT_MASK (its CR3 then read as an
# L1 address: a triple fault), and an interrupt was delivered at the instruction right after #VMEXIT (a
# stale HF2_GIF_MASK). All three failures were on CPU 0. Not in KNOWN_BUGS: no transfer meets it; the
# virtual host avoids it by running L1 on images/qemu-l0 (Debian's 10.0 source with
# images/qemu-l0/ignne-hflags2.patch). It is a race, so it has no strict expected failure: the
# reproducer and the measured rates with and without the patch are in docs/virtual-host.md.
TCG_IGNNE_CLOBBERS_CPU0_HFLAGS2 = KnownBug(
    key="tcg-ignne-clobbers-cpu0-hflags2",
    summary="TCG: any vCPU restoring an x87 state (FRSTOR/FXRSTOR/XRSTOR) runs cpu_clear_ignne(), a non-atomic "
            "read-modify-write of CPU 0's hflags2; under MTTCG it can undo CPU 0's own updates of GIF and of "
            "the nested-paging bit, so nested guests run without nested paging and interrupts arrive with "
            "GIF clear (L2 triple faults, L1 triple faults, lost wakeups)",
    since=(10, 0, 0), fixed_in=None, accel=Accel.TCG, vfio=False,
    reference="target/i386/tcg/system/fpu_helper.c cpu_clear_ignne (X86_CPU(first_cpu)->env), called from "
              "cpu_set_fpus; read in QEMU 10.0.13's source; Debian's 11.1.3 shows the same failures",
    source_exit="")

TCG_VMRUN_SETS_VIRQ_WITHOUT_BQL = KnownBug(
    key="tcg-vmrun-sets-virq-without-bql",
    summary="TCG: VMRUN sets CPU_INTERRUPT_VIRQ in interrupt_request by a plain read-modify-write in the vCPU's "
            "thread without the BQL, while the APIC sets CPU_INTERRUPT_HARD there under the BQL from other "
            "threads (the main loop's timers, other vCPUs' IPIs); the old word written back loses the interrupt "
            "with its vector left in the APIC's IRR, and a halted CPU waiting for its one-shot timer never wakes",
    since=(10, 0, 0), fixed_in=(10, 2, 0), accel=Accel.TCG, vfio=False,
    reference="target/i386/tcg/system/svm_helper.c helper_vmrun (ctl_has_irq); read in QEMU 10.0.13's source; "
              "named on qemu-devel on 2025-08-26 in the series that made interrupt_request atomic "
              "(cpu_set_interrupt), after 10.1",
    source_exit="")

KNOWN_BUGS = (KVM_STATE_NULL_AFTER_CPR, KVM_CALL_UNDER_TCG, CPR_EXEC_VOLATILE_RAM_NOT_BLOCKED)


def known_bugs(build: QemuBuild, accel: str, vfio: bool, mode: str | None = None) -> list[KnownBug]:
    """The known bugs a transfer from `build` running the guest on `accel` in `mode` can meet."""
    return [bug for bug in KNOWN_BUGS if bug.affects(build, accel, vfio, mode)]
