"""Cross-version live update of passthrough guests: the build pairs the cross tests run (the older
build -> the newer one, and back) and the outcome QEMU promises for each, asserted as such: a
completed update with every check, or a failed one whose source keeps the guest."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pytest_cpr.errors import CprSettingError
from pytest_cpr.qemu.probe import QemuBuild


class Direction(StrEnum):
    UPGRADE = "upgrade"  # the older build -> the newer one
    DOWNGRADE = "downgrade"  # the newer build -> the older one


class Outcome(StrEnum):
    COMPLETED = "completed"  # the update completes with every check
    REFUSED = "refused"  # the transfer fails and the source QEMU keeps the guest and its devices


@dataclass(frozen=True)
class CrossPair:
    direction: Direction
    source: QemuBuild
    target: QemuBuild
    expected: Outcome
    why: str  # the promise the expectation rests on

    def describe(self) -> str:
        return (f"{self.direction} {self.source.short_version} -> {self.target.short_version}: expected "
                f"{self.expected} ({self.why})")


def expected_outcome(source: QemuBuild, target: QemuBuild) -> tuple[Outcome, str]:
    """What QEMU promises for source -> target, and why. A newer release loads an older one's state (the
    source's versioned machine type is kept); a stable release of the same series (x.y.z -> x.y.w)
    keeps the migration stream, so both ways complete. Older releases are not promised to load newer
    state: the target fails and the source must resume (seen without vfio: 11.1.3 -> 10.0.2,
    `vmstate_load_state error -2` in the older build, README "Cross-version live update")."""
    if target.version >= source.version:
        return Outcome.COMPLETED, "a newer QEMU loads an older one's state under its versioned machine type"
    if target.version[:2] == source.version[:2]:
        series = ".".join(map(str, source.version[:2]))
        return Outcome.COMPLETED, f"stable releases of one series ({series}) keep the migration stream"
    return Outcome.REFUSED, "an older QEMU is not promised to load a newer one's state: the source must resume"


def cross_pair(first: QemuBuild, second: QemuBuild, direction: Direction) -> CrossPair:
    """The pair of `direction` made of two builds given in any order (--cpr-qemu, --cpr-cross-qemu);
    two builds of one version have no direction (a setting's mistake)."""
    if first.version == second.version:
        raise CprSettingError(f"--cpr-cross-qemu / CPR_CROSS_QEMU: {second.describe()} is the version of "
                              f"--cpr-qemu ({first.describe()}); set it to a build of another QEMU version")
    older, newer = sorted((first, second), key=lambda b: b.version)
    source, target = (older, newer) if direction is Direction.UPGRADE else (newer, older)
    return CrossPair(direction, source, target, *expected_outcome(source, target))
