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
    accel: Accel  # the accelerator the old QEMU ran the guest with
    vfio: bool  # only with a vfio-pci device in the guest
    reference: str
    source_exit: str  # how the old QEMU ends when it hits the bug (TransferResult.source_exit)
    stderr: str = ""  # a regex of what QEMU prints on stderr when it hits the bug ("": nothing)

    def affects(self, build: QemuBuild, accel: str, vfio: bool) -> bool:
        return (self.since <= build.version and (self.fixed_in is None or build.version < self.fixed_in)
                and accel == self.accel and (vfio or not self.vfio))

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

KNOWN_BUGS = (KVM_STATE_NULL_AFTER_CPR, KVM_CALL_UNDER_TCG)


def known_bugs(build: QemuBuild, accel: str, vfio: bool) -> list[KnownBug]:
    """The known bugs a transfer from `build` running the guest on `accel` can meet."""
    return [bug for bug in KNOWN_BUGS if bug.affects(build, accel, vfio)]
