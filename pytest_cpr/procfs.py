"""Parsers of /proc files that host and guest share (the same kernel formats on both sides)."""

from __future__ import annotations

from dataclasses import dataclass

# The kernel's per-interface counts of frames a NIC or the stack dropped (rtnl link stats, the same
# as /sys/class/net/<if>/statistics/): rx_missed_errors, a full receive ring; rx_over/fifo, an
# overrun; rx_dropped, the stack; tx_dropped, a frame the interface could not send
DROP_COUNTERS = ("rx_missed_errors", "rx_over_errors", "rx_fifo_errors", "rx_dropped", "tx_dropped")


@dataclass(frozen=True)
class IrqLine:
    irq: str
    counts: tuple[int, ...]
    chip: str
    name: str

    @property
    def total(self) -> int:
        return sum(self.counts)


def parse_interrupts(text: str) -> dict[str, IrqLine]:
    """Parse /proc/interrupts into lines keyed by 'irq:name' (irq alone for unnamed lines)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out: dict[str, IrqLine] = {}
    for line in lines[1:]:
        if ":" not in line:
            continue
        irq, rest = line.split(":", 1)
        fields = rest.split()
        counts: list[int] = []
        for f in fields[:ncpu]:
            if not f.isdigit():
                break
            counts.append(int(f))
        tail = fields[len(counts):]
        if not counts:
            continue
        # tail: chip, hwirq/trigger ..., device name (last field); ERR/MIS have no tail
        name = tail[-1] if tail else irq.strip()
        chip = " ".join(tail[:-1]) if len(tail) > 1 else ""
        key = f"{irq.strip()}:{name}"
        out[key] = IrqLine(irq.strip(), tuple(counts), chip, name)
    return out


@dataclass(frozen=True)
class LockedMemory:
    """A process's locked and pinned memory in KiB, from /proc/<pid>/status: VmLck (mm->locked_vm:
    mlock, and the legacy VFIO type1 container's pins) and VmPin (mm->pinned_vm: iommufd's pins)."""

    vmlck_kib: int
    vmpin_kib: int
    ipc_lock: bool = False  # CAP_IPC_LOCK effective: the kernel charges its pins to no limit

    @property
    def total_kib(self) -> int:
        return self.vmlck_kib + self.vmpin_kib

    def __str__(self) -> str:
        return f"VmLck {self.vmlck_kib} kB, VmPin {self.vmpin_kib} kB"


CAP_IPC_LOCK = 14


def parse_locked_memory(status: str) -> LockedMemory:
    """VmLck and VmPin of a /proc/<pid>/status text (a kernel without one of them: 0)."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def kib(name: str) -> int:
        value = fields.get(name, "0 kB").split()
        return int(value[0]) if value else 0

    cap_eff = int(fields.get("CapEff", "0").strip() or "0", 16)
    return LockedMemory(kib("VmLck"), kib("VmPin"), bool(cap_eff & 1 << CAP_IPC_LOCK))
