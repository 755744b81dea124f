"""The ioctl fault shim (pytest_cpr/qemu/ioctl_fault.c) in a real process: built with this host's
compiler, preloaded into a Python child that makes the ioctl QEMU makes (on /dev/null, which
answers ENOTTY to any VFIO request). Armed, the matching call fails with the chosen errno once and
is logged; a call with other flag bits, or once the arming is used up, reaches the kernel."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_cpr.errors import CprError
from pytest_cpr.ioctl_faults import (
    IOAS_CHANGE_PROCESS,
    UNMAP_DMA_VADDR_ALL,
    IoctlCall,
    IoctlFault,
    build_shim,
    shim_library,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler to build the shim")

CALLER = """
import errno, fcntl, os, struct, sys
fd = os.open("/dev/null", os.O_RDONLY)
for request, flags in ((int(a, 0), int(b, 0)) for a, b in (x.split("/") for x in sys.argv[1:])):
    try:
        fcntl.ioctl(fd, request, struct.pack("IIQQQ", 32, flags, 0, 0, 0))
        print("ok")
    except OSError as exc:
        print(errno.errorcode[exc.errno])
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim") / "ioctl-fault.so")


def _calls(fault: IoctlFault, *calls: tuple[IoctlCall, int]) -> list[str]:
    """What each ioctl answered in a child process started with the fault's environment."""
    env = {**os.environ, **dict(fault.env())}
    done = subprocess.run([sys.executable, "-c", CALLER, *(f"{c.request:#x}/{flags:#x}" for c, flags in calls)],
                          env=env, capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.split()


def test_armed_shim_fails_the_matching_call_once(shim: Path, tmp_path: Path) -> None:
    fault = IoctlFault(shim, UNMAP_DMA_VADDR_ALL, tmp_path, tmp_path)
    fault.arm()
    vaddr_only = UNMAP_DMA_VADDR_ALL.flags & ~(1 << 1)
    answers = _calls(fault, (UNMAP_DMA_VADDR_ALL, vaddr_only), (UNMAP_DMA_VADDR_ALL, UNMAP_DMA_VADDR_ALL.flags),
                        (UNMAP_DMA_VADDR_ALL, UNMAP_DMA_VADDR_ALL.flags))
    # VADDR without ALL: not the call; VADDR|ALL: fails with EIO; the same again: the kernel's answer
    assert answers == ["ENOTTY", "EIO", "ENOTTY"]
    assert fault.strikes() == 1 and not fault.armed
    assert any("loaded in pid" in ln for ln in fault.lines()), fault.lines()


def test_unarmed_shim_changes_nothing(shim: Path, tmp_path: Path) -> None:
    """Control of the strike count: loaded but not armed, every call reaches the kernel."""
    fault = IoctlFault(shim, IOAS_CHANGE_PROCESS, tmp_path, tmp_path, fail_errno=errno.EPERM)
    answers = _calls(fault, (IOAS_CHANGE_PROCESS, 0), (IOAS_CHANGE_PROCESS, 0))
    assert answers == ["ENOTTY", "ENOTTY"]
    assert fault.strikes() == 0


def test_a_missing_prebuilt_shim_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(CprError, match="CPR_IOCTL_SHIM"):
        shim_library(str(tmp_path / "nope.so"), tmp_path)
