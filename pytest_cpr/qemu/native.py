"""The plugin's C pieces, built on the machine that runs them: the ioctl fault shim (LD_PRELOAD into a
QEMU) and the TCG plugin that records a vCPU's last interrupts and exceptions (tcg_discon.c)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pytest_cpr.errors import CprError

HERE = Path(__file__).resolve().parent
TCG_DISCON_SOURCE = HERE / "tcg_discon.c"
SHIM_SOURCE = HERE / "ioctl_fault.c"


def build_shared(source: Path, out: Path, what: str, compiler: str | None = None) -> Path:
    """Compile one C file into the shared object `out`; raises CprError naming `what` needs it, with the
    compiler's words, or that there is no compiler."""
    cc = compiler or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise CprError(f"no C compiler (cc, gcc) to build {source.name}: install gcc ({what})")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out),
                           str(source)], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise CprError(f"{cc} could not build {source}: {done.stderr.strip() or done.stdout.strip()}")
    return out
