"""The checks of one live update under traffic, and the waits between them.

Interrupt windows before and after the transfer (`window` answered probes each; the one after grows
up to IRQ_WAIT_S for slow vectors), then every check: completed, old QEMU quit cleanly, QEMU quiet
on stderr, connectivity, same boot, interrupts, no link flap (carrier_changes of the main NIC and
any `links` unchanged; the drops the guest's and the probing host's interfaces counted are
recorded), thresholds. A new check goes into
`LiveUpdatePolicy.run`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_cpr import checks
from pytest_cpr.errors import CprError, CprTimeout
from pytest_cpr.guest.state import GuestSnapshot
from pytest_cpr.waits import IRQ_WAIT_S, WINDOW_TIMEOUT_S

if TYPE_CHECKING:
    from pytest_cpr.cpr import TransferResult
    from pytest_cpr.probing import Traffic
    from pytest_cpr.qemu.probe import QemuBuild
    from pytest_cpr.vm import CprVM


class LiveUpdatePolicy:
    """One checked transfer of `vm` under `traffic`."""

    def __init__(self, vm: CprVM, traffic: Traffic, window: int = 100, max_blackout_ms: float | None = None,
                 max_lost_probes: float | None = None, irq_pattern: str | None = None,
                 links: Sequence[str] | None = None) -> None:
        self.vm, self.traffic, self.window = vm, traffic, window
        self.max_blackout_ms, self.max_lost_probes = max_blackout_ms, max_lost_probes
        self.pattern = irq_pattern or vm.nic_irq_pattern()
        self.links = tuple(links) if links is not None else (vm.ifname_of(),)

    def _window(self) -> None:
        self.traffic.wait_answers(self.window, WINDOW_TIMEOUT_S)

    def run(self, target: QemuBuild | None = None) -> TransferResult:
        vm, logs = self.vm, self.vm.artifacts
        s0 = vm.snapshot()
        self._window()
        s1 = vm.snapshot()
        links, host_links = vm.link_counters(self.links), vm.network.link_counters()
        result = vm.transfer(target)
        checks.assert_completed(result, logs)
        checks.assert_source_quit(result, vm.known_bugs(result), logs)
        checks.assert_qemu_quiet(result, vm.known_bugs(result), logs)
        self._assert_connectivity(result)
        s2 = vm.snapshot()
        links_after = vm.link_counters(self.links)
        result.link_drops = {**checks.drops_grown(links, links_after, "guest"),
                             **checks.drops_grown(host_links, vm.network.link_counters(), "host")}
        self._window_after(result, s2)
        s3 = self._until_vectors_fire_again(checks.active_vectors(s0, s1, self.pattern), s2, vm.snapshot())
        checks.assert_same_boot(s1, s2, logs=logs)
        result.interrupts = checks.assert_interrupts((s0, s1), (s2, s3), self.pattern, logs)
        try:
            checks.assert_no_link_flap(checks.carrier(links), checks.carrier(links_after), result, logs)
        finally:
            vm.write_transfers(result)  # with the interrupt counts and carrier changes the checks just took
        checks.assert_thresholds(result, self.max_blackout_ms, self.max_lost_probes, logs)
        return result

    def _assert_connectivity(self, result: TransferResult) -> None:
        try:
            checks.assert_connectivity(result, self.vm.artifacts)
        except checks.CheckFailed as exc:
            why = self.vm.diagnose(f"no connectivity after transfer {result.index}")
            raise checks.CheckFailed(f"{exc}; {why}") from None

    def _window_after(self, result: TransferResult, since: GuestSnapshot) -> None:
        try:
            self._window()
        except CprTimeout as exc:  # the probes crawl: do the NIC's vectors still fire?
            raise CprTimeout(f"{exc}; {self.vectors_since(since)}; "
                             f"{self.vm.diagnose(f'probes crawl after transfer {result.index}')}") from None

    def _until_vectors_fire_again(self, fired_before: dict[str, int], s2: GuestSnapshot,
                                  s3: GuestSnapshot) -> GuestSnapshot:
        """A slow vector (NVMe completions under nested emulation: a few per second) may miss one
        window: the window after grows, while traffic flows, until each vector that fired before
        fired again or IRQ_WAIT_S passed; a vector silent that long is the lost-interrupt bug."""
        deadline = time.monotonic() + IRQ_WAIT_S
        while set(fired_before) - set(checks.active_vectors(s2, s3, self.pattern)) and time.monotonic() < deadline:
            self._window()
            s3 = self.vm.snapshot()
        return s3

    def vectors_since(self, before: GuestSnapshot) -> str:
        """How often the vectors of the pattern fired since `before` (an auto-masked MSI-X vector
        whose message was lost stays silent until the driver's watchdog kicks it)."""
        try:
            now = self.vm.snapshot()
        except CprError:
            try:
                now = self.vm.snapshot(via="console")
            except CprError as exc:
                return f"guest interrupt counts unreadable over SSH and console ({exc})"
        fired = checks.active_vectors(before, now, self.pattern)
        return (f"guest vectors {self.pattern!r} in the {now.uptime_s - before.uptime_s:.0f} s since the transfer: "
                f"{fired or 'none fired'} (totals then: {before.irq_totals(self.pattern)})")
