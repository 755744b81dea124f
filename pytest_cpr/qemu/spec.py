"""The VM spec: plain data from which both the source and the target command lines are built.

The target of a cpr-transfer is the same spec plus the incoming channels, so the two command
lines cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pytest_cpr.kinds import Accel


def opt(value: object) -> str:
    """A value inside a QEMU option string (key=value,key=value): a comma is written twice, so a path
    such as /data/a,b stays one value instead of ending it and starting a sub-option."""
    return str(value).replace(",", ",,")


# Guest kernel work skipped, each slow under TCG (bench/README.md, boot-to-SSH): the crypto self-tests
# at boot (~0.3 s), the check that the timer interrupt works, zeroing every page the kernel allocates
# (a hardening default) and the Spectre mitigations (retpolines make each indirect call several
# translated blocks). A test guest needs none of them under TCG; on KVM they are not given (the guest
# boots as a user's would, and they pay little there).
FAST_BOOT_ARGS = ("cryptomgr.notests", "no_timer_check", "init_on_alloc=0", "mitigations=off")


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC on a tap whose fd the harness owns and hands to every QEMU process."""

    netdev_id: str
    mac: str
    tap_fd: int
    guest_cidr: str  # address/prefix the guest configures on this NIC
    vnet_hdr: bool = False

    def args(self) -> list[str]:
        # vnet_hdr follows the tap's IFF_VNET_HDR flag: QEMU rejects vnet_hdr= together with fd=. No option
        # ROM (romfile=): the guest never boots from the network, and SeaBIOS would start iPXE at every boot.
        return ["-netdev", f"tap,id={self.netdev_id},fd={self.tap_fd}",
                "-device", f"virtio-net-pci,netdev={self.netdev_id},mac={self.mac},id=nic-{self.netdev_id},romfile="]

    def kernel_arg(self, index: int) -> str:
        return f"cpr.net{index}={self.mac},{self.guest_cidr}"


@dataclass(frozen=True)
class Incoming:
    """cpr-transfer channels of a target QEMU: main migration stream and cpr (fd) channel (None: a
    normal migration, the main stream only). With `cpr_fd` the harness listens on the cpr socket
    itself and the target gets that listening socket as an inherited fd (`addr.type=fd`), as
    management software does; the source connects by path."""

    main_socket: Path
    cpr_socket: Path | None
    cpr_fd: int | None = None

    def main_addr(self) -> dict[str, str]:
        return {"transport": "socket", "type": "unix", "path": str(self.main_socket)}

    def cpr_addr(self) -> dict[str, str]:
        return {"transport": "socket", "type": "unix", "path": str(self.cpr_socket)}

    def channels(self) -> list[dict[str, object]]:
        main: list[dict[str, object]] = [{"channel-type": "main", "addr": self.main_addr()}]
        return main if self.cpr_socket is None else [*main, {"channel-type": "cpr", "addr": self.cpr_addr()}]

    def args(self) -> list[str]:
        if self.cpr_socket is None:
            return ["-incoming", f"unix:{self.main_socket}"]
        addr = self.cpr_addr() if self.cpr_fd is None else \
            {"transport": "socket", "type": "fd", "str": str(self.cpr_fd)}
        cpr = json.dumps({"channel-type": "cpr", "addr": addr}, separators=(",", ":"))
        return ["-incoming", f"unix:{self.main_socket}", "-incoming", cpr]

    def pass_fds(self) -> tuple[int, ...]:
        return () if self.cpr_fd is None else (self.cpr_fd,)

    @property
    def carries_fds(self) -> bool:
        """The new QEMU gets the old one's fds in CPR state (cpr-transfer; not a normal migration)."""
        return self.cpr_socket is not None


@dataclass(frozen=True)
class ExecIncoming:
    """cpr-exec channel of the new QEMU the old one exec's: the main stream in a file (QEMU documents
    a file-like URI: the two never run at once), read at start (-incoming file:, no monitor command
    in the guest's pause). The fds travel in a memfd QEMU names in the environment
    (QEMU_CPR_EXEC_STATE): no cpr channel."""

    state_file: Path

    def channels(self) -> list[dict[str, object]]:
        return [{"channel-type": "main",
                 "addr": {"transport": "file", "filename": str(self.state_file), "offset": 0}}]

    def args(self) -> list[str]:
        return ["-incoming", f"file:{self.state_file}"]

    def pass_fds(self) -> tuple[int, ...]:
        return ()

    carries_fds = True  # kept across exec, named in the CPR state memfd


@dataclass(frozen=True)
class RebootIncoming:
    """cpr-reboot channel: the old QEMU writes the VM state to a file and quits; the new QEMU starts
    with `-incoming defer` (QEMU documents it so: the mode and x-ignore-shared are set over QMP before
    `migrate-incoming` reads the file). Guest RAM in a named shared file is not copied but kept in
    place (x-ignore-shared)."""

    state_file: Path

    def channels(self) -> list[dict[str, object]]:
        return ExecIncoming(self.state_file).channels()

    def args(self) -> list[str]:
        return ["-incoming", "defer"]

    def pass_fds(self) -> tuple[int, ...]:
        return ()

    carries_fds = False  # no CPR state: the old QEMU quit with its fds


AnyIncoming = Incoming | ExecIncoming | RebootIncoming


@dataclass(frozen=True)
class VmSpec:
    name: str
    accel: Accel  # KVM or TCG (AUTO is resolved before a spec is built)
    memory_mib: int
    cpus: int
    kernel: Path | None  # None: boot the root disk through firmware (a user's cloud image)
    initrd: Path | None
    rootfs: Path
    cmdline: tuple[str, ...] = ()
    nics: tuple[Nic, ...] = ()
    extra_args: tuple[str, ...] = ()  # further devices (vfio-pci, iommufd objects), appended verbatim
    ram_file: Path | None = None  # None: memfd; else a file (e.g. on /dev/shm) shared with the target
    # what CPR needs of guest RAM (QEMU's CPR.rst), made switchable to show QEMU refusing without it:
    ram_share: bool = True  # share=on on the memory backend
    anonymous_ram: bool = False  # no memory backend at all: plain -m, anonymous private RAM
    aux_ram_share: bool = True  # -machine aux-ram-share=on: ROMs, VGA RAM etc. in shared memory too
    s3: bool = False  # offer the guest suspend to RAM (q35 hides S3 by default)
    extra_fds: tuple[int, ...] = field(default=())
    # a versioned machine type (pc-q35-10.0), never the moving alias: source and target must agree
    machine: str = "q35"
    root_format: str = "raw"
    root_readonly: bool = True  # the built guest image is shared read-only; cloud images get an overlay
    seed_iso: Path | None = None  # cloud-init NoCloud seed (cidata)
    # more environment for the QEMU processes the harness starts from this spec (e.g. LD_PRELOAD of a
    # fault shim); a cpr-exec'd QEMU inherits its predecessor's environment instead
    env: tuple[tuple[str, str], ...] = ()
    # a guest vIOMMU (intel-iommu, caching mode for vfio): each passed-through device gets its own
    # address space, so QEMU gives it its own legacy container / iommufd IOAS
    viommu: bool = False
    trace_events: tuple[str, ...] = ()  # QEMU trace events to print on stderr (the log trace backend)

    def pass_fds(self) -> tuple[int, ...]:
        return tuple(n.tap_fd for n in self.nics) + self.extra_fds

    def append_line(self) -> str:
        nets = [nic.kernel_arg(i) for i, nic in enumerate(self.nics)]
        fast = FAST_BOOT_ARGS if self.accel == Accel.TCG else ()
        return " ".join(["console=ttyS0", "quiet", "panic=-1", *fast, *nets, *self.cmdline])

    def ram_backend(self) -> str:
        size, share = f"size={self.memory_mib}M", "on" if self.ram_share else "off"
        if self.ram_file is None:
            return f"memory-backend-memfd,id=ram0,{size},share={share}"
        return f"memory-backend-file,id=ram0,{size},share={share},mem-path={opt(self.ram_file)}"

    def machine_args(self) -> list[str]:
        machine = self.machine + ("" if self.anonymous_ram else ",memory-backend=ram0")
        machine += ",aux-ram-share=on" if self.aux_ram_share else ""  # off is QEMU's default
        return ["-machine", machine] + ([] if self.anonymous_ram else ["-object", self.ram_backend()])

    def boot_args(self) -> list[str]:
        ro = ",readonly=on" if self.root_readonly else ""
        args = []
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel), "-append", self.append_line()]
            if self.initrd is not None:
                args += ["-initrd", str(self.initrd)]
        args += ["-drive", f"file={opt(self.rootfs)},if=none,id=root,format={self.root_format}{ro}",
                 "-device", "virtio-blk-pci,drive=root,id=rootdisk,bootindex=1"]
        if self.seed_iso is not None:
            args += ["-drive", f"file={opt(self.seed_iso)},if=none,id=seed,format=raw,readonly=on",
                     "-device", "virtio-blk-pci,drive=seed,id=seeddisk"]
        return args

    def argv(self, binary: str, console_socket: Path, console_log: Path, qmp_socket: Path,
             incoming: AnyIncoming | None = None, paused: bool = False) -> list[str]:
        """Command line of one QEMU process of this VM (source when incoming is None)."""
        accel = "tcg,thread=multi" if self.accel == Accel.TCG else "kvm"
        cpu = "host" if self.accel == Accel.KVM else "max"
        args = [
            binary, "-name", f"{self.name},debug-threads=on",
            "-accel", accel, "-cpu", cpu,
            *self.machine_args(),
            # before any PCI device; without interrupt remapping, so KVM's in-kernel irqchip stays (a split
            # irqchip's userspace PIT made the L2 kernel's early boot crawl: 90 s to SSH in the virtual host)
            *(["-device", "intel-iommu,caching-mode=on"] if self.viommu else []),
            "-m", f"{self.memory_mib}M", "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *self.boot_args(),
            "-device", "virtio-rng-pci,id=rng0",
            "-chardev", f"socket,id=console0,path={opt(console_socket)},server=on,wait=off,logfile={opt(console_log)}",
            "-serial", "chardev:console0",
            "-chardev", f"socket,id=qmp0,path={opt(qmp_socket)},server=on,wait=off",
            "-qmp", "chardev:qmp0",
        ]
        if self.s3:
            args += ["-global", "ICH9-LPC.disable_s3=0"]
        for nic in self.nics:
            args += nic.args()
        args += list(self.extra_args)
        for event in self.trace_events:
            args += ["-trace", event]
        if incoming is not None:
            args += incoming.args()
        elif paused:
            args.append("-S")
        return args
