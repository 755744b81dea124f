"""One guest's machine: its private run directory, network, session key and spec, and the QEMU
processes (generations) that run it, with boot and close as an explicit lifecycle.

States: CREATED (run dir, network name and key exist) -> BOOTING -> RUNNING (SSH answers) ->
CLOSED, or CREATED -> LAUNCHED (generation 0 runs, no boot waited for) -> CLOSED. A boot that fails
leaves the machine BOOTING; close() ends every state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_cpr import cloudinit, leftovers
from pytest_cpr.cpr import TransferResult
from pytest_cpr.diagnostics import diagnose_guest
from pytest_cpr.errors import BootHung, CprError, CprSettingError, CprTimeout, QemuQuitFailed
from pytest_cpr.guest.ssh import GuestSSH, SessionKey
from pytest_cpr.host.netns import GuestNetwork
from pytest_cpr.host.vfio import DeviceFds, FdPassing
from pytest_cpr.images import GuestImage
from pytest_cpr.kinds import Accel, Mode
from pytest_cpr.once import worker_tag
from pytest_cpr.qemu import stderr
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import Console, QemuProcess
from pytest_cpr.qemu.spec import AnyIncoming, Nic, VmSpec
from pytest_cpr.waits import (
    CLOSE_SHUTDOWN_S,
    CLOUD_INIT_POLL_S,
    CONSOLE_CONNECT_TIMEOUT_S,
    DMESG_CONSOLE_TIMEOUT_S,
    DMESG_SSH_TIMEOUT_S,
    FAILED_GENERATION_SHUTDOWN_S,
)

log = logging.getLogger(__name__)

HOST_KEY_LINE = r"CPR-HOSTKEY (ssh-ed25519 [A-Za-z0-9+/=]+)\r?\n"
GUEST_MAC = "52:54:00:77:00:02"


@dataclass
class VmConfig:
    """Everything needed to boot and transfer one guest."""

    name: str
    image: GuestImage | None  # None: user_image must be set
    source: QemuBuild
    target: QemuBuild
    accel: Accel
    mode: Mode = Mode.CPR_TRANSFER  # CPR mode of vm.transfer() (the `cpr` marker's mode)
    memory_mib: int = 512
    cpus: int = 1
    boot_timeout: float = 240.0
    transfer_timeout: float = 120.0
    command_timeout: float = 60.0
    artifacts: Path = Path("artifacts/cpr")
    key_dir: Path | None = None
    vnet_hdr: bool = False
    probe_interval_ms: float = 5.0
    extra_args: tuple[str, ...] = ()
    viommu: bool = False  # a guest vIOMMU: a container / IOAS per passed-through device (VmSpec.viommu)
    trace_events: tuple[str, ...] = ()  # QEMU trace events on stderr, not judged as QEMU's complaints
    kernel_flavor: str = "cloud"  # "full" for guests that drive passthrough NVMe/igb devices
    user_image: Path | None = None  # a cloud image booted with a generated NoCloud seed instead
    cmdline: tuple[str, ...] = ()  # more guest kernel args, e.g. cpr.net1=<guest PCI addr>,<ip/prefix>
    boot_attempts: int = 1  # > 1: a boot that hangs before the host key line is retried, announced
    on_transfer: list[Callable[[TransferResult], None]] = field(default_factory=list)  # reporting
    plots: bool = True  # draw timeline-t<i>.png/.svg per transfer (needs matplotlib)
    # guest RAM as CPR needs it (QEMU's CPR.rst); switchable to show QEMU refusing without it
    ram_share: bool = True  # share=on on the memory backend
    anonymous_ram: bool = False  # no memory backend: plain -m (anonymous private RAM)
    aux_ram_share: bool = True  # -machine aux-ram-share=on
    # cpr-transfer: the harness listens on the cpr channel's socket and passes the new QEMU the
    # listening fd (addr.type=fd), the way management software does (--cpr-channel-fd)
    cpr_channel_fd: bool = False
    # passthrough devices QEMU gets as fds the harness opens (/dev/iommu, the VFIO cdevs), as management
    # software does (--cpr-device-fds); None: QEMU opens them by path (extra_args)
    fd_passing: FdPassing | None = None
    # cpr-reboot: suspend the guest to RAM first and wake it in the new QEMU (QEMU requires it with VFIO
    # devices); None: only with a vfio-pci device. Exposes S3 to the guest (ICH9-LPC.disable_s3=0).
    reboot_suspend: bool | None = None

    @property
    def has_vfio_device(self) -> bool:
        return self.fd_passing is not None or any(str(arg).startswith("vfio-pci") for arg in self.extra_args)

    @property
    def suspends_for_reboot(self) -> bool:
        return self.has_vfio_device if self.reboot_suspend is None else self.reboot_suspend


class MachineState(enum.Enum):
    CREATED = "created"
    LAUNCHED = "launched"  # started without waiting for a boot (launch()): QEMU-level tests only
    BOOTING = "booting"
    RUNNING = "running"
    CLOSED = "closed"


class Machine:
    """The guest's environment and QEMU generations; `current` runs the guest."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.artifacts = config.artifacts
        self.artifacts.mkdir(parents=True, exist_ok=True)
        # short (UNIX socket paths); an xdist worker's carry its id: /tmp/cpr-gw0_XXXXXXXX, cprt-<pid>-gw0_...
        self.rundir = Path(tempfile.mkdtemp(prefix=f"cpr-{worker_tag()}_" if worker_tag() else "cpr-", dir="/tmp"))
        record_private_dir(self.rundir)
        os.chmod(self.rundir, 0o700)
        self.network = GuestNetwork(f"{os.getpid()}-{self.rundir.name[4:]}")
        self.key = SessionKey(config.key_dir or self.rundir / "ssh")
        self.state = MachineState.CREATED
        self.generations: list[QemuProcess] = []
        self.failed: list[QemuProcess] = []  # targets of failed transfers and hung boots, reaped on close
        self.spec: VmSpec | None = None
        self.ssh: GuestSSH | None = None
        self.host_key: str | None = None
        self.boot_seconds: float | None = None
        self.ssh_ready_seconds: float | None = None
        self.cloud_init_seconds: float | None = None  # a cloud image: QEMU start to cloud-init done
        self.boot_retries: list[str] = []  # hung boots retried (boot_attempts), label: why
        self.known_stderr: set[str] = set()  # what the QEMUs said outside any transfer (qemu/stderr.py)
        self.ram_fd: int | None = None  # cpr-reboot: the guest RAM memfd the harness holds across QEMUs
        # fd passing: the fds the harness passed to the QEMU it last started with the devices (closed in
        # the harness once that QEMU started: only their numbers are kept) and the ones still to close
        self.device_fds: DeviceFds | None = None
        self._unclosed_fds: DeviceFds | None = None
        self._builds: dict[str, QemuBuild] = {}  # by process label

    def _transition(self, to: MachineState, *allowed: MachineState) -> None:
        if self.state not in allowed:
            raise CprError(f"guest {self.config.name} is {self.state.value}: cannot go {to.value} "
                           f"(allowed from {', '.join(s.value for s in allowed)})")
        log.debug("guest %s: %s -> %s", self.config.name, self.state.value, to.value)
        self.state = to

    @property
    def current(self) -> QemuProcess:
        return self.generations[-1]

    @property
    def guest_ip(self) -> str:
        return self.network.guest_ips[0]

    def build_of(self, label: str) -> QemuBuild:
        return self._builds[label]

    def require_ssh(self) -> GuestSSH:
        """The SSH session of a booted guest."""
        if self.ssh is None or self.state is not MachineState.RUNNING:
            raise CprError(f"guest {self.config.name} is {self.state.value}, not running: boot() it first")
        return self.ssh

    # ---- spec
    def _build_spec(self) -> VmSpec:
        self.network.create()
        tap_fd = self.network.add_tap(self.config.vnet_hdr)
        self.network.pin_neighbor(self.guest_ip, GUEST_MAC)
        nic = Nic("n0", GUEST_MAC, tap_fd, f"{self.guest_ip}/{self.network.prefixlen}",
                  vnet_hdr=self.config.vnet_hdr)
        if self.config.user_image is not None:
            return self._cloud_image_spec(self.config.user_image, nic)
        img = self.config.image
        if img is None:
            raise CprSettingError("no guest image: build one with `cpr-image build guest` or set "
                                  "--cpr-user-image / CPR_USER_IMAGE")
        kernel, initrd = img.boot_files(self.config.kernel_flavor, pvh=not self.config.suspends_for_reboot)
        return self._spec(nic, kernel=kernel, initrd=initrd, rootfs=img.rootfs,
                          cmdline=(f"cpr.sshkey={self.key.public_base64}", *self.config.cmdline))

    def _spec(self, nic: Nic, **disk: object) -> VmSpec:
        c = self.config
        return VmSpec(name=c.name, accel=c.accel, memory_mib=c.memory_mib, cpus=c.cpus,
                      machine=c.source.q35_machine, nics=(nic,), extra_args=c.extra_args, viommu=c.viommu,
                      trace_events=c.trace_events, ram_share=c.ram_share, anonymous_ram=c.anonymous_ram,
                      aux_ram_share=c.aux_ram_share,
                      s3=c.suspends_for_reboot,
                      **self._reboot_ram(), **disk)  # type: ignore[arg-type]

    def _reboot_ram(self) -> dict[str, object]:
        """cpr-reboot: the old QEMU quits before the new one starts, so guest RAM must outlive it. The
        harness holds it: a memfd both QEMUs map by name (memory-backend-file on /dev/fd/<n>, a named
        file, which x-ignore-shared keeps in place instead of copying it into the state file)."""
        if self.config.mode is not Mode.CPR_REBOOT or self.config.anonymous_ram:
            return {}
        self.ram_fd = os.memfd_create(f"cpr-ram-{self.config.name}", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, self.config.memory_mib << 20)
        return {"ram_file": Path(f"/dev/fd/{self.ram_fd}"), "extra_fds": (self.ram_fd,)}

    def _cloud_image_spec(self, image: Path, nic: Nic) -> VmSpec:
        """Boot the user's image from a private overlay with a NoCloud seed; the host key is ours."""
        host_key = cloudinit.generate_host_key()
        self.host_key = host_key.public_line
        overlay = cloudinit.make_overlay(image, self.rundir / "root-overlay.qcow2")
        seed = cloudinit.write_seed(self.rundir / "seed.iso", instance_id=f"cpr-{self.rundir.name}",
                                    hostname="cprguest", authorized_key=f"ssh-ed25519 {self.key.public_base64}",
                                    host_key=host_key, nics=[(nic.mac, nic.guest_cidr)])
        return self._spec(nic, kernel=None, initrd=None, rootfs=overlay, root_format="qcow2",
                          root_readonly=False, seed_iso=seed)

    # ---- generations
    def start_generation(self, generation: int, build: QemuBuild, incoming: AnyIncoming | None) -> QemuProcess:
        """Start QEMU generation `generation` of `build` (a transfer target when `incoming` is set)."""
        try:
            proc = self.new_generation(generation, build, incoming)
            log.info("guest %s: starting %s (%s)", self.config.name, proc.label, build.short_version)
            try:
                proc.start()
            except BaseException:
                self.generations.remove(proc)
                raise
        finally:
            self._close_passed_fds()  # QEMU has its own copies now (or never will)
        return proc

    def _close_passed_fds(self) -> None:
        if self._unclosed_fds is not None:
            self._unclosed_fds.close()
            self._unclosed_fds = None

    def _device_args(self, incoming: AnyIncoming | None) -> tuple[str, ...]:
        """fd passing: the devices' arguments for a new QEMU. One the harness starts with the devices gets
        fresh fds; a new QEMU that finds them in CPR state (cpr-transfer, cpr-exec) the same arguments:
        QEMU ignores the numbers there (cpr_get_fd_param, iommufd_backend_complete)."""
        passing = self.config.fd_passing
        if passing is None:
            return ()
        if incoming is None or not incoming.carries_fds:
            self._close_passed_fds()
            self._unclosed_fds = self.device_fds = passing.open()
        if self.device_fds is None:
            raise CprError(f"guest {self.config.name}: fd passing, but no QEMU was started with the devices' fds")
        return tuple(passing.args(self.device_fds))

    def new_generation(self, generation: int, build: QemuBuild, incoming: AnyIncoming | None) -> QemuProcess:
        """QEMU generation `generation` of `build`, not started: its argv is what the current QEMU
        exec's under cpr-exec (own QMP and console sockets and console log, same VM spec)."""
        assert self.spec is not None  # set by boot() before any generation starts
        label = f"g{generation}"
        if retries := sum(1 for p in self.failed if p.label.split("-")[0] == label):
            label += f"-retry{retries}"  # a failed target of this generation keeps its own logs
        qmp_sock = self.rundir / f"qmp-{label}.sock"
        con_sock = self.rundir / f"console-{label}.sock"
        con_log = self.artifacts / f"console-{label}.log"
        spec = self.spec
        if devices := self._device_args(incoming):
            spec = dataclasses.replace(spec, extra_args=(*spec.extra_args, *devices))
        passed = self._unclosed_fds.numbers() if self._unclosed_fds is not None else ()
        argv = spec.argv(build.binary, con_sock, con_log, qmp_sock, incoming=incoming, paused=incoming is None)
        proc = QemuProcess(build.binary, argv, label, self.rundir, self.artifacts, qmp_sock, con_sock,
                           con_log, pass_fds=spec.pass_fds() + passed + (incoming.pass_fds() if incoming else ()),
                           env=spec.env)
        self.generations.append(proc)
        self._builds[label] = build
        return proc

    def drop_generation(self, generation: int) -> None:
        """Shut down generation `generation` if it was started (a failed target or a hung boot)."""
        if len(self.generations) > generation:
            failed = self.generations.pop(generation)
            failed.shutdown(FAILED_GENERATION_SHUTDOWN_S)
            self.failed.append(failed)

    # ---- boot
    def boot(self) -> float:
        """Boot generation 0 and wait for SSH; returns boot-to-SSH seconds. With boot_attempts > 1 a
        boot that hangs before the guest prints its host key is retried: announced (a warning and
        boot_retries), the hung attempt's logs kept under its own label."""
        self._transition(MachineState.BOOTING, MachineState.CREATED)
        self.spec = self._build_spec()
        for attempt in range(1, self.config.boot_attempts):  # the last attempt below, not caught
            try:
                return self._boot_once()
            except BootHung as exc:
                self._set_hung_boot_aside(exc)
                warnings.warn(f"guest {self.config.name}: boot {attempt} of {self.config.boot_attempts} hung "
                              f"({exc}); booting again (boot_attempts)", stacklevel=3)
        return self._boot_once()

    def _set_hung_boot_aside(self, exc: BootHung) -> None:
        hung = self.current.label
        stuck = self.artifacts / "guest-stuck.txt"
        if stuck.exists():
            stuck.rename(self.artifacts / f"guest-stuck-{hung}.txt")
        self.drop_generation(0)
        self.boot_retries.append(f"{hung}: {str(exc).splitlines()[0]}")

    def launch(self) -> QemuProcess:
        """Start generation 0 and let the guest run, without waiting for it to boot (QMP and console
        connected, no SSH): for tests where only the QEMU processes matter (stopping a run mid-transfer,
        pytest_cpr.stopstress), where a booted guest only costs time. The machine is then launched:
        transfers work; guest commands over SSH are refused and no guest log is collected."""
        self._transition(MachineState.LAUNCHED, MachineState.CREATED)
        self.spec = self._build_spec()
        return self._start_guest(self.config.boot_timeout)[0]

    def _start_guest(self, timeout: float) -> tuple[QemuProcess, Console | None]:
        """Generation 0 started paused, QMP and console connected (not a cloud image's: see console()),
        then told to run."""
        proc = self.start_generation(0, self.config.source, None)
        proc.connect_qmp(timeout)
        console = None if self.config.user_image is not None else proc.connect_console(timeout)
        proc.qmp.execute("cont")
        return proc, console

    def _boot_once(self) -> float:
        t0 = time.monotonic()
        timeout = self.config.boot_timeout
        proc, console = self._start_guest(timeout)
        # a cloud image's console stays unconnected (see console()); its host key is the seed's
        host_key = self.host_key if console is None else self._await_host_key(proc, console)
        assert host_key is not None  # the cloud-image spec made it
        self.boot_seconds = time.monotonic() - t0
        self.ssh = GuestSSH(self.guest_ip, self.key, host_key,
                            lambda to: self.network.connect_tcp(self.guest_ip, 22, to),
                            self.config.command_timeout, alive=lambda: self.current.halt_reason())
        try:
            self.ssh.connect(max(1.0, timeout - (time.monotonic() - t0)), alive=proc.halt_reason)
        except CprTimeout as exc:
            if self.config.user_image is None or proc.exit_reason() is not None:
                raise
            raise CprTimeout(self._cloud_boot_timeout(exc, proc)) from None
        self.ssh.run("true")
        self.ssh_ready_seconds = time.monotonic() - t0
        if self.config.user_image is not None:
            self.cloud_init_seconds = self._await_cloud_init(self.ssh, proc, timeout - (time.monotonic() - t0)) - t0
        self.known_stderr = set(stderr.lines_since(proc.stderr_path))
        self._transition(MachineState.RUNNING, MachineState.BOOTING)
        log.info("guest %s: SSH ready %.2fs after QEMU started%s", self.config.name, self.ssh_ready_seconds,
                 "" if self.cloud_init_seconds is None else f", cloud-init done after {self.cloud_init_seconds:.2f}s")
        return self.ssh_ready_seconds

    def _await_cloud_init(self, ssh: GuestSSH, proc: QemuProcess, timeout: float) -> float:
        """sshd answers in cloud-init's network stage; its last stage (final) runs on. A cloud guest is
        booted once cloud-init is done (it writes /run/cloud-init/result.json), so no first-boot work
        overlaps the test. Polled with `cat`: starting cloud-init's Python to ask takes a minute under
        TCG on a loaded host. Returns the time it was seen."""
        deadline = time.monotonic() + max(1.0, timeout)
        while (result := ssh.run("cat /run/cloud-init/result.json", check=False)).exit_code != 0:
            if time.monotonic() > deadline:
                text = proc.console_log.read_text(errors="replace") if proc.console_log.exists() else ""
                raise CprTimeout(f"cloud-init in the cloud image {self.config.user_image} did not finish within "
                                 f"--cpr-boot-timeout {self.config.boot_timeout:g}s: "
                                 f"{cloudinit.describe_boot_progress(text)} (console log: {proc.console_log}); "
                                 "raise --cpr-boot-timeout / CPR_BOOT_TIMEOUT if it was on its way")
            time.sleep(CLOUD_INIT_POLL_S)
        (self.artifacts / "cloud-init-result.json").write_text(result.stdout)
        return time.monotonic()

    def _cloud_boot_timeout(self, exc: CprTimeout, proc: QemuProcess) -> str:
        """Why a cloud image did not answer SSH in time: how far its boot got, from its console."""
        try:
            text = proc.console_log.read_text(errors="replace")
        except OSError:
            text = ""
        return (f"{exc}; the cloud image {self.config.user_image}: {cloudinit.describe_boot_progress(text)} "
                f"(console log: {proc.console_log}); a first boot runs cloud-init, slow under TCG: raise "
                "--cpr-boot-timeout / CPR_BOOT_TIMEOUT if it was on its way")

    def _await_host_key(self, proc: QemuProcess, console: Console) -> str:
        """Our image prints the host key it made at boot; a boot that never gets there hung."""
        try:
            self.host_key = console.expect(HOST_KEY_LINE, self.config.boot_timeout,
                                           "the guest's SSH host key (CPR-HOSTKEY line)")
        except CprTimeout as exc:
            if proc.exit_reason() is not None:
                raise
            raise BootHung(f"{exc}; {self.diagnose('the guest did not finish booting')}") from None
        return self.host_key

    # ---- access and diagnosis
    def console(self) -> Console:
        """The serial console's root shell (the built guest's). A cloud image has none (a login
        prompt), and a console socket connected but unread stalls its serial output, the kernel's
        with it, after a few hundred bytes: its console is read from the log QEMU writes."""
        proc = self.current
        if self.config.user_image is not None:
            raise CprError(f"a cloud image (--cpr-user-image) has no shell on its serial console; its "
                           f"console log: {proc.console_log}")
        return proc.console if proc.console is not None else proc.connect_console(CONSOLE_CONNECT_TIMEOUT_S)

    def diagnose(self, why: str) -> str:
        """Record why the guest stopped answering in guest-stuck.txt; a one-line summary naming it."""
        return diagnose_guest(self.current, self.console, self.artifacts / "guest-stuck.txt", why)

    def collect_dmesg(self) -> str:
        """Guest kernel log, over SSH if it works, else over the serial console; saved to artifacts.
        None of a launched guest: nobody waited for it to boot (a console wait would only cost time)."""
        if self.state is MachineState.LAUNCHED:
            return ""
        text = ""
        if self.ssh is not None and self.ssh.is_active():
            with contextlib.suppress(Exception):
                text = self.ssh.run("dmesg", timeout=DMESG_SSH_TIMEOUT_S).stdout
        if not text:
            with contextlib.suppress(Exception):
                text = self.console().run("dmesg", timeout=DMESG_CONSOLE_TIMEOUT_S)[1]
        if text:
            (self.artifacts / "guest-dmesg.log").write_text(text)
        return text

    # ---- close
    def close(self) -> None:
        """Quit every QEMU and remove what the guest had. The QEMU running the guest, once it took `quit`,
        must end with exit code 0 (teardown bugs after a transfer show there): else QemuQuitFailed,
        raised once everything is cleaned up."""
        errors: list[str] = []
        if self.ssh is not None:
            self.ssh.close()
        last = self.current if self.generations and self.current.exit_reason() is None else None
        for proc in reversed(self.generations + self.failed):
            try:
                proc.shutdown(CLOSE_SHUTDOWN_S)
            except Exception as exc:
                errors.append(f"{proc.label}: {exc}")
        self.network.destroy()
        self._close_passed_fds()
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None
        shutil.rmtree(self.rundir, ignore_errors=True)
        leftovers.forget("rundir", self.rundir.name)
        self.state = MachineState.CLOSED
        if errors:
            raise RuntimeError("cleanup of " + self.config.name + " had errors: " + "; ".join(errors))
        # judged only when QEMU took `quit`: a run stopped mid-transfer (Ctrl-C, SIGTERM) may end a target
        # that never answered QMP with signals, which says nothing of how QEMU quits
        if last is not None and last.quit_sent and last.popen is not None and last.popen.returncode != 0:
            raise QemuQuitFailed(f"guest {self.config.name}: the QEMU running it did not end with exit code 0 when "
                                 f"told to quit at the end of the test: {last.exit_reason()}")


def record_private_dir(path: Path) -> None:
    """Register a private directory (sockets, session key) so a killed run's copy is removed later."""
    leftovers.record("rundir", path.name, path=str(path))


def clean_private_dir(rec: dict[str, object]) -> str:
    path = Path(str(rec["path"]))
    if not path.name.startswith("cpr-"):
        return f"left {path} alone: not a pytest-cpr directory"
    shutil.rmtree(path, ignore_errors=True)
    return f"removed stale run directory {path} (sockets, session key)"

