"""Readers of guest state: /proc/interrupts, boot id and uptime, and the kernel log."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from pytest_cpr.guest.ssh import GuestSSH
from pytest_cpr.procfs import DROP_COUNTERS
from pytest_cpr.procfs import IrqLine as IrqLine  # re-exported: their old home
from pytest_cpr.procfs import parse_interrupts as parse_interrupts

# guest kernel messages that mean a device or driver lost interrupts or DMA
DMESG_FAILURES = re.compile(
    r"NETDEV WATCHDOG|transmit queue \d+ timed out|nvme\S* .*(timeout|I/O \d+ .* timeout|controller is down)"
    r"|hung_task|blocked for more than|soft lockup|hard LOCKUP|irq \d+: nobody cared|Disabling IRQ"
    # BUG: in capitals only, as the kernel prints it ("..MP-BIOS bug: 8254 timer not connected to
    # IO-APIC" is an informational boot line, seen under TCG on a loaded host)
    r"|virtio_net .* (error|failed)|Oops|(?-i:BUG:)|Call Trace|rcu_sched self-detected stall"
    # a NIC reset or link loss (igb, e1000e): a passthrough NIC must come through a transfer untouched
    r"|Reset adapter|Detected Tx Unit Hang|NIC Link is Down",
    re.IGNORECASE,
)
LINK_DOWN = re.compile(r"NIC Link is Down", re.IGNORECASE)
_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


@dataclass
class GuestSnapshot:
    """What the guest reported, read between host times host_t (command sent) and host_end (answer
    back; None: at host_t)."""

    host_t: float
    boot_id: str
    uptime_s: float
    interrupts: dict[str, IrqLine] = field(default_factory=dict)
    host_end: float | None = None

    @property
    def answered_t(self) -> float:
        return self.host_t if self.host_end is None else self.host_end

    def irq_totals(self, pattern: str) -> dict[str, int]:
        rx = re.compile(pattern)
        return {k: v.total for k, v in self.interrupts.items() if rx.search(v.name)}


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SNAPSHOT_COMMAND = "cat /proc/sys/kernel/random/boot_id; cut -d' ' -f1 /proc/uptime; cat /proc/interrupts"


def parse_snapshot(host_t: float, text: str, host_end: float | None = None) -> GuestSnapshot:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    start = next((i for i, ln in enumerate(lines) if _UUID.match(ln)), None)
    if start is None or start + 1 >= len(lines):
        raise ValueError(f"no boot id and uptime in guest output: {text[:200]!r}")
    boot_id, uptime = lines[start], lines[start + 1]
    lines = lines[start:]
    return GuestSnapshot(host_t, boot_id, float(uptime), parse_interrupts("\n".join(lines[2:])), host_end)


def snapshot(ssh: GuestSSH) -> GuestSnapshot:
    """One SSH round trip: boot id, uptime and /proc/interrupts."""
    host_t = time.time()
    out = ssh.run(SNAPSHOT_COMMAND).stdout
    return parse_snapshot(host_t, out, time.time())


def dmesg_failures(text: str, link_settled_s: float | None = None) -> list[str]:
    """Lines of the guest kernel log that mean trouble. `link_settled_s`: guest uptime by which the
    harness had set up the NICs' peers (moving a peer port into the guest's namespace takes its link
    down once); a link-down line stamped before it is the harness's, not the transfer's."""
    def harness_link(line: str) -> bool:
        stamp = _STAMP.match(line)
        return (link_settled_s is not None and stamp is not None and float(stamp.group(1)) <= link_settled_s
                and LINK_DOWN.search(line) is not None)

    return [line for line in text.splitlines() if DMESG_FAILURES.search(line) and not harness_link(line)]


# What the kernel counts per guest interface across a transfer: carrier changes (every carrier down
# and up a driver reports: a NIC reset or link flap) and the frames dropped (procfs.DROP_COUNTERS).
LINK_COUNTERS = ("carrier_changes", *(f"statistics/{c}" for c in DROP_COUNTERS))


def link_command(ifnames: list[str] | tuple[str, ...]) -> str:
    """Shell command printing '<ifname> <counter> <value>' for each of LINK_COUNTERS per interface."""
    bad = [n for n in ifnames if not _IFNAME.match(n)]
    if bad:
        raise ValueError(f"not interface names: {bad}")
    files = " ".join(LINK_COUNTERS)
    return "; ".join(f'for c in {files}; do echo "{n} ${{c#statistics/}} $(cat /sys/class/net/{n}/$c)"; done'
                     for n in ifnames)


def parse_link_counters(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2].isdigit():
            out.setdefault(fields[0], {})[fields[1]] = int(fields[2])
    return out
