"""What QEMU says on stderr during a transfer: the lines that are news.

QEMU reports most trouble of a cpr-transfer only there (a `vfio_container_dma_map ... File exists`
from a mapping restored twice, a VADDR or config-space complaint) while the transfer still
completes. A line is news when it names trouble (NOTEWORTHY) and no QEMU of the guest said it
before the transfer began (a configuration's warnings come again from every new QEMU and are not
the transfer's doing: "VFIO dma-buf not supported in kernel"; with iommufd "IOMMU_IOAS_MAP failed:
Bad address, PCI BAR?", the `vfio_container_dma_map(...) = -14` of a BAR that cannot be mapped for
peer-to-peer, at other addresses, and "<device>: PCI peer-to-peer transactions on BARs are not
supported", which the first QEMU says for the NVMe only once the guest's driver maps its BARs).
"""

from __future__ import annotations

import re
from pathlib import Path

NOTEWORTHY = re.compile(r"error|warn|fail|vfio|iommufd|migrat|cpr|dma|unable|cannot|invalid|abort|assert|"
                        r"unsupported|not supported|denied|refus", re.IGNORECASE)
_PROGRAM = re.compile(r"^\S*qemu-system-\S+: ")
_NUMBER = re.compile(r"0x[0-9a-fA-F]+")  # addresses differ from process to process
_PCI = re.compile(r"\b[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b")  # and the device named


def size(path: Path) -> int:
    """Bytes written so far (0 before the file exists)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lines_since(path: Path, offset: int = 0) -> list[str]:
    """The lines written from `offset` on, without the program-name prefix."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [_PROGRAM.sub("", line).strip() for line in text.splitlines() if line.strip()]


def _shape(line: str) -> str:
    """A line with its hex numbers and PCI addresses blanked: what two QEMU processes saying the same
    thing share (iommufd's p2p warning comes once per process, about whichever device's BAR came first)."""
    return _PCI.sub("<pci>", _NUMBER.sub("0x_", line))


def traced(lines: list[str], event: str) -> list[str]:
    """The arguments of each line that trace `event` printed (QEMU's log trace backend: `event args`)."""
    return [line[len(event):].strip() for line in lines if line.split(" ", 1)[0] == event]


def news(lines: list[str], startup: set[str], trace_events: tuple[str, ...] = ()) -> list[str]:
    """The noteworthy lines that are not start-up noise (compared with their addresses blanked: a new
    QEMU maps at other addresses), in order, each once. Lines of the trace events the harness asked
    for are its instruments, not QEMU's complaints."""
    seen = {_shape(line) for line in startup}
    out = []
    for line in lines:
        if line.split(" ", 1)[0] in trace_events:
            continue
        if NOTEWORTHY.search(line) and _shape(line) not in seen:
            seen.add(_shape(line))
            out.append(line)
    return out
