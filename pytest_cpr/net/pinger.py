"""The ICMP probe's sender: a small process of its own that sends an echo request to one address
every interval on an absolute monotonic schedule, and nothing else.

    python -m pytest_cpr.net.pinger TARGET INTERVAL_MS

IcmpProbe starts it inside the guest's network namespace at real-time priority (SCHED_FIFO) where
the kernel allows it; it is not timed here: the probe reads each request's kernel transmit time off
the wire. iputils ping does not fit: below 10 ms (one tick of its HZ) it sleeps a whole tick while a
reply is outstanding, so during a blackout it sends every 10 ms, not every 1 ms. A sender that falls
behind (not scheduled) does not burst: it sends one probe and takes up the schedule from there.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

ICMP_ECHO = 8
MARKER = b"pytest-cpr-probe"


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
    ident = os.getpid() & 0xFFFF
    interval_ns = round(interval_ms * 1e6)
    next_ns = time.monotonic_ns()
    seq = 0
    while True:
        try:
            sock.sendto(echo_request(ident, seq), (target, 0))
        except OSError:
            pass  # no route or a full queue while the link is down: a lost probe, seen as such
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
