"""The ICMP probe's sender: a small process of its own that sends an echo request to one address
every interval on an absolute monotonic schedule, and nothing else.

    python -m pytest_cpr.net.pinger TARGET INTERVAL_MS

IcmpProbe starts it inside the guest's network namespace at real-time priority (SCHED_FIFO) where
the kernel allows it; it is not timed here: the probe reads each request's kernel transmit time off
the wire. iputils ping does not fit: below 10 ms (one tick of its HZ) it sleeps a whole tick while a
reply is outstanding, so during a blackout it sends every 10 ms, not every 1 ms. A sender that falls
behind (not scheduled) does not burst: it sends one probe and takes up the schedule from there.

While the guest's QEMU is stopped its tap queues the requests, and each queued packet is charged to
the sending socket: with the default send buffer the sender would block inside the blackout it is
measuring. Its buffer is raised past any tap queue, sends never block (a request that cannot be
queued is dropped: a lost probe, as it should be), and its memory is locked and its garbage
collector off so that nothing but the scheduler delays a send.
"""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import struct
import sys
import time

ICMP_ECHO = 8
MARKER = b"pytest-cpr-probe"
SEND_BUFFER = 16 << 20  # bytes: more than a full tap queue (1000 packets) of these requests
SO_SNDBUFFORCE = 32
MCL_CURRENT, MCL_FUTURE = 1, 2


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def echo_request(ident: int, seq: int) -> bytes:
    """An ICMP echo request: 16-bit sequence in the header, the full one and the marker in the payload."""
    payload = struct.pack("!Q", seq) + MARKER
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq & 0xFFFF)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, checksum(header + payload), ident, seq & 0xFFFF) + payload


def send_forever(target: str, interval_ms: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies are read off the wire, not here
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
    except PermissionError:  # without CAP_NET_ADMIN: up to wmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock.setblocking(False)
    gc.disable()
    ctypes.CDLL(None).mlockall(MCL_CURRENT | MCL_FUTURE)  # best effort: fails quietly without the right
    ident = os.getpid() & 0xFFFF
    interval_ns = round(interval_ms * 1e6)
    next_ns = time.monotonic_ns()
    seq = 0
    while True:
        try:
            sock.sendto(echo_request(ident, seq), (target, 0))
        except OSError:
            pass  # no route, or no buffer left: a lost probe (its sequence number is missing on the wire)
        seq += 1
        next_ns += interval_ns
        delay = next_ns - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)
        else:
            next_ns = time.monotonic_ns()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pytest_cpr.net.pinger TARGET INTERVAL_MS", file=sys.stderr)
        return 2
    try:
        send_forever(args[0], float(args[1]))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
