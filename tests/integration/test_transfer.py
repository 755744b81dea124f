"""A real guest (TCG or KVM, virtio-net on a harness-owned tap) through cpr-transfer, end to end."""

from __future__ import annotations

import json

import pytest

from pytest_cpr import checks
from pytest_cpr.vm import CprVM

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


def test_three_transfers_keep_ssh_stream_and_interrupts(cpr_vm: CprVM, cpr_thresholds: dict) -> None:
    """Three consecutive transfers of one guest under probe + TCP traffic: the SSH session opened at
    boot keeps working, the stream arrives complete and in order, the guest never reboots, every NIC
    vector that fired before each transfer fires after it, and the guest log stays clean."""
    boot_id = cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    with cpr_vm.traffic() as traffic:
        results = [cpr_vm.live_update(traffic, **cpr_thresholds) for _ in range(3)]
    checks.assert_stream_intact(traffic.stream_result, cpr_vm.artifacts)
    checks.assert_clean_dmesg(cpr_vm.collect_dmesg(), cpr_vm.artifacts)
    assert [r.status for r in results] == ["completed"] * 3
    assert len(cpr_vm.generations) == 4, "each transfer must start exactly one new QEMU process"
    assert cpr_vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
    for r in results:
        assert r.qemu_downtime_ms is not None and r.blackout_ms is not None
        assert r.interrupts is not None and r.interrupts["after"], "NIC vectors must fire after transfer"
    saved = json.loads((cpr_vm.artifacts / "transfers.json").read_text())
    assert [t["interrupts"] == r.interrupts for t, r in zip(saved, results, strict=True)] == [True] * 3, \
        "transfers.json must hold each transfer's interrupt counts, the last one's too"
