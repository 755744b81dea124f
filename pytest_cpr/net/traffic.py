"""Traffic that runs through a transfer: an ICMP probe stream and a host-to-guest TCP stream.

The ICMP probe is answered by the guest kernel itself, so it measures exactly what the guest's
network sees (no guest process involved): every gap in its replies is a gap in connectivity.

The probe's sender is a separate process (pytest_cpr.net.pinger) at real-time priority (SCHED_FIFO,
where the kernel allows it) in the guest's namespace, and the probe is timed by the kernel, not by
this interpreter: a packet socket in the namespace records every echo request as it leaves and every
reply as it arrives, with the kernel's timestamps (SO_TIMESTAMPNS). So the harness's own scheduling
on a busy machine can delay when it *reads* a probe, never when the probe was sent or answered; the
sender's jitter is measured on the wire.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache

from pytest_cpr.errors import CprTimeout
from pytest_cpr.guest.ssh import GuestSSH
from pytest_cpr.host.netns import NETNS_DIR, GuestNetwork

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>; SCM_TIMESTAMPNS has the same value
SO_RCVBUFFORCE = 33  # past net.core.rmem_max (CAP_NET_ADMIN)
SOL_PACKET, PACKET_STATISTICS = 263, 6  # struct tpacket_stats {tp_packets, tp_drops}: read and reset
# The capture's receive buffer: after a blackout the guest answers every queued request at once; in
# the virtual host (L1's rmem_max 212992: SO_RCVBUF got 416 KiB) a burst overflowed it, and the
# replies it dropped, the newest, read as probes lost after the resume. 8 MiB holds ~3000 frames.
CAPTURE_BUFFER = 8 << 20
ICMP_ECHO_REPLY, ICMP_ECHO = 0, 8
LOSS_PHASES = ("lost_before_stop", "lost_in_downtime", "lost_after_resume")
SEQ_MOD = 1 << 16  # the ICMP sequence wraps: after 65.5 s at a 1 ms interval
SENDER_FIFO_PRIORITY = 50
SENDER_START_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1
SO_ATTACH_FILTER = 26
# classic BPF: keep IPv4 ICMP frames, drop the rest (the TCP stream) in the kernel
_ICMP_ONLY = [(0x28, 0, 0, 12), (0x15, 0, 3, 0x0800), (0x30, 0, 0, 23), (0x15, 0, 1, socket.IPPROTO_ICMP),
              (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]


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


def parse_echo(frame: bytes, target: bytes) -> tuple[int, int] | None:
    """(ICMP type, 16-bit sequence) of an echo request to or reply from `target` (4 address bytes)
    in an Ethernet frame, else None."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_ICMP or len(ip) < ihl + 8:
        return None
    kind = ip[ihl]
    if not ((kind == ICMP_ECHO and ip[16:20] == target) or (kind == ICMP_ECHO_REPLY and ip[12:16] == target)):
        return None
    return kind, struct.unpack("!H", ip[ihl + 6:ihl + 8])[0]


def attach_icmp_filter(sock: socket.socket) -> None:
    """Only IPv4 ICMP frames reach the packet socket."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in _ICMP_ONLY)
    buf = ctypes.create_string_buffer(code)
    prog = struct.pack("HL", len(_ICMP_ONLY), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def kernel_time(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The SCM_TIMESTAMPNS of a recvmsg, in seconds on the wall clock (time.time())."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("@qq", data[:16])
            seconds: float = sec + nsec / 1e9
            return seconds
    return None


def unwrap_seq(seq16: int, near: int) -> int:
    """The full sequence number closest to `near` whose low 16 bits are `seq16`."""
    delta = (seq16 - near) % SEQ_MOD
    return near + (delta - SEQ_MOD if delta >= SEQ_MOD // 2 else delta)


class ProbeLog:
    """Probes in send order, built from the kernel-timestamped requests and replies seen on the wire.
    probes[i].seq == i; a reply counts once (the first copy: the frame crosses tap and bridge)."""

    def __init__(self) -> None:
        self.probes: list[Probe] = []
        self.arrivals = 0
        self.uncaptured = 0  # requests inferred from a sequence gap (not sent, or the capture dropped them)
        self._first: int | None = None  # full sequence number of probes[0]
        self._last = 0  # full sequence number of the newest request

    def request(self, seq16: int, t: float) -> None:
        if self._first is None:
            self._first = self._last = seq16
            self.probes.append(Probe(0, t))
            return
        seq = unwrap_seq(seq16, self._last + 1)
        if seq <= self._last:
            return  # the same request seen again on another interface
        if (missing := seq - self._last - 1) > 0:  # never seen: placed evenly, so losses still count
            t_prev = self.probes[-1].t_send
            for k in range(1, missing + 1):
                self.probes.append(Probe(len(self.probes), t_prev + (t - t_prev) * k / (missing + 1)))
            self.uncaptured += missing
        self._last = seq
        self.probes.append(Probe(len(self.probes), t))

    def reply(self, seq16: int, t: float) -> None:
        if self._first is None:
            return
        index = unwrap_seq(seq16, self._last) - self._first
        if 0 <= index < len(self.probes) and self.probes[index].t_recv is None:
            self.probes[index].t_recv = t
            self.probes[index].arrival = self.arrivals
            self.arrivals += 1


@cache
def realtime_allowed() -> bool:
    """May this process start a SCHED_FIFO child (root outside a restricted container)?"""
    chrt = shutil.which("chrt")
    return chrt is not None and subprocess.run([chrt, "-f", str(SENDER_FIFO_PRIORITY), "true"],
                                               capture_output=True, check=False).returncode == 0


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills the sender if the harness dies (nothing left behind)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class IcmpProbe:
    """Echo requests every `interval_ms` from the namespace to the guest (pytest_cpr.net.pinger), each
    request and answer timed by the kernel on one clock."""

    network: GuestNetwork
    target: str
    interval_ms: float = 5.0

    def __post_init__(self) -> None:
        self.realtime = realtime_allowed()
        prio = ["chrt", "-f", str(SENDER_FIFO_PRIORITY)] if self.realtime else []
        self.argv = ["nsenter", f"--net={NETNS_DIR / self.network.name}", *prio, sys.executable, "-m",
                     "pytest_cpr.net.pinger", self.target, f"{self.interval_ms:g}"]
        self._log = ProbeLog()
        self._target = socket.inet_aton(self.target)
        self._sock = self.network.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        attach_icmp_filter(self._sock)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CAPTURE_BUFFER)
        self.capture_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._capture_drops = 0
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sender: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._capture_loop, name="icmp-capture", daemon=True)

    @property
    def probes(self) -> list[Probe]:
        return self._log.probes

    @property
    def uncaptured(self) -> int:
        return self._log.uncaptured

    def __enter__(self) -> IcmpProbe:
        self._thread.start()
        self._sender_err = tempfile.TemporaryFile()  # a file: a pipe nobody reads could block it
        self._sender = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=self._sender_err, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + SENDER_START_TIMEOUT_S
        while not self.probes:
            if self._sender.poll() is not None or time.monotonic() > deadline:
                err = self._stop_sender()
                self.stop()
                raise CprTimeout(f"ICMP probe: no echo request to {self.target} seen within "
                                 f"{SENDER_START_TIMEOUT_S:.0f}s ({' '.join(self.argv)}: {err or 'no output'})")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _capture_loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame, anc, _, _ = self._sock.recvmsg(2048, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            echo = parse_echo(frame, self._target)
            if echo is None:
                continue
            t = kernel_time(anc) or time.time()
            with self._lock:
                if echo[0] == ICMP_ECHO:
                    self._log.request(echo[1], t)
                else:
                    self._log.reply(echo[1], t)

    def capture_drops(self) -> int:
        """Frames the kernel dropped because the capture socket's buffer was full, since the start:
        PACKET_STATISTICS resets at each read, so each call adds what it read to the total. Replies it
        dropped read as lost probes that the guest answered."""
        if self._sock.fileno() >= 0:
            with self._lock:
                _, drops = struct.unpack("@II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
                self._capture_drops += drops
        return self._capture_drops

    def _stop_sender(self) -> str:
        if self._sender is None:
            return ""
        if self._sender.poll() is None:
            self._sender.terminate()
            try:
                self._sender.wait(5)
            except subprocess.TimeoutExpired:
                self._sender.kill()
                self._sender.wait()
        self._sender = None
        self._sender_err.seek(0)
        err = self._sender_err.read(4096).decode(errors="replace").strip()
        self._sender_err.close()
        return err

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop_sender()
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(2)
            self.capture_drops()  # counted before the socket goes
            self._sock.close()

    def snapshot(self) -> list[Probe]:
        with self._lock:
            return list(self.probes)

    def sent(self) -> int:
        with self._lock:
            return len(self.probes)

    def answered_since(self, since: float) -> int:
        """Answered probes sent at or after `since` (reads only the tail)."""
        with self._lock:
            count = 0
            for p in reversed(self.probes):
                if p.t_send < since:
                    break
                count += p.t_recv is not None
            return count

    def stats(self, t_from: float, t_to: float, grace_s: float = 0.5) -> ProbeStats:
        return probe_stats(self.snapshot(), t_from, t_to, self.interval_ms, grace_s)


def lost_by_phase(all_probes: list[Probe], t_from: float, t_to: float, stopped: float | None,
                  running: float) -> dict[str, int]:
    """The lost probes of [t_from, t_to] by when they were sent: before the source stopped, in the
    downtime (stopped .. target running), after the target resumed. The three add up to `lost`."""
    counts = dict.fromkeys(LOSS_PHASES, 0)
    stop = running if stopped is None else stopped
    for p in all_probes:
        if t_from <= p.t_send <= t_to and p.t_recv is None:
            phase = 0 if p.t_send < stop else 1 if p.t_send <= running else 2
            counts[LOSS_PHASES[phase]] += 1
    return counts


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
