"""The small closed sets pytest-cpr talks about, as string enums: a value compares, hashes and
serialises as its string, so JSON files and messages read as before while mypy checks the names."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """Points of a transfer's timeline (host wall time of each, in TransferResult.timeline)."""

    STEP_START = "step_start"
    TARGET_SPAWNED = "target_spawned"
    TARGET_LISTENING = "target_listening"
    MIGRATE_ISSUED = "migrate_issued"
    GUEST_SUSPENDED = "guest_suspended"  # cpr-reboot with suspend: the source said SUSPEND
    SOURCE_STOPPED = "source_stopped"
    MIGRATION_COMPLETED = "migration_completed"
    MIGRATION_FAILED = "migration_failed"
    MIGRATION_CANCELLED = "migration_cancelled"
    TARGET_RUNNING = "target_running"
    GUEST_WOKEN = "guest_woken"  # cpr-reboot with suspend: the target said WAKEUP
    FIRST_PROBE_AFTER = "first_probe_after"
    SSH_ANSWERED = "ssh_answered"
    SOURCE_EXITED = "source_exited"

    @classmethod
    def migration_ended(cls, status: str) -> Phase:
        """The phase of a final MIGRATION event status (completed, failed, cancelled)."""
        return cls(f"migration_{status}")


class Accel(StrEnum):
    """Accelerator setting: AUTO is resolved to KVM or TCG before a guest boots."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Backend(StrEnum):
    """VFIO backend of passthrough devices."""

    LEGACY = "legacy"
    IOMMUFD = "iommufd"


class Role(StrEnum):
    """What a passthrough device is used as in the guest."""

    NIC = "nic"
    NIC_E1000E = "nic-e1000e"  # a NIC whose guest driver is e1000e: its interrupt mode is chosen (IntMode)
    NVME = "nvme"
    OTHER = "other"

    @property
    def is_nic(self) -> bool:
        """A network card: it takes guest_ip, peer_interface and peer_ip in the host config."""
        return self in (Role.NIC, Role.NIC_E1000E)


class Mode(StrEnum):
    """CPR migration modes a test can ask for with the `cpr` marker."""

    CPR_TRANSFER = "cpr-transfer"  # a new QEMU process; fds over the cpr channel (QEMU >= 10.0)
    CPR_EXEC = "cpr-exec"  # the same process exec's the new QEMU; state in a file (QEMU >= 10.2)
    CPR_REBOOT = "cpr-reboot"  # state to a file, the old QEMU quits, a new one loads it (QEMU >= 8.2)
    NORMAL = "normal"  # not CPR: a new QEMU gets RAM and state copied over the stream (for contrast)


def values(kind: type[StrEnum]) -> tuple[str, ...]:
    """The plain strings of an enum, for messages and tables."""
    return tuple(member.value for member in kind)
