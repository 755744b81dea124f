"""A guest under test: its network, its QEMU generations, its SSH session, its transfers.

Usable without pytest:

    with CprVM(config) as vm:
        vm.boot()
        with vm.traffic():
            result = vm.transfer()
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pytest_cpr import checks, cloudinit, leftovers, plot
from pytest_cpr.cpr import ProcessRef, TransferResult, cpr_transfer, retire_source
from pytest_cpr.errors import BootHung, CprError, CprSettingError, CprTimeout, TransferFailed
from pytest_cpr.guest.ssh import CommandResult, GuestSSH, SessionKey
from pytest_cpr.guest.state import SNAPSHOT_COMMAND, GuestSnapshot, parse_snapshot, snapshot
from pytest_cpr.guest.traffic import IcmpProbe, StreamResult, TcpStream
from pytest_cpr.host import vfio
from pytest_cpr.host.netns import GuestNetwork
from pytest_cpr.images import GuestImage
from pytest_cpr.kinds import Accel, Phase
from pytest_cpr.qemu.bugs import KnownBug, known_bugs
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import Console, QemuProcess
from pytest_cpr.qemu.spec import Incoming, Nic, VmSpec

IRQ_WAIT_S = 30.0  # how long a vector that fired before a transfer may stay silent after it


@dataclass
class VmConfig:
    """Everything needed to boot and transfer one guest."""

    name: str
    image: GuestImage | None  # None: user_image must be set
    source: QemuBuild
    target: QemuBuild
    accel: Accel
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
    kernel_flavor: str = "cloud"  # "full" for guests that drive passthrough NVMe/igb devices
    user_image: Path | None = None  # a cloud image booted with a generated NoCloud seed instead
    cmdline: tuple[str, ...] = ()  # more guest kernel args, e.g. cpr.net1=<guest PCI addr>,<ip/prefix>
    boot_attempts: int = 1  # > 1: a boot that hangs before the host key line is retried, announced
    on_transfer: list[Callable[[TransferResult], None]] = field(default_factory=list)
    plots: bool = True  # draw timeline-t<i>.png/.svg per transfer (needs matplotlib)


class Traffic:
    """Probe stream + TCP stream running while the caller transfers the guest."""

    def __init__(self, vm: CprVM, tcp: bool = True, target: str | None = None,
                 host_ip: str | None = None) -> None:
        """`target`: the guest address probed (default: the virtio NIC's); `host_ip`: the namespace
        address the guest streams to (default: the bridge's), e.g. a passthrough NIC and its peer."""
        self.vm = vm
        self.target = target or vm.guest_ip
        self.probe = IcmpProbe(vm.network, self.target, vm.config.probe_interval_ms)
        assert vm.ssh is not None, "boot() the guest before starting traffic"
        self.stream: TcpStream | None = TcpStream(vm.network, vm.ssh, host_ip=host_ip) if tcp else None
        self.stream_result: StreamResult | None = None

    def __enter__(self) -> Traffic:
        self.probe.__enter__()
        if self.stream is not None:
            self.stream.start()
        self.vm.traffic_now = self
        self.wait_answers(20, 30.0)
        return self

    def wait_sent(self, count: int, timeout: float = 30.0) -> None:
        """Wait until `count` more probes were sent (answered or not)."""
        start = len(self.probe.snapshot())
        deadline = time.monotonic() + timeout
        while len(self.probe.snapshot()) < start + count:
            if time.monotonic() > deadline:
                raise CprTimeout(f"probe sender stalled: fewer than {count} probes sent in {timeout:.0f}s")
            time.sleep(self.probe.interval_ms / 1000)

    def wait_answers(self, count: int, timeout: float, since: float | None = None) -> int:
        """Wait until `count` probes sent after `since` (default: now) were answered."""
        since = time.time() if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            got = sum(1 for p in self.probe.snapshot() if p.t_send >= since and p.t_recv is not None)
            if got >= count:
                return got
            if time.monotonic() > deadline:
                raise CprTimeout(f"only {got} of {count} probes to {self.target} answered within "
                                 f"{timeout:.0f}s (guest network down?); logs: {self.vm.artifacts}")
            time.sleep(self.probe.interval_ms / 1000)

    def finish_stream(self) -> StreamResult | None:
        if self.stream is not None and self.stream_result is None:
            self.stream_result = self.stream.finish(self.vm.config.command_timeout)
        return self.stream_result

    def __exit__(self, *exc: object) -> None:
        self.vm.traffic_now = None
        try:
            if exc[0] is None:
                self.finish_stream()
        finally:
            self.probe.stop()


class CprVM:
    """One guest: boot it, talk to it, transfer it; close() leaves nothing behind."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.artifacts = config.artifacts
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix="cpr-", dir="/tmp"))  # short: UNIX socket paths
        record_private_dir(self.rundir)
        os.chmod(self.rundir, 0o700)
        self.network = GuestNetwork(f"{os.getpid()}-{self.rundir.name[4:]}")
        self.key = SessionKey(config.key_dir or self.rundir / "ssh")
        self.generations: list[QemuProcess] = []
        self.transfers: list[TransferResult] = []
        self.spec: VmSpec | None = None
        self.ssh: GuestSSH | None = None
        self.host_key: str | None = None
        self.traffic_now: Traffic | None = None
        self.boot_seconds: float | None = None
        self.ssh_ready_seconds: float | None = None
        self._builds: dict[str, QemuBuild] = {}  # by process label
        self.boot_retries: list[str] = []  # hung boots retried (boot_attempts), label: why
        self._failed: list[QemuProcess] = []  # targets of failed transfers, reaped on close

    # ---- lifecycle
    def __enter__(self) -> CprVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def current(self) -> QemuProcess:
        return self.generations[-1]

    @property
    def guest_ip(self) -> str:
        return self.network.guest_ips[0]

    def _build_spec(self) -> VmSpec:
        self.network.create()
        tap_fd = self.network.add_tap(self.config.vnet_hdr)
        nic = Nic("n0", "52:54:00:77:00:02", tap_fd, f"{self.guest_ip}/{self.network.prefixlen}",
                  vnet_hdr=self.config.vnet_hdr)
        common = dict(name=self.config.name, accel=self.config.accel, memory_mib=self.config.memory_mib,
                      cpus=self.config.cpus, machine=self.config.source.q35_machine, nics=(nic,),
                      extra_args=self.config.extra_args)
        if self.config.user_image is not None:
            return self._cloud_image_spec(nic, common)
        img = self.config.image
        if img is None:
            raise CprSettingError("no guest image: build one with `cpr-image build guest` or set "
                                  "--cpr-user-image / CPR_USER_IMAGE")
        kernel, initrd = img.boot_files(self.config.kernel_flavor)
        return VmSpec(kernel=kernel, initrd=initrd, rootfs=img.rootfs,
                      cmdline=(f"cpr.sshkey={self.key.public_base64}", *self.config.cmdline),
                      **common)  # type: ignore[arg-type]

    def _cloud_image_spec(self, nic: Nic, common: dict[str, object]) -> VmSpec:
        """Boot the user's image from a private overlay with a NoCloud seed; the host key is ours."""
        assert self.config.user_image is not None
        host_key = cloudinit.generate_host_key()
        self.host_key = host_key.public_line
        overlay = cloudinit.make_overlay(self.config.user_image, self.rundir / "root-overlay.qcow2")
        seed = cloudinit.write_seed(self.rundir / "seed.iso", instance_id=f"cpr-{self.rundir.name}",
                                    hostname="cprguest", authorized_key=f"ssh-ed25519 {self.key.public_base64}",
                                    host_key=host_key, nics=[(nic.mac, nic.guest_cidr)])
        return VmSpec(kernel=None, initrd=None, rootfs=overlay, root_format="qcow2", root_readonly=False,
                      seed_iso=seed, **common)  # type: ignore[arg-type]

    def _process(self, generation: int, build: QemuBuild, incoming: Incoming | None) -> QemuProcess:
        assert self.spec is not None
        label = f"g{generation}"
        if retries := sum(1 for p in self._failed if p.label.split("-")[0] == label):
            label += f"-retry{retries}"  # a failed target of this generation keeps its own logs
        qmp_sock = self.rundir / f"qmp-{label}.sock"
        con_sock = self.rundir / f"console-{label}.sock"
        con_log = self.artifacts / f"console-{label}.log"
        argv = self.spec.argv(build.binary, con_sock, con_log, qmp_sock, incoming=incoming,
                              paused=incoming is None)
        proc = QemuProcess(build.binary, argv, label, self.rundir, self.artifacts, qmp_sock, con_sock,
                           con_log, pass_fds=self.spec.pass_fds())
        proc.start()
        self.generations.append(proc)
        self._builds[label] = build
        return proc

    def boot(self) -> float:
        """Boot generation 0 and wait for SSH; returns boot-to-SSH seconds. With boot_attempts > 1 a
        boot that hangs before the guest prints its host key is retried: announced (a warning and
        the result's boot_retries), the hung attempt's logs kept under its own label."""
        self.spec = self._build_spec()
        for attempt in range(1, self.config.boot_attempts):  # the last attempt below, not caught
            try:
                return self._boot_once()
            except BootHung as exc:
                hung = self.current.label
                stuck = self.artifacts / "guest-stuck.txt"
                if stuck.exists():
                    stuck.rename(self.artifacts / f"guest-stuck-{hung}.txt")
                self._failed_generation_cleanup(0)
                self.boot_retries.append(f"{hung}: {str(exc).splitlines()[0]}")
                warnings.warn(f"guest {self.config.name}: boot {attempt} of {self.config.boot_attempts} hung "
                              f"({exc}); booting again (boot_attempts)", stacklevel=2)
        return self._boot_once()

    def _boot_once(self) -> float:
        t0 = time.monotonic()
        proc = self._process(0, self.config.source, None)
        timeout = self.config.boot_timeout
        proc.connect_qmp(timeout)
        console = proc.connect_console(timeout)
        proc.qmp.execute("cont")
        if self.config.user_image is None:  # our image prints the host key it made at boot
            try:
                self.host_key = console.expect(r"CPR-HOSTKEY (ssh-ed25519 [A-Za-z0-9+/=]+)\r?\n", timeout,
                                               "the guest's SSH host key (CPR-HOSTKEY line)")
            except CprTimeout as exc:
                if proc.exit_reason() is not None:
                    raise
                raise BootHung(f"{exc}; {self.diagnose('the guest did not finish booting')}") from None
        assert self.host_key is not None
        self.boot_seconds = time.monotonic() - t0
        self.ssh = GuestSSH(self.guest_ip, self.key, self.host_key,
                            lambda to: self.network.connect_tcp(self.guest_ip, 22, to),
                            self.config.command_timeout, alive=lambda: self.current.exit_reason())
        self.ssh.connect(max(1.0, timeout - (time.monotonic() - t0)), alive=proc.exit_reason)
        self.ssh.run("true")
        self.ssh_ready_seconds = time.monotonic() - t0
        return self.ssh_ready_seconds

    # ---- guest access
    def run(self, command: str, timeout: float | None = None, check: bool = True) -> CommandResult:
        assert self.ssh is not None, "boot() first"
        try:
            return self.ssh.run(command, timeout, check)
        except CprTimeout as exc:
            raise CprTimeout(f"{exc}; {self.diagnose(f'guest command {command!r} timed out')}") from None

    def snapshot(self, via: str = "ssh") -> GuestSnapshot:
        """Boot id, uptime and interrupts, over SSH or (when the network is down) the serial console."""
        if via == "console":
            host_t = time.time()
            _, out = self.console().run(SNAPSHOT_COMMAND, timeout=60)
            return parse_snapshot(host_t, out)
        assert self.ssh is not None, "boot() first"
        try:
            return snapshot(self.ssh)
        except CprTimeout as exc:
            raise CprTimeout(f"{exc}; {self.diagnose('a snapshot over SSH timed out')}") from None

    def diagnose(self, why: str) -> str:
        """Record why the guest stopped answering in guest-stuck.txt: the QEMU run state and vCPU
        registers, the host's vfio interrupt rates (a storm starves the guest's userspace while its
        kernel still answers pings) and whether the serial console's shell answers. Returns a
        one-line summary naming the file."""
        path = self.artifacts / "guest-stuck.txt"
        parts = [f"== {why}"]
        status = "?"
        for cmd, args in (("query-status", None), ("query-cpus-fast", None),
                          ("human-monitor-command", {"command-line": "info registers -a"})):
            try:
                reply = self.current.qmp.execute(cmd, args, timeout=10)
                status = reply.get("status", status) if isinstance(reply, dict) else status
                parts.append(f"== {cmd} {args or ''}\n{reply}")
            except Exception as exc:  # diagnostics only: record and go on
                parts.append(f"== {cmd}: {exc}")
        rates = vfio.host_vfio_irq_rates()
        parts.append(f"== host vfio interrupts per second: {rates or 'no vfio lines'}")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            kernel = subprocess.run(["dmesg", "-T"], capture_output=True, text=True, timeout=10).stdout
            parts.append("== host kernel log (last 40 lines)\n" + "\n".join(kernel.splitlines()[-40:]))
        try:
            _, out = self.console().run("cat /proc/loadavg; ps -eo stat,pid,comm | grep '^D' | head -20",
                                        timeout=20)
            console = "answers"
            parts.append(f"== serial console shell\n{out}")
        except Exception as exc:
            console = "silent"
            parts.append(f"== serial console shell: {exc}")
        path.write_text("\n".join(parts) + "\n")
        busiest = max(rates.items(), key=lambda kv: kv[1]) if rates else None
        storm = f"; busiest host vfio line {busiest[0]} at {busiest[1]:.0f}/s" if busiest else ""
        return f"QEMU {status}, serial console {console}{storm} (details: {path})"

    def nic_irq_pattern(self, ifname: str = "eth0") -> str:
        """Regex of the guest interrupt lines of a NIC (virtio-net: virtioN-input/output)."""
        dev = self.run(f"basename $(readlink /sys/class/net/{ifname}/device)").stdout.strip()
        return rf"^{dev}-(input|output)"

    def live_update(self, traffic: Traffic, target: QemuBuild | None = None, window: int = 100,
                    max_blackout_ms: float | None = None, max_lost_probes: float | None = None,
                    irq_pattern: str | None = None) -> TransferResult:
        """One checked transfer under traffic: interrupt windows before and after (`window` answered
        probes each; the one after grows up to IRQ_WAIT_S for slow vectors), then every check:
        completed, old QEMU quit cleanly, connectivity, same boot, interrupts, thresholds."""
        pattern = irq_pattern or self.nic_irq_pattern()
        logs = self.artifacts
        s0 = self.snapshot()
        traffic.wait_answers(window, 120.0)
        s1 = self.snapshot()
        result = self.transfer(target)
        checks.assert_completed(result, logs)
        checks.assert_source_quit(result, self.known_bugs(result), logs)
        try:
            checks.assert_connectivity(result, logs)
        except checks.CheckFailed as exc:
            raise checks.CheckFailed(f"{exc}; {self.diagnose(f'no connectivity after transfer {result.index}')}") \
                from None
        s2 = self.snapshot()
        try:
            traffic.wait_answers(window, 120.0)
        except CprTimeout as exc:  # the probes crawl: do the NIC's vectors still fire?
            raise CprTimeout(f"{exc}; {self._vectors_since(s2, pattern)}; "
                             f"{self.diagnose(f'probes crawl after transfer {result.index}')}") from None
        s3 = self.snapshot()
        # a slow vector (NVMe completions under nested emulation: a few per second) may miss one
        # window: the window after grows, while traffic flows, until each vector that fired before
        # fired again or IRQ_WAIT_S passed; a vector silent that long is the lost-interrupt bug
        fired_before = checks.active_vectors(s0, s1, pattern)
        deadline = time.monotonic() + IRQ_WAIT_S
        while set(fired_before) - set(checks.active_vectors(s2, s3, pattern)) and time.monotonic() < deadline:
            traffic.wait_answers(window, 120.0)
            s3 = self.snapshot()
        checks.assert_same_boot(s1, s2, logs=logs)
        result.interrupts = checks.assert_interrupts((s0, s1), (s2, s3), pattern, logs)
        self._write_transfers()  # with the interrupt counts the checks just took
        checks.assert_thresholds(result, max_blackout_ms, max_lost_probes, logs)
        return result

    def known_bugs(self, result: TransferResult) -> list[KnownBug]:
        """The known QEMU bugs the old QEMU of that transfer can meet (its build, accelerator, devices)."""
        build = self._builds[result.source.label]
        vfio_device = any(str(arg).startswith("vfio-pci") for arg in self.config.extra_args)
        return known_bugs(build, self.config.accel, vfio_device)

    def _vectors_since(self, before: GuestSnapshot, pattern: str) -> str:
        """How often the vectors matching `pattern` fired since `before` (an auto-masked MSI-X vector
        whose message was lost stays silent until the driver's watchdog kicks it)."""
        try:
            now = self.snapshot()
        except CprError:
            try:
                now = self.snapshot(via="console")
            except CprError as exc:
                return f"guest interrupt counts unreadable over SSH and console ({exc})"
        fired = checks.active_vectors(before, now, pattern)
        return (f"guest vectors {pattern!r} in the {now.uptime_s - before.uptime_s:.0f} s since the transfer: "
                f"{fired or 'none fired'} (totals then: {before.irq_totals(pattern)})")

    def console(self) -> Console:
        proc = self.current
        return proc.console if proc.console is not None else proc.connect_console(10)

    def traffic(self, tcp: bool = True, target: str | None = None, host_ip: str | None = None) -> Traffic:
        return Traffic(self, tcp, target, host_ip)

    # ---- cpr
    def transfer(self, target: QemuBuild | None = None,
                 before_migrate: Callable[[QemuProcess], None] | None = None,
                 after_spawn: Callable[[QemuProcess], None] | None = None,
                 after_migrate: Callable[[QemuProcess], None] | None = None,
                 before_retire: Callable[[QemuProcess], None] | None = None) -> TransferResult:
        """cpr-transfer the guest to a new QEMU process (of `target`, default: the configured target
        build). The old process is retired (`before_retire` gets it first, in postmigrate); the new
        one owns the guest. With traffic running, waits for the probe stream to come back and
        records the guest-visible blackout."""
        build = target or self.config.target
        source = self.current
        index = len(self.transfers) + 1
        gen = len(self.generations)
        incoming = Incoming(self.rundir / f"mig-g{gen}.sock", self.rundir / f"cpr-g{gen}.sock")
        result = TransferResult(index, ProcessRef(source.label, self._builds[source.label].short_version),
                                ProcessRef(f"g{gen}", build.short_version))
        self.transfers.append(result)
        for stale in (incoming.main_socket, incoming.cpr_socket):
            stale.unlink(missing_ok=True)  # left by a failed transfer to this generation
        try:
            cpr_transfer(source, lambda: self._process(gen, build, incoming), incoming, result,
                         self.config.transfer_timeout, before_migrate, after_spawn, after_migrate)
        except TransferFailed:
            self._failed_generation_cleanup(gen)
            self._record(result)
            raise
        if before_retire is not None:
            before_retire(source)
        retire_source(source, result)
        self._after_transfer(result)
        return result

    def _failed_generation_cleanup(self, gen: int) -> None:
        if len(self.generations) > gen:
            failed = self.generations.pop(gen)
            failed.shutdown(5)
            self._failed.append(failed)

    def _after_transfer(self, result: TransferResult) -> None:
        t = result.timeline
        if Phase.TARGET_RUNNING not in t:  # source was paused: so is the target, nothing to wait for
            self._record(result)
            return
        if self.traffic_now is not None:
            self._measure_probes(result, self.traffic_now)
        try:
            assert self.ssh is not None
            self.ssh.run("true", timeout=min(self.config.command_timeout, 20.0))
            t[Phase.SSH_ANSWERED] = time.time()
        except Exception as exc:
            result.notes.append(f"SSH after transfer failed: {exc}")
        self._record(result)

    @staticmethod
    def _measure_probes(result: TransferResult, traffic: Traffic) -> None:
        """Probe statistics of the window from the step start to 20 answers after the target resumed.
        Every probe of the window is judged: one still unanswered once probes sent after the window
        came back is lost."""
        t = result.timeline
        try:
            traffic.wait_answers(20, 15.0, since=t[Phase.TARGET_RUNNING])
            window_end = time.time()
            traffic.wait_answers(3, 5.0, since=window_end)
        except CprTimeout as exc:
            result.notes.append(f"probe stream did not recover: {exc}")
            window_end = time.time()
        probes = traffic.probe.snapshot()
        answers = [p.t_recv for p in probes if p.t_recv is not None and p.t_recv >= t[Phase.TARGET_RUNNING]]
        if answers:
            t[Phase.FIRST_PROBE_AFTER] = min(answers)
        stats = traffic.probe.stats(t[Phase.STEP_START], window_end, grace_s=0.0)
        series = plot.ProbeSeries.of(probes, t[Phase.STEP_START], window_end, traffic.probe.interval_ms)
        result.probe = {**stats.as_dict(), **series.send_stall(stats.gap_start, stats.gap_end)}

    def _record(self, result: TransferResult) -> None:
        self._save_measurements(result)
        for hook in self.config.on_transfer:
            hook(result)
        self._write_transfers()

    def _write_transfers(self) -> None:
        (self.artifacts / "transfers.json").write_text(
            json.dumps([r.as_dict() for r in self.transfers], indent=1, default=str))

    def _save_measurements(self, result: TransferResult) -> None:
        """probe-t<i>.json (every probe of the transfer window), timeline-t<i>.json and the
        timeline-t<i>.png/.svg picture, in the artifacts; their paths go to result.files."""
        t, i = result.timeline, result.index
        series = None
        traffic = self.traffic_now
        if traffic is not None and Phase.STEP_START in t:
            series = plot.ProbeSeries.of(traffic.probe.snapshot(), t[Phase.STEP_START] - plot.CONTEXT_BEFORE_S,
                                         time.time(), traffic.probe.interval_ms)
            result.files["probe_series"] = str(series.save(self.artifacts / f"probe-t{i}.json"))
        if series is not None and self.config.plots:
            try:
                drawn = plot.plot_transfer(result.as_dict(), series, self.artifacts / f"timeline-t{i}")
            except Exception as exc:  # a picture must not fail a transfer
                result.notes.append(f"timeline plot failed: {exc!r}")
            else:
                result.files.update({f"plot_{p.suffix[1:]}": str(p) for p in drawn})
                if not drawn:
                    result.notes.append(plot.MISSING_MATPLOTLIB)
        path = self.artifacts / f"timeline-t{i}.json"
        result.files["timeline"] = str(path)
        path.write_text(json.dumps(plot.timeline_document(result.as_dict()), indent=1, default=str))

    # ---- diagnostics and cleanup
    def collect_dmesg(self) -> str:
        """Guest kernel log, over SSH if it works, else over the serial console; saved to artifacts."""
        text = ""
        with contextlib.suppress(Exception):
            assert self.ssh is not None and self.ssh.is_active()
            text = self.ssh.run("dmesg", timeout=20).stdout
        if not text:
            with contextlib.suppress(Exception):
                text = self.console().run("dmesg", timeout=30)[1]
        if text:
            (self.artifacts / "guest-dmesg.log").write_text(text)
        return text

    def close(self) -> None:
        errors: list[str] = []
        if self.ssh is not None:
            self.ssh.close()
        for proc in reversed(self.generations + self._failed):
            try:
                proc.shutdown(10)
            except Exception as exc:
                errors.append(f"{proc.label}: {exc}")
        self.network.destroy()
        shutil.rmtree(self.rundir, ignore_errors=True)
        leftovers.forget("rundir", self.rundir.name)
        if errors:
            raise RuntimeError("cleanup of " + self.config.name + " had errors: " + "; ".join(errors))


def record_private_dir(path: Path) -> None:
    """Register a private directory (sockets, session key) so a killed run's copy is removed later."""
    leftovers.record("rundir", path.name, path=str(path))


def _clean_private_dir(rec: dict[str, object]) -> str:
    path = Path(str(rec["path"]))
    if not path.name.startswith("cpr-"):
        return f"left {path} alone: not a pytest-cpr directory"
    shutil.rmtree(path, ignore_errors=True)
    return f"removed stale run directory {path} (sockets, session key)"


leftovers.register_cleaner("rundir", _clean_private_dir)
