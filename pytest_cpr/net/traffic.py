"""Traffic that runs through a transfer: an ICMP probe stream and a host-to-guest TCP stream.

The ICMP probe is answered by the guest kernel itself, so it measures exactly what the guest's
network sees (no guest process involved): every gap in its replies is a gap in connectivity.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from pytest_cpr.errors import CprTimeout
from pytest_cpr.guest.ssh import GuestSSH
from pytest_cpr.host.netns import GuestNetwork


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


@dataclass
class ProbeStats:
    """What the guest's network looked like during one window (usually one transfer)."""

    sent: int
    answered: int
    lost: int
    reordered: int
    max_gap_ms: float  # largest interval between consecutive answers (the guest-visible blackout)
    gap_start: float | None  # host time of the last answer before the largest gap
    gap_end: float | None  # host time of the first answer after it
    rtt_median_ms: float | None
    interval_ms: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Probe:
    seq: int
    t_send: float
    t_recv: float | None = None
    arrival: int | None = None  # order of arrival


@dataclass
class IcmpProbe:
    """Echo requests every `interval_ms` from the namespace to the guest, answers timed on one clock."""

    network: GuestNetwork
    target: str
    interval_ms: float = 5.0
    probes: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ident = os.getpid() & 0xFFFF
        self._sock = self.network.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._arrivals = 0
        self._threads = [threading.Thread(target=self._send_loop, name="icmp-send", daemon=True),
                         threading.Thread(target=self._recv_loop, name="icmp-recv", daemon=True)]

    def __enter__(self) -> IcmpProbe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _packet(self, seq: int) -> bytes:
        payload = struct.pack("!Id", seq, time.time()) + b"pytest-cpr-probe"
        header = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq & 0xFFFF)
        return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self._ident, seq & 0xFFFF) + payload

    def _send_loop(self) -> None:
        interval = self.interval_ms / 1000
        next_t = time.monotonic()
        seq = 0
        while not self._stop.is_set():
            with self._lock:
                self.probes.append(Probe(seq, time.time()))
            try:
                self._sock.sendto(self._packet(seq), (self.target, 0))
            except OSError:
                pass  # no route while the link is down counts as a lost probe
            seq += 1
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()  # fell behind: do not burst

    def _recv_loop(self) -> None:
        while not self._stop.is_set() or self._pending():
            try:
                data = self._sock.recv(2048)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            except OSError:
                return
            now = time.time()
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if len(icmp) < 20 or icmp[0] != 0:
                continue
            ident = struct.unpack("!H", icmp[4:6])[0]
            if ident != self._ident:
                continue
            seq = struct.unpack("!I", icmp[8:12])[0]
            with self._lock:
                if seq < len(self.probes) and self.probes[seq].t_recv is None:
                    self.probes[seq].t_recv = now
                    self.probes[seq].arrival = self._arrivals
                    self._arrivals += 1

    def _pending(self) -> bool:
        return False

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            for thread in self._threads:
                if thread.is_alive():
                    thread.join(2)
            self._sock.close()

    def snapshot(self) -> list[Probe]:
        with self._lock:
            return list(self.probes)

    def stats(self, t_from: float, t_to: float, grace_s: float = 0.5) -> ProbeStats:
        return probe_stats(self.snapshot(), t_from, t_to, self.interval_ms, grace_s)


def probe_stats(all_probes: list[Probe], t_from: float, t_to: float, interval_ms: float,
                grace_s: float = 0.5) -> ProbeStats:
    """Statistics of probes sent in [t_from, t_to]; a probe counts as lost if no answer came
    within `grace_s` (the last `grace_s` of the window is not judged)."""
    probes = [p for p in all_probes if t_from <= p.t_send <= t_to]
    judged = [p for p in probes if p.t_send <= t_to - grace_s or p.t_recv is not None]
    answered = sorted((p for p in judged if p.t_recv is not None), key=lambda p: p.t_recv or 0.0)
    lost = sum(1 for p in judged if p.t_recv is None)
    reordered = 0
    highest = -1
    for p in answered:
        if p.seq < highest:
            reordered += 1
        highest = max(highest, p.seq)
    max_gap, gap_start, gap_end = 0.0, None, None
    for a, b in itertools.pairwise(answered):
        assert a.t_recv is not None and b.t_recv is not None
        if b.t_recv - a.t_recv > max_gap:
            max_gap, gap_start, gap_end = b.t_recv - a.t_recv, a.t_recv, b.t_recv
    if judged and judged[-1].t_recv is None:
        # no answer since the last one: the blackout lasts at least until the last judged probe
        last_answer = answered[-1].t_recv if answered else t_from
        assert last_answer is not None
        if judged[-1].t_send - last_answer > max_gap:
            max_gap, gap_start, gap_end = judged[-1].t_send - last_answer, last_answer, None
    rtts = sorted((p.t_recv - p.t_send) * 1000 for p in answered if p.t_recv is not None)
    return ProbeStats(sent=len(judged), answered=len(answered), lost=lost, reordered=reordered,
                      max_gap_ms=round(max_gap * 1000, 3), gap_start=gap_start, gap_end=gap_end,
                      rtt_median_ms=round(rtts[len(rtts) // 2], 3) if rtts else None,
                      interval_ms=interval_ms)


@dataclass
class StreamResult:
    bytes_sent: int
    bytes_received: int
    sha256_sent: str
    sha256_received: str
    max_send_stall_ms: float

    @property
    def intact(self) -> bool:
        return self.bytes_sent == self.bytes_received and self.sha256_sent == self.sha256_received


class TcpStream:
    """Numbered lines from the host to the guest over one TCP connection, verified by the guest's
    byte count and SHA-256: complete and in order, or the check fails."""

    def __init__(self, network: GuestNetwork, ssh: GuestSSH, lines_per_tick: int = 64,
                 tick_s: float = 0.01, host_ip: str | None = None) -> None:
        self.network, self.ssh = network, ssh
        self.host_ip = host_ip or network.host_ip  # the guest connects here (another NIC's peer if given)
        self.lines_per_tick, self.tick_s = lines_per_tick, tick_s
        self._listener = network.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host_ip, 0))
        self._listener.listen(1)
        self.port = self._listener.getsockname()[1]
        self._hash = hashlib.sha256()
        self._sent = 0
        self._max_stall = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: socket.socket | None = None
        self._channel = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> TcpStream:
        cmd = (f"f=/tmp/cpr-stream-$$; cat < /dev/tcp/{self.host_ip}/{self.port} > $f; "
               f'echo "CPR-STREAM $(wc -c < $f) $(sha256sum < $f | cut -d" " -f1)"; rm -f $f')
        self._channel = self.ssh.start(f"bash -c '{cmd}'")
        self._listener.settimeout(timeout)
        try:
            self._conn, _ = self._listener.accept()
        except TimeoutError:
            raise CprTimeout(f"guest did not open the TCP stream to {self.host_ip}:{self.port} "
                             f"within {timeout:.0f}s") from None
        self._thread = threading.Thread(target=self._send_loop, name="tcp-stream", daemon=True)
        self._thread.start()
        return self

    def _send_loop(self) -> None:
        assert self._conn is not None
        line = 0
        next_t = time.monotonic()
        try:
            while not self._stop.is_set():
                chunk = "".join(f"{n:012d}\n" for n in range(line, line + self.lines_per_tick)).encode()
                line += self.lines_per_tick
                t0 = time.monotonic()
                self._conn.sendall(chunk)
                self._max_stall = max(self._max_stall, time.monotonic() - t0)
                self._hash.update(chunk)
                self._sent += len(chunk)
                next_t += self.tick_s
                delay = next_t - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_t = time.monotonic()
        except OSError as exc:
            self.error = exc

    def finish(self, timeout: float = 60.0) -> StreamResult:
        """Stop sending, close the stream and collect the guest's count and hash."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._conn is not None:
            self._conn.shutdown(socket.SHUT_WR)
            self._conn.close()
        self._listener.close()
        assert self._channel is not None
        self._channel.settimeout(timeout)
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while b"CPR-STREAM" not in out or not out.endswith(b"\n"):
                if time.monotonic() > deadline:
                    raise TimeoutError
                data = self._channel.recv(4096)
                if not data:
                    break
                out += data
        except TimeoutError:
            raise CprTimeout(f"guest did not report the TCP stream result within {timeout:.0f}s") from None
        finally:
            self._channel.close()
        fields = out.decode(errors="replace").split()
        received, digest = (int(fields[1]), fields[2]) if len(fields) >= 3 else (-1, "")
        return StreamResult(self._sent, received, self._hash.hexdigest(), digest,
                            round(self._max_stall * 1000, 3))
