"""The ICMP probe's wire log: echo frames parsed from packet-socket captures, kernel timestamps read
from the ancillary data, 16-bit sequence numbers unwrapped, and lost probes attributed to the phase
of the transfer in which they were sent."""

from __future__ import annotations

import socket
import struct

import pytest

from pytest_cpr.net import pinger
from pytest_cpr.net.traffic import (
    SO_TIMESTAMPNS,
    Probe,
    ProbeLog,
    kernel_time,
    lost_by_phase,
    parse_echo,
    probe_stats,
    unwrap_seq,
)

HOST, GUEST = "10.77.0.1", "10.77.0.2"


def frame(kind: int, seq: int, src: str = HOST, dst: str = GUEST, proto: int = 1, ethertype: int = 0x0800) -> bytes:
    eth = b"\x52\x54\x00\x12\x34\x56" * 2 + struct.pack("!H", ethertype)
    icmp = struct.pack("!BBHHH", kind, 0, 0, 0x1234, seq) + b"\0" * 48
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return eth + ip + icmp


def test_parse_echo_keeps_requests_to_and_replies_from_the_target_only() -> None:
    target = socket.inet_aton(GUEST)
    assert parse_echo(frame(8, 7), target) == (8, 7)
    assert parse_echo(frame(0, 65535, src=GUEST, dst=HOST), target) == (0, 65535)
    assert parse_echo(frame(8, 7, dst="10.77.0.3"), target) is None  # another guest's probe
    assert parse_echo(frame(0, 7, src=HOST, dst=GUEST), target) is None  # a reply the other way
    assert parse_echo(frame(3, 7), target) is None  # not an echo
    assert parse_echo(frame(8, 7, proto=6), target) is None  # TCP
    assert parse_echo(frame(8, 7, ethertype=0x86DD), target) is None  # IPv6
    assert parse_echo(frame(8, 7)[:40], target) is None  # truncated


def test_kernel_time_reads_scm_timestampns() -> None:
    stamp = struct.pack("@qq", 1700000000, 250_000_000)
    anc = [(socket.SOL_SOCKET, 29, b"x" * 16), (socket.SOL_SOCKET, SO_TIMESTAMPNS, stamp)]
    assert kernel_time(anc) == pytest.approx(1700000000.25, abs=1e-6)
    assert kernel_time([]) is None


def test_unwrap_seq_follows_the_16_bit_wrap() -> None:
    assert unwrap_seq(5, 3) == 5
    assert unwrap_seq(0, 65536) == 65536 and unwrap_seq(65535, 65536) == 65535
    assert unwrap_seq(2, 131070) == 131074


def test_probe_log_orders_requests_counts_each_reply_once_and_survives_the_wrap() -> None:
    log = ProbeLog()
    t = 100.0
    for n in range(70000):  # past the 16-bit wrap at a 1 ms interval
        seq16 = (65530 + n) % 65536  # ping's first sequence number is arbitrary here
        log.request(seq16, t + n * 0.001)
        log.request(seq16, t + n * 0.001 + 1e-6)  # the same frame again on the tap
        if n % 1000 != 999:
            log.reply(seq16, t + n * 0.001 + 0.0003)
            log.reply(seq16, t + n * 0.001 + 0.0004)  # and its copy on the bridge
    assert len(log.probes) == 70000 and [p.seq for p in log.probes[:3]] == [0, 1, 2]
    assert sum(p.t_recv is None for p in log.probes) == 70
    assert log.probes[69000].t_recv == pytest.approx(t + 69.0003)
    assert log.probes[-2].arrival == log.arrivals - 1 and log.uncaptured == 0


def test_probe_log_fills_requests_the_capture_dropped() -> None:
    log = ProbeLog()
    log.request(10, 1.000)
    log.request(14, 1.004)  # 11..13 never seen: they were sent, placed evenly, and count as lost
    log.reply(12, 1.0035)
    assert [round(p.t_send, 4) for p in log.probes] == [1.000, 1.001, 1.002, 1.003, 1.004]
    assert log.uncaptured == 3 and log.probes[2].t_recv == 1.0035
    log.reply(9, 1.01)  # a reply to a request before the first one seen is ignored
    assert log.arrivals == 1


def test_lost_probes_are_attributed_to_before_stop_downtime_and_after_resume() -> None:
    probes = [Probe(i, 10 + i * 0.001, 10 + i * 0.001 + 0.0002) for i in range(200)]
    lost = [20, 99, 100, 101, 130, 160]  # stopped at 10.100, running at 10.150
    for i in lost:
        probes[i].t_recv = None
    counts = lost_by_phase(probes, 10.0, 10.199, 10.100, 10.150)
    assert counts == {"lost_before_stop": 2, "lost_in_downtime": 3, "lost_after_resume": 1}
    assert sum(counts.values()) == probe_stats(probes, 10.0, 10.199, 1.0, grace_s=0.0).lost
    assert lost_by_phase(probes, 10.0, 10.199, None, 10.150)["lost_before_stop"] == 5


def test_pinger_request_is_a_valid_echo_the_capture_recognises() -> None:
    """The sender's packet has a correct ICMP checksum (the guest answers only those) and, wrapped in
    IP and Ethernet, parses as an echo request with the 16-bit sequence of the full one."""
    icmp = pinger.echo_request(0x1234, 65536 + 7)
    assert pinger.checksum(icmp) == 0 and pinger.MARKER in icmp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                     socket.inet_aton(HOST), socket.inet_aton(GUEST))
    eth = b"\x52\x54\x00\x12\x34\x56" * 2 + b"\x08\x00"
    assert parse_echo(eth + ip + icmp, socket.inet_aton(GUEST)) == (8, 7)
