"""Units a user writes in settings and the host config."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(i?B)?$", re.IGNORECASE)
MAX_MIB = 1024 * 1024  # 1 TiB of guest memory


def parse_mib(text: str) -> int:
    """'512M', '2G', '1024' (MiB) -> MiB, from 64 MiB to 1 TiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size")
    n, unit = int(m.group(1)), m.group(2).upper()
    mib = {"": n, "K": n // 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]
    if mib < 64:
        raise ValueError(f"{text!r} is below 64 MiB, too small to boot a guest")
    if mib > MAX_MIB:
        raise ValueError(f"{text!r} is above 1T, more than a test guest can get")
    return mib
