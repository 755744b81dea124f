from __future__ import annotations

import pytest

from pytest_cpr import checks
from pytest_cpr.checks import (
    CheckFailed,
    assert_interrupts,
    assert_no_link_flap,
    assert_same_boot,
    assert_thresholds,
)
from pytest_cpr.cpr import ProcessRef, TransferResult
from pytest_cpr.guest.state import (
    GuestSnapshot,
    dmesg_failures,
    link_command,
    parse_interrupts,
    parse_link_counters,
    parse_snapshot,
)
from pytest_cpr.guest.traffic import Probe, probe_stats

INTERRUPTS = """\
            CPU0       CPU1
  0:         43          0   IO-APIC   2-edge      timer
 24:          0          0   PCI-MSI 16384-edge      virtio0-config
 27:        436         12   PCI-MSI 49153-edge      virtio2-input.0
 28:        467          0   PCI-MSI 49154-edge      virtio2-output.0
 40:          7          1   PCI-MSIX-0000:00:10.0   0-edge      nvme0q0
NMI:          0          0   Non-maskable interrupts
ERR:          0
"""


def test_parse_interrupts_keys_counts_and_names() -> None:
    lines = parse_interrupts(INTERRUPTS)
    assert lines["27:virtio2-input.0"].counts == (436, 12)
    assert lines["27:virtio2-input.0"].total == 448
    assert lines["40:nvme0q0"].chip.startswith("PCI-MSIX-0000:00:10.0")
    assert lines["ERR:ERR"].total == 0
    assert "NMI:interrupts" in lines


def snap(t: float, uptime: float, counts: dict[str, int], boot: str = "b1") -> GuestSnapshot:
    text = "            CPU0\n" + "".join(
        f" {i}:  {n}  PCI-MSI {i}-edge  {name}\n" for i, (name, n) in enumerate(counts.items(), 24))
    return GuestSnapshot(t, boot, uptime, parse_interrupts(text))


PAT = r"^virtio2-(input|output)"


def test_interrupts_pass_when_active_vectors_fire_again() -> None:
    pre = (snap(0, 10, {"virtio2-input.0": 10, "virtio2-output.0": 5}),
           snap(1, 11, {"virtio2-input.0": 20, "virtio2-output.0": 9}))
    post = (snap(2, 12, {"virtio2-input.0": 21, "virtio2-output.0": 9}),
            snap(3, 13, {"virtio2-input.0": 30, "virtio2-output.0": 12}))
    fired = assert_interrupts(pre, post, PAT)
    assert fired["before"] == {"24:virtio2-input.0": 10, "25:virtio2-output.0": 4}


def test_interrupts_fail_when_a_vector_goes_silent() -> None:
    pre = (snap(0, 10, {"virtio2-input.0": 10, "virtio2-output.0": 5}),
           snap(1, 11, {"virtio2-input.0": 20, "virtio2-output.0": 9}))
    post = (snap(2, 12, {"virtio2-input.0": 21, "virtio2-output.0": 9}),
            snap(3, 13, {"virtio2-input.0": 30, "virtio2-output.0": 9}))
    with pytest.raises(CheckFailed, match=r"stayed silent.*virtio2-output\.0"):
        assert_interrupts(pre, post, PAT)


def test_interrupts_fail_when_counts_reset() -> None:
    pre = (snap(0, 10, {"virtio2-input.0": 10}), snap(1, 11, {"virtio2-input.0": 20}))
    post = (snap(2, 12, {"virtio2-input.0": 3}), snap(3, 13, {"virtio2-input.0": 9}))
    with pytest.raises(CheckFailed, match="went backwards"):
        assert_interrupts(pre, post, PAT)


def test_interrupts_fail_when_nothing_matches() -> None:
    s = snap(0, 1, {"virtio0-config": 1})
    with pytest.raises(CheckFailed, match="no interrupt line"):
        assert_interrupts((s, s), (s, s), PAT)


def test_same_boot_detects_reboot_and_discontinuity() -> None:
    assert_same_boot(snap(100, 50, {}), snap(110, 60, {}))
    with pytest.raises(CheckFailed, match="rebooted"):
        assert_same_boot(snap(100, 50, {}), snap(110, 3, {}, boot="b2"))
    with pytest.raises(CheckFailed, match="not continuous"):
        assert_same_boot(snap(100, 50, {}), snap(110, 40, {}))


def test_same_boot_bounds_uptime_by_when_each_answer_came() -> None:
    """Seen under load: the answer after the transfer took 2.6 s longer than the one before it, so
    the guest's uptime advanced more than the gap between the commands being sent; bounded by the
    answers' times it is consistent. A real jump beyond them (control) still fails."""
    before = GuestSnapshot(100.0, "b1", 50.0, {}, host_end=100.2)
    after = GuestSnapshot(117.07, "b1", 69.64, {}, host_end=120.0)
    assert_same_boot(before, after)
    with pytest.raises(CheckFailed, match=r"advanced 19\.64s while 16\.87-17\.50s"):
        assert_same_boot(GuestSnapshot(100.0, "b1", 50.0, {}, host_end=100.2),
                         GuestSnapshot(117.07, "b1", 69.64, {}, host_end=117.5))


def test_parse_snapshot_skips_console_noise() -> None:
    text = "junk\r\n1b4e28ba-2fa1-11d2-883f-0016d3cca427\r\n12.34\r\n" + INTERRUPTS
    s = parse_snapshot(5.0, text)
    assert s.boot_id == "1b4e28ba-2fa1-11d2-883f-0016d3cca427" and s.uptime_s == 12.34
    assert s.irq_totals(PAT) == {"27:virtio2-input.0": 448, "28:virtio2-output.0": 467}


def test_probe_stats_gap_loss_and_reorder() -> None:
    probes = [Probe(i, 100 + i * 0.005, 100 + i * 0.005 + 0.001) for i in range(100)]
    for p in probes[40:50]:  # 10 probes lost during a blackout
        p.t_recv = None
    probes[60].t_recv, probes[61].t_recv = probes[61].t_recv, probes[60].t_recv  # reordered pair
    stats = probe_stats(probes, 100, 101, 5.0, grace_s=0.0)
    assert stats.lost == 10 and stats.answered == 90 and stats.reordered == 1
    assert stats.max_gap_ms == pytest.approx(55.0, abs=0.01)


def test_thresholds() -> None:
    r = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed", probe={"max_gap_ms": 80.0, "lost": 3})
    assert_thresholds(r, 100, 5)
    with pytest.raises(CheckFailed, match=r"blackout 80\.0 ms exceeds 50"):
        assert_thresholds(r, 50, None)
    with pytest.raises(CheckFailed, match="3 probes lost"):
        assert_thresholds(r, None, 2)


def test_dmesg_failures() -> None:
    log = "[1.0] ok\n[2.0] NETDEV WATCHDOG: eth0 (igb): transmit queue 0 timed out\n" \
          "[3.0] nvme nvme0: I/O 12 QID 1 timeout, aborting\n" \
          "[4.0] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
    assert len(dmesg_failures(log)) == 3


def test_transfer_numbers_and_overhead_ratio() -> None:
    r = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed",
                       qemu={"downtime": 3, "total-time": 40})
    r.timeline = {"step_start": 10.0, "target_spawned": 10.01, "target_listening": 10.03,
                  "migrate_issued": 10.04, "target_running": 10.09}
    n = r.numbers()
    assert n["wall_ms"] == pytest.approx(50.0) and n["spawn_to_listen_ms"] == pytest.approx(20.0)
    assert r.overhead_ratio == pytest.approx(90 / 60, abs=0.01)


def test_probe_stats_blackout_runs_to_the_window_end_when_answers_stop() -> None:
    probes = [Probe(i, 100 + i * 0.005, 100 + i * 0.005 + 0.001 if i < 20 else None) for i in range(200)]
    stats = probe_stats(probes, 100, 101, 5.0, grace_s=0.0)
    assert stats.lost == 180 and stats.gap_end is None
    assert stats.max_gap_ms == pytest.approx((199 - 19) * 5 - 1, abs=0.01)


@pytest.mark.parametrize("line", [
    "[ 88.1] igb 0000:00:10.0 eth1: Reset adapter",
    "[ 88.2] igb 0000:00:10.0: Detected Tx Unit Hang",
    "[ 88.3] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down",
    "[ 88.4] e1000e 0000:00:10.0 eth1: NIC Link is Down",
])
def test_dmesg_nic_reset_and_link_down_lines_are_failures(line: str) -> None:
    assert dmesg_failures(f"[ 1.0] ok\n{line}\n") == [line]


def test_dmesg_nic_link_up_and_ordinary_lines_pass() -> None:
    log = ("[ 5.0] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Up 1000 Mbps Full Duplex, Flow Control: RX/TX\n"
           "[ 5.1] igb 0000:00:10.0: Intel(R) Gigabit Ethernet Network Connection\n"
           "[ 5.2] virtio_net virtio0 eth0: renamed from ens3\n"
           "[ 0.004] ..MP-BIOS bug: 8254 timer not connected to IO-APIC\n")
    assert dmesg_failures(log) == []


def test_dmesg_link_down_of_the_harness_peer_setup_is_not_the_transfers() -> None:
    """The harness moves the NIC's peer port into the guest's namespace (its link goes down once):
    link-down lines up to link_settled_s are its own; later ones, and resets at any time, fail."""
    log = ("[ 12.5] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down\n"
           "[ 12.6] igb 0000:00:10.0 eth1: Reset adapter\n"
           "[ 40.0] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down\n")
    assert dmesg_failures(log, link_settled_s=15.0) == ["[ 12.6] igb 0000:00:10.0 eth1: Reset adapter",
                                                        "[ 40.0] igb 0000:00:10.0 eth1: igb: eth1 NIC Link is Down"]
    assert len(dmesg_failures(log)) == 3


def test_link_command_and_parser() -> None:
    cmd = link_command(("eth0", "eth1"))
    assert cmd.startswith('for c in carrier_changes statistics/rx_missed_errors ')
    assert 'echo "eth1 ${c#statistics/} $(cat /sys/class/net/eth1/$c)"' in cmd
    assert parse_link_counters("eth0 carrier_changes 2\neth0 rx_missed_errors 7\neth1 carrier_changes 5\n"
                               "noise\neth2 rx_dropped \n") == {
        "eth0": {"carrier_changes": 2, "rx_missed_errors": 7}, "eth1": {"carrier_changes": 5}}
    with pytest.raises(ValueError, match="not interface names"):
        link_command(("eth0; reboot",))


def test_drops_grown_name_what_grew_and_lost_probes_say_where() -> None:
    before = {"eth0": {"carrier_changes": 1, "rx_missed_errors": 3, "rx_dropped": 0}, "eth1": {"rx_dropped": 0}}
    after = {"eth0": {"carrier_changes": 1, "rx_missed_errors": 25, "rx_dropped": 0}, "eth1": {"rx_dropped": 0}}
    assert checks.drops_grown(before, after, "guest") == {"guest eth0": {"rx_missed_errors": 22}}
    assert checks.carrier(after) == {"eth0": 1}
    result = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
    result.probe = {"lost": 22, "max_gap_ms": 900.0, "lost_before_stop": 0, "lost_in_downtime": 0,
                    "lost_after_resume": 22}
    result.link_drops = checks.drops_grown(before, after, "guest")
    with pytest.raises(checks.CheckFailed, match=r"22 probes lost \(0 sent before the source stopped, 0 in the "
                       r"downtime, 22 after the resume\), more than 0.*counted drops across it: guest eth0 "
                       r"rx_missed_errors \+22"):
        checks.assert_thresholds(result, None, 0)
    result.link_drops = {}
    with pytest.raises(checks.CheckFailed, match="no interface of the guest or the probing host counted a drop"):
        checks.assert_thresholds(result, None, 0)
    result.probe["probe_capture_drops"] = 40
    with pytest.raises(checks.CheckFailed, match="capture socket dropped 40 frames"):
        checks.assert_thresholds(result, None, 0)


def test_link_flap_check_passes_unchanged_carrier_and_records_zero() -> None:
    r = TransferResult(2, ProcessRef("g1"), ProcessRef("g2"), status="completed")
    assert assert_no_link_flap({"eth0": 2, "eth1": 4}, {"eth0": 2, "eth1": 4}, r) == 0
    assert r.carrier_changes == 0 and r.numbers()["carrier_changes"] == 0


def test_link_flap_check_fails_naming_the_interface_and_counts() -> None:
    r = TransferResult(2, ProcessRef("g1"), ProcessRef("g2"), status="completed")
    with pytest.raises(CheckFailed, match=r"transfer 2: the guest NIC link went down across the transfer \(a reset "
                                          r"or a flap\): eth1 carrier_changes 4 -> 6 \(logs: art\)"):
        assert_no_link_flap({"eth0": 2, "eth1": 4}, {"eth0": 2, "eth1": 6}, r, "art")
    assert r.numbers()["carrier_changes"] == 2, "recorded before it fails"
    with pytest.raises(CheckFailed, match=r"eth1 carrier_changes 4 -> gone"):
        assert_no_link_flap({"eth1": 4}, {})


def test_transfer_numbers_are_recorded_once_and_updated_by_later_checks() -> None:
    from types import SimpleNamespace

    from pytest_cpr.fixtures import _record_transfer

    node = SimpleNamespace(user_properties=[("cpr_artifacts", "/a")])
    record = _record_transfer(node)  # type: ignore[arg-type]
    r = TransferResult(1, ProcessRef("g0"), ProcessRef("g1"), status="completed")
    record(r)
    r.carrier_changes = 0
    record(r)
    keys = [k for k, _ in node.user_properties]
    assert len(keys) == len(set(keys)) and keys[0] == "cpr_artifacts"
    assert dict(node.user_properties)["cpr_t1_carrier_changes"] == 0


def test_blackout_window_opens_at_the_last_answer_before_the_step() -> None:
    """A guest that stops 2 ms after the step starts (cpr-exec, cpr-reboot: before the next probe) and
    comes back 360 ms later, answering the queued probes at once: the blackout is the whole silence."""
    from pytest_cpr.net.traffic import Probe, probe_stats
    from pytest_cpr.probing import _window_start

    step = 100.0
    probes = [Probe(i, step - 0.048 + i * 0.005) for i in range(100)]
    for p in probes:  # answered 1 ms after sending, except while the guest is stopped: queued, answered at resume
        p.t_recv = p.t_send + 0.001 if not step + 0.002 <= p.t_send + 0.001 < step + 0.362 else step + 0.362
    assert probe_stats(probes, step, step + 0.4, 5.0, 0.0).max_gap_ms < 10, "the old window saw no blackout"
    start = _window_start(probes, step)
    assert start < step
    assert probe_stats(probes, start, step + 0.4, 5.0, 0.0).max_gap_ms == pytest.approx(360, abs=6)
