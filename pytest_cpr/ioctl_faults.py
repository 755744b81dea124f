"""Kernel calls that fail inside a QEMU process: one ioctl fails once, where the test says.

The shim is ours (pytest_cpr/qemu/ioctl_fault.c), a shared object given to the QEMU processes the
harness starts for a guest as LD_PRELOAD (VmSpec.env; `faults.target_args(vm, env=...)` for the next
target only). It fails the first call matching the request number and the flag bits of its argument
while the fault is armed (a file exists), and logs each strike; every other call goes to the C
library. So a test can start a QEMU with the shim and arm it at the moment that counts:

    fault = IoctlFault(shim, UNMAP_DMA_VADDR_ALL, vm.rundir, vm.artifacts)
    with faults.target_args(vm, env=fault.env()):
        vm.transfer()                 # the new QEMU carries the shim, unarmed
    fault.arm()
    vm.transfer()                     # its VFIO_IOMMU_UNMAP_DMA VADDR|ALL fails: the transfer too
    assert fault.strikes() == 1

Usable without pytest. The shim needs a C compiler once (`build_shim`), or a prebuilt copy
(--cpr-ioctl-shim / CPR_IOCTL_SHIM: the virtual host builds it on L0, since L1 has no compiler).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from pytest_cpr.errors import CprError
from pytest_cpr.host.vfio import IOMMU_IOAS_CHANGE_PROCESS, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA
from pytest_cpr.qemu.native import SHIM_SOURCE, build_shared

STRUCK = "failed ioctl"
LOADED = "loaded in pid"


@dataclass(frozen=True)
class IoctlCall:
    """An ioctl QEMU makes, as the shim tells it from others: the request number and the flag bits
    its argument holds in the 32-bit word at `flags_offset` (0: any argument)."""

    name: str
    request: int
    flags_offset: int = 0
    flags: int = 0


# linux/vfio.h: struct vfio_iommu_type1_dma_map / _unmap begin with argsz, flags (u32 each)
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2
MAP_DMA_VADDR = IoctlCall("VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR", VFIO_IOMMU_MAP_DMA, 4,
                          VFIO_DMA_MAP_FLAG_VADDR)
UNMAP_DMA_VADDR_ALL = IoctlCall("VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR|ALL", VFIO_IOMMU_UNMAP_DMA, 4,
                                VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL)
IOAS_CHANGE_PROCESS = IoctlCall("IOMMU_IOAS_CHANGE_PROCESS", IOMMU_IOAS_CHANGE_PROCESS)


def build_shim(out: Path, compiler: str | None = None) -> Path:
    """Compile the shim into `out` (a .so); raises CprError with the compiler's words."""
    return build_shared(SHIM_SOURCE, out, "or set --cpr-ioctl-shim / CPR_IOCTL_SHIM to a copy built elsewhere, "
                        "with a C library as old as this host's, or older", compiler)


def shim_library(prebuilt: str | None, workdir: Path) -> Path:
    """The shim to preload, in `workdir`: a copy of `prebuilt` if set (it must exist; a local copy,
    since it may sit on a share, e.g. 9p in the virtual host), else one built there now."""
    out = workdir / "ioctl-fault.so"
    if prebuilt:
        path = Path(prebuilt)
        if not path.is_file():
            raise CprError(f"setting --cpr-ioctl-shim / CPR_IOCTL_SHIM: {path} does not exist; build it with "
                           f"`cc -shared -fPIC -o ioctl-fault.so {SHIM_SOURCE}` or unset it")
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        return out
    return build_shim(out)


class IoctlFault:
    """One ioctl to fail in the QEMU processes started with `env()`, once per `arm()`."""

    def __init__(self, shim: Path, call: IoctlCall, rundir: Path, logdir: Path, fail_errno: int = errno.EIO) -> None:
        self.shim, self.call, self.fail_errno = shim, call, fail_errno
        name = f"ioctl-fault-{call.request:x}"
        self.arm_file = rundir / f"{name}.armed"  # the guest's private run directory
        self.log = logdir / f"{name}.log"  # the test's artifacts: kept

    def env(self) -> tuple[tuple[str, str], ...]:
        c = self.call
        return (("LD_PRELOAD", str(self.shim)),
                ("CPR_IOCTL_FAULT", f"{c.request:#x}:{c.flags_offset}:{c.flags:#x}:{self.fail_errno}"),
                ("CPR_IOCTL_FAULT_ARM", str(self.arm_file)), ("CPR_IOCTL_FAULT_LOG", str(self.log)))

    def arm(self) -> None:
        self.arm_file.touch()

    def disarm(self) -> None:
        self.arm_file.unlink(missing_ok=True)

    @property
    def armed(self) -> bool:
        return self.arm_file.exists()

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def loaded_in(self, pid: int) -> bool:
        """The shim was loaded in process `pid` with a valid fault (its constructor's line)."""
        return any(f"{LOADED} {pid}:" in ln for ln in self.lines())

    def strikes(self, pid: int | None = None) -> int:
        """How many calls the shim failed (in process `pid`, or in any)."""
        return sum(1 for ln in self.lines() if STRUCK in ln and (pid is None or f"pid {pid}:" in ln))

    def describe(self) -> str:
        return (f"{self.call.name} fails with {errno.errorcode.get(self.fail_errno, self.fail_errno)} "
                f"(shim {self.shim}, log {self.log})")
