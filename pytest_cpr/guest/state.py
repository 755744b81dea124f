"""Readers of guest state: /proc/interrupts, boot id and uptime, and the kernel log."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from pytest_cpr.guest.ssh import GuestSSH
from pytest_cpr.procfs import IrqLine as IrqLine  # re-exported: their old home
from pytest_cpr.procfs import parse_interrupts as parse_interrupts

# guest kernel messages that mean a device or driver lost interrupts or DMA
DMESG_FAILURES = re.compile(
    r"NETDEV WATCHDOG|transmit queue \d+ timed out|nvme\S* .*(timeout|I/O \d+ .* timeout|controller is down)"
    r"|hung_task|blocked for more than|soft lockup|hard LOCKUP|irq \d+: nobody cared|Disabling IRQ"
    r"|virtio_net .* (error|failed)|Oops|BUG:|Call Trace|rcu_sched self-detected stall",
    re.IGNORECASE,
)


@dataclass
class GuestSnapshot:
    """What the guest reported at one host time."""

    host_t: float
    boot_id: str
    uptime_s: float
    interrupts: dict[str, IrqLine] = field(default_factory=dict)

    def irq_totals(self, pattern: str) -> dict[str, int]:
        rx = re.compile(pattern)
        return {k: v.total for k, v in self.interrupts.items() if rx.search(v.name)}


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SNAPSHOT_COMMAND = "cat /proc/sys/kernel/random/boot_id; cut -d' ' -f1 /proc/uptime; cat /proc/interrupts"


def parse_snapshot(host_t: float, text: str) -> GuestSnapshot:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    start = next((i for i, ln in enumerate(lines) if _UUID.match(ln)), None)
    if start is None or start + 1 >= len(lines):
        raise ValueError(f"no boot id and uptime in guest output: {text[:200]!r}")
    boot_id, uptime = lines[start], lines[start + 1]
    lines = lines[start:]
    return GuestSnapshot(host_t, boot_id, float(uptime), parse_interrupts("\n".join(lines[2:])))


def snapshot(ssh: GuestSSH) -> GuestSnapshot:
    """One SSH round trip: boot id, uptime and /proc/interrupts."""
    host_t = time.time()
    return parse_snapshot(host_t, ssh.run(SNAPSHOT_COMMAND).stdout)


def dmesg_failures(text: str) -> list[str]:
    return [line for line in text.splitlines() if DMESG_FAILURES.search(line)]
