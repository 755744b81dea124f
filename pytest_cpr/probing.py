"""Traffic through a guest while it is transferred, and the probe measurement of each transfer.

`Traffic` runs the ICMP probe stream and the TCP stream; while it runs, its `ProbeMeasurement` is an
observer of the VM's transfers: after each one it waits (bounded) for the probe stream to recover
and records the guest-visible blackout in the result. The VM does not know about traffic.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pytest_cpr import plot
from pytest_cpr.errors import CprTimeout
from pytest_cpr.kinds import Phase
from pytest_cpr.net.traffic import IcmpProbe, Probe, StreamResult, TcpStream, lost_by_phase
from pytest_cpr.observers import Observer
from pytest_cpr.waits import (
    CONFIRM_ANSWERS,
    CONFIRM_TIMEOUT_S,
    PROBES_SENT_TIMEOUT_S,
    RECOVERY_ANSWERS,
    RECOVERY_TIMEOUT_S,
    TRAFFIC_START_ANSWERS,
    TRAFFIC_START_TIMEOUT_S,
)

if TYPE_CHECKING:
    from pytest_cpr.cpr import TransferResult
    from pytest_cpr.vm import CprVM

POLL_S = 0.01


class Traffic:
    """Probe stream + TCP stream running while the caller transfers the guest."""

    def __init__(self, vm: CprVM, tcp: bool = True, target: str | None = None,
                 host_ip: str | None = None) -> None:
        """`target`: the guest address probed (default: the virtio NIC's); `host_ip`: the namespace
        address the guest streams to (default: the bridge's), e.g. a passthrough NIC and its peer."""
        self.vm = vm
        self.target = target or vm.guest_ip
        self.probe = IcmpProbe(vm.network, self.target, vm.config.probe_interval_ms)
        ssh = vm.machine.require_ssh()
        self.stream: TcpStream | None = TcpStream(vm.network, ssh, host_ip=host_ip) if tcp else None
        self.stream_result: StreamResult | None = None
        self.measurement = ProbeMeasurement(self)

    def __enter__(self) -> Traffic:
        self.probe.__enter__()
        if self.stream is not None:
            self.stream.start()
        self.vm.observers.add(self.measurement)
        self.wait_answers(TRAFFIC_START_ANSWERS, TRAFFIC_START_TIMEOUT_S)
        return self

    def wait_sent(self, count: int, timeout: float = PROBES_SENT_TIMEOUT_S) -> None:
        """Wait until `count` more probes were sent (answered or not)."""
        start = self.probe.sent()
        deadline = time.monotonic() + timeout
        while self.probe.sent() < start + count:
            if time.monotonic() > deadline:
                raise CprTimeout(f"probe sender stalled: fewer than {count} probes sent in {timeout:.0f}s")
            time.sleep(self._poll_s)

    def wait_answers(self, count: int, timeout: float, since: float | None = None) -> int:
        """Wait until `count` probes sent after `since` (default: now) were answered."""
        since = time.time() if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            got = self.probe.answered_since(since)
            if got >= count:
                return got
            if time.monotonic() > deadline:
                raise CprTimeout(f"only {got} of {count} probes to {self.target} answered within "
                                 f"{timeout:.0f}s (guest network down?); logs: {self.vm.artifacts}")
            time.sleep(self._poll_s)

    @property
    def _poll_s(self) -> float:
        """How often the waits look at the probe log: the probes are timed by the kernel, so reading
        them every probe interval (1 ms) would only burn the CPU the guest needs."""
        return max(self.probe.interval_ms / 1000, POLL_S)

    def finish_stream(self) -> StreamResult | None:
        if self.stream is not None and self.stream_result is None:
            self.stream_result = self.stream.finish(self.vm.config.command_timeout)
        return self.stream_result

    def __exit__(self, *exc: object) -> None:
        self.vm.observers.remove(self.measurement)
        try:
            if exc[0] is None:
                self.finish_stream()
        finally:
            self.probe.stop()


class ProbeMeasurement(Observer):
    """After a transfer whose target resumed the guest: probe statistics of the window from the step
    start to RECOVERY_ANSWERS answers after the target resumed. Every probe of the window is judged:
    one still unanswered once probes sent after the window came back is lost."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def probe_series(self, t_from: float, t_to: float) -> plot.ProbeSeries:
        probe = self.traffic.probe
        return plot.ProbeSeries.of(probe.snapshot(), t_from, t_to, probe.interval_ms)

    def on_result(self, result: TransferResult) -> None:
        t = result.timeline
        if Phase.TARGET_RUNNING not in t or result.status != "completed":
            return  # paused guest (nothing resumed) or failed transfer: no blackout to measure
        try:
            self.traffic.wait_answers(RECOVERY_ANSWERS, RECOVERY_TIMEOUT_S, since=t[Phase.TARGET_RUNNING])
            window_end = time.time()
            self.traffic.wait_answers(CONFIRM_ANSWERS, CONFIRM_TIMEOUT_S, since=window_end)
        except CprTimeout as exc:
            result.notes.append(f"probe stream did not recover: {exc}")
            window_end = time.time()
        probe = self.traffic.probe
        probes = probe.snapshot()
        answers = [p.t_recv for p in probes if p.t_recv is not None and p.t_recv >= t[Phase.TARGET_RUNNING]]
        if answers:
            t[Phase.FIRST_PROBE_AFTER] = min(answers)
        stats = probe.stats(_window_start(probes, t[Phase.STEP_START]), window_end, grace_s=0.0)
        series = plot.ProbeSeries.of(probes, t[Phase.STEP_START], window_end, probe.interval_ms)
        result.probe = {**stats.as_dict(), **series.send_stall(stats.gap_start, stats.gap_end),
                        **lost_by_phase(probes, t[Phase.STEP_START], window_end, t.get(Phase.SOURCE_STOPPED),
                                        t[Phase.TARGET_RUNNING]),
                        "probe_realtime": probe.realtime, "probe_uncaptured": probe.uncaptured,
                        "probe_capture_drops": probe.capture_drops()}


def _window_start(probes: list[Probe], step_start: float) -> float:
    """Where the blackout window opens: at the send time of the last probe answered before the step
    started, so the first gap runs from that answer. (Opening it at the step start missed the silence
    when the guest stops within a probe interval of it, as with cpr-exec and cpr-reboot: their
    blackouts read shorter than the VM pause.)"""
    before = [p for p in probes if p.t_recv is not None and p.t_recv <= step_start]
    return max(before, key=lambda p: p.t_recv or 0.0).t_send if before else step_start
