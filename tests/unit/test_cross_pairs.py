"""The build pairs of the cross-version passthrough tests and the outcome each is held to."""

from __future__ import annotations

import pytest

from pytest_cpr.errors import CprSettingError
from pytest_cpr.qemu.cross import Direction, Outcome, cross_pair, expected_outcome
from pytest_cpr.qemu.probe import QemuBuild


def build(version: tuple[int, int, int], binary: str = "/usr/bin/qemu-system-x86_64") -> QemuBuild:
    return QemuBuild(binary, version, "", frozenset({"cpr-transfer"}), frozenset({"vfio-pci"}), frozenset())


@pytest.mark.parametrize(("first", "second"), [((11, 1, 3), (11, 1, 2)), ((11, 1, 2), (11, 1, 3))])
def test_pairs_go_older_to_newer_and_back_whatever_the_order_given(first: tuple[int, int, int],
                                                                   second: tuple[int, int, int]) -> None:
    a, b = build(first, "/a"), build(second, "/b")
    up, down = cross_pair(a, b, Direction.UPGRADE), cross_pair(a, b, Direction.DOWNGRADE)
    assert (up.source.version, up.target.version) == ((11, 1, 2), (11, 1, 3))
    assert (down.source.version, down.target.version) == ((11, 1, 3), (11, 1, 2))
    assert up.expected is down.expected is Outcome.COMPLETED
    assert down.describe().startswith("downgrade 11.1.3 -> 11.1.2: expected completed (stable releases of one "
                                      "series (11.1)")


@pytest.mark.parametrize(("source", "target", "outcome"), [
    ((10, 1, 0), (11, 1, 3), Outcome.COMPLETED),  # a newer release loads an older one's state
    ((11, 1, 3), (11, 1, 2), Outcome.COMPLETED),  # one stable series: one migration stream
    ((11, 1, 3), (11, 0, 5), Outcome.REFUSED),  # an older series: not promised, the source resumes
    ((11, 1, 3), (10, 2, 0), Outcome.REFUSED),
])
def test_expected_outcome_of_a_pair(source: tuple[int, int, int], target: tuple[int, int, int],
                                    outcome: Outcome) -> None:
    assert expected_outcome(build(source), build(target))[0] is outcome


def test_two_builds_of_one_version_are_a_setting_mistake() -> None:
    with pytest.raises(CprSettingError, match=r"^--cpr-cross-qemu / CPR_CROSS_QEMU: /b \(QEMU 11.1.3\) is the "
                                              r"version of --cpr-qemu .*set it to a build of another QEMU version"):
        cross_pair(build((11, 1, 3), "/a"), build((11, 1, 3), "/b"), Direction.UPGRADE)
