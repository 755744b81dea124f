"""A guest under test: its network, its QEMU generations, its SSH session, its transfers.

Usable without pytest:

    with CprVM(config) as vm:
        vm.boot()
        with vm.traffic():
            result = vm.transfer()

CprVM is the front; the parts behind it each have one job: Machine (run dir, network, spec, QEMU
generations, boot and close), TransferRunner (one transfer and its bookkeeping), LiveUpdatePolicy
(the checks of a live update), ArtifactWriter (files), and observers (faults, host watches, probe
measurement) that see every transfer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pytest_cpr import checks
from pytest_cpr.artifacts import ArtifactWriter
from pytest_cpr.cpr import TransferResult
from pytest_cpr.errors import CprError, CprTimeout
from pytest_cpr.guest.ssh import CommandResult, GuestSSH, SessionKey
from pytest_cpr.guest.state import (
    SNAPSHOT_COMMAND,
    GuestSnapshot,
    link_command,
    parse_link_counters,
    parse_snapshot,
    snapshot,
)
from pytest_cpr.host.netns import GuestNetwork
from pytest_cpr.kinds import Mode
from pytest_cpr.live_update import LiveUpdatePolicy
from pytest_cpr.machine import Machine, VmConfig, record_private_dir
from pytest_cpr.observers import Callbacks, Observers, ProcessHook, TransferObserver
from pytest_cpr.probing import Traffic
from pytest_cpr.qemu.bugs import KnownBug, known_bugs
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.qemu.process import Console, QemuProcess
from pytest_cpr.qemu.spec import VmSpec
from pytest_cpr.transfer import TransferRunner
from pytest_cpr.waits import IRQ_WAIT_S, SNAPSHOT_CONSOLE_TIMEOUT_S

__all__ = ["IRQ_WAIT_S", "CprVM", "Traffic", "VmConfig", "record_private_dir"]


class CprVM:
    """One guest: boot it, talk to it, transfer it; close() leaves nothing behind."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.machine = Machine(config)
        self.observers = Observers()
        self._runner = TransferRunner(self.machine, self.observers, ArtifactWriter(config.artifacts, config.plots),
                                      config.on_transfer)

    def __enter__(self) -> CprVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the parts' state, by the names users know
    @property
    def artifacts(self) -> Path: return self.machine.artifacts
    @property
    def rundir(self) -> Path: return self.machine.rundir
    @property
    def network(self) -> GuestNetwork: return self.machine.network
    @property
    def key(self) -> SessionKey: return self.machine.key
    @property
    def generations(self) -> list[QemuProcess]: return self.machine.generations
    @property
    def current(self) -> QemuProcess: return self.machine.current
    @property
    def guest_ip(self) -> str: return self.machine.guest_ip
    @property
    def ssh(self) -> GuestSSH | None: return self.machine.ssh
    @property
    def ssh_ready_seconds(self) -> float | None: return self.machine.ssh_ready_seconds
    @property
    def boot_retries(self) -> list[str]: return self.machine.boot_retries
    @property
    def transfers(self) -> list[TransferResult]: return self._runner.results
    @property
    def spec(self) -> VmSpec | None: return self.machine.spec
    @spec.setter
    def spec(self, value: VmSpec | None) -> None: self.machine.spec = value

    def boot(self) -> float:
        """Boot generation 0 and wait for SSH; returns boot-to-SSH seconds (see Machine.boot)."""
        return self.machine.boot()

    def launch(self) -> QemuProcess:
        """Start generation 0 without waiting for the guest to boot (see Machine.launch)."""
        return self.machine.launch()

    def close(self) -> None:
        self.machine.close()

    # ---- guest access
    def run(self, command: str, timeout: float | None = None, check: bool = True) -> CommandResult:
        try:
            return self._ssh().run(command, timeout, check)
        except CprTimeout as exc:
            raise CprTimeout(f"{exc}; {self.diagnose(f'guest command {command!r} timed out')}") from None

    def snapshot(self, via: str = "ssh") -> GuestSnapshot:
        """Boot id, uptime and interrupts, over SSH or (when the network is down) the serial console."""
        if via == "console":
            host_t = time.time()
            _, out = self.console().run(SNAPSHOT_COMMAND, timeout=SNAPSHOT_CONSOLE_TIMEOUT_S)
            return parse_snapshot(host_t, out, time.time())
        try:
            return snapshot(self._ssh())
        except CprTimeout as exc:
            raise CprTimeout(f"{exc}; {self.diagnose('a snapshot over SSH timed out')}") from None

    def _ssh(self) -> GuestSSH:
        return self.machine.require_ssh()

    def diagnose(self, why: str) -> str:
        """Record why the guest stopped answering in guest-stuck.txt (QEMU state and registers, host
        vfio interrupt rates, whether the serial console answers); a one-line summary naming it."""
        return self.machine.diagnose(why)

    def console(self) -> Console:
        return self.machine.console()

    def nic_irq_pattern(self, ifname: str | None = None) -> str:
        """Regex of the guest interrupt lines of a NIC (virtio-net: virtioN-input/output); default: the
        NIC holding the guest's address (eth0 in the built guest, cpr0 in a cloud image)."""
        dev = self.run(f"basename $(readlink /sys/class/net/{ifname or self.ifname_of()}/device)").stdout.strip()
        return rf"^{dev}-(input|output)"

    def ifname_of(self, ip: str | None = None) -> str:
        """The guest interface holding `ip` (default: the harness's guest address, the main NIC)."""
        out = self.run(f"ip -o addr show to {ip or self.guest_ip}").stdout.split()
        if len(out) < 2:
            raise CprError(f"no guest interface holds {ip or self.guest_ip}; logs: {self.artifacts}")
        return out[1].split("@")[0]

    def link_counters(self, ifnames: Sequence[str]) -> dict[str, dict[str, int]]:
        """The guest interfaces' carrier changes and drop counters (guest.state.LINK_COUNTERS), over SSH."""
        return parse_link_counters(self.run(link_command(tuple(ifnames))).stdout) if ifnames else {}

    def carrier_changes(self, ifnames: Sequence[str]) -> dict[str, int]:
        """/sys/class/net/<if>/carrier_changes of the guest interfaces, over SSH."""
        return checks.carrier(self.link_counters(ifnames))

    def collect_dmesg(self) -> str:
        """Guest kernel log, over SSH if it works, else over the serial console; saved to artifacts."""
        return self.machine.collect_dmesg()

    # ---- transfers
    def traffic(self, tcp: bool = True, target: str | None = None, host_ip: str | None = None) -> Traffic:
        return Traffic(self, tcp, target, host_ip)

    @contextlib.contextmanager
    def observing(self, observer: TransferObserver) -> Iterator[TransferObserver]:
        """`observer` sees every transfer made inside the `with` block (see pytest_cpr.observers)."""
        with self.observers.attached(observer):
            yield observer

    def transfer(self, target: QemuBuild | None = None, before_migrate: ProcessHook | None = None,
                 after_spawn: ProcessHook | None = None, after_migrate: ProcessHook | None = None,
                 before_retire: ProcessHook | None = None, mode: Mode | None = None) -> TransferResult:
        """Transfer the guest to a new QEMU (of `target`, default: the configured target build) in
        `mode` (default: the configured one, the `cpr` marker's). cpr-transfer: a new process, the old
        one is retired (`before_retire` gets it first, in postmigrate); cpr-exec: the old process
        exec's the new QEMU (same PID, nothing to retire). With traffic running, waits for the probe
        stream to come back and records the guest-visible blackout. The hooks are a one-transfer
        observer."""
        hooks = Callbacks(after_spawn=after_spawn, before_migrate=before_migrate, after_migrate=after_migrate,
                          before_retire=before_retire)
        with self.observing(hooks):
            return self._runner.run(target, mode)

    def live_update(self, traffic: Traffic, target: QemuBuild | None = None, window: int = 100,
                    max_blackout_ms: float | None = None, max_lost_probes: float | None = None,
                    irq_pattern: str | None = None, links: Sequence[str] | None = None) -> TransferResult:
        """One checked transfer under traffic (pytest_cpr.live_update): interrupt windows before and
        after, then every check: completed, old QEMU quit cleanly, connectivity, same boot,
        interrupts, no link flap of `links` (default: the main NIC), thresholds."""
        policy = LiveUpdatePolicy(self, traffic, window, max_blackout_ms, max_lost_probes, irq_pattern, links)
        return policy.run(target)

    def known_bugs(self, result: TransferResult) -> list[KnownBug]:
        """The known QEMU bugs the old QEMU of that transfer can meet (its build, accelerator, devices)."""
        return known_bugs(self.machine.build_of(result.source.label), self.config.accel,
                          self.config.has_vfio_device, result.mode)

    def write_transfers(self, result: TransferResult | None = None) -> None:
        """Rewrite transfers.json (after checks added to the last result); with `result`, its numbers
        go to the report again too (figures the checks added after the transfer, e.g. carrier_changes)."""
        if result is not None:
            for hook in self._runner.report:
                hook(result)
        self._runner.artifacts.write_transfers(self.transfers)
