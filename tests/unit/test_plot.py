"""The timeline picture and JSON of one transfer, from a recorded TransferResult and probe series."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_cpr import plot
from pytest_cpr.cpr import ProcessRef, TransferResult

T0 = 1_795_299_958.0
# A transfer as recorded on this machine (QEMU 10.0.2, TCG), ms after the step started.
PHASES_MS = {"step_start": 0.0, "target_spawned": 1.8, "target_listening": 30.1, "migrate_issued": 33.4,
             "source_stopped": 75.4, "migration_completed": 79.7, "target_running": 140.7,
             "first_probe_after": 174.7, "source_exited": 183.0, "ssh_answered": 609.0}
PAUSE_MS = (72.0, 174.7)  # nothing answered in between; probes sent then are answered at its end
LOST_SEQ = {70, 71}


class _P:
    def __init__(self, seq: int, t_send: float, t_recv: float | None) -> None:
        self.seq, self.t_send, self.t_recv = seq, t_send, t_recv


def recorded_probes() -> list[_P]:
    probes = []
    for seq in range(160):
        sent_ms = -250.0 + seq * 5.0
        if seq in LOST_SEQ:
            recv_ms = None
        elif PAUSE_MS[0] <= sent_ms + 2.0 < PAUSE_MS[1]:
            recv_ms = PAUSE_MS[1] + (seq % 3) * 0.2
        else:
            recv_ms = sent_ms + 2.0 + (seq % 5) * 0.3
        probes.append(_P(seq, T0 + sent_ms / 1000, None if recv_ms is None else T0 + recv_ms / 1000))
    return probes


def recorded_result() -> TransferResult:
    result = TransferResult(1, ProcessRef("g0", "10.0.2"), ProcessRef("g1", "10.0.2"), status="completed",
                            timeline={k: T0 + v / 1000 for k, v in PHASES_MS.items()},
                            qemu={"status": "completed", "downtime": 4, "total-time": 45, "setup-time": 1})
    result.probe = {"sent": 80, "answered": 78, "lost": 2, "reordered": 0, "max_gap_ms": 102.7,
                    "gap_start": T0 + 0.072, "gap_end": T0 + 0.1747, "rtt_median_ms": 2.6, "interval_ms": 5.0}
    return result


def test_probe_series_keeps_the_window_and_round_trips(tmp_path: Path) -> None:
    series = plot.ProbeSeries.of(recorded_probes(), T0 - 0.1, T0 + 0.2, 5.0)
    assert [r[0] for r in series.rows] == list(range(30, 91))
    assert all(r[2] is None for r in series.rows if r[0] in LOST_SEQ)
    loaded = plot.ProbeSeries.load(series.save(tmp_path / "probe-t1.json"))
    assert loaded == series


def test_timeline_document_lists_phases_in_time_order() -> None:
    doc = plot.timeline_document(recorded_result().as_dict())
    assert [p["phase"] for p in doc["phases"]] == list(PHASES_MS)
    assert [p["ms"] for p in doc["phases"]] == pytest.approx(list(PHASES_MS.values()), abs=1e-3)
    assert doc["numbers"]["blackout_ms"] == 102.7 and doc["numbers"]["qemu_downtime_ms"] == 4
    assert doc["mode"] == doc["numbers"]["mode"] == "cpr-transfer"
    json.dumps(doc)


def test_plot_writes_png_and_svg_with_every_phase_and_the_blackout(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    series = plot.ProbeSeries.of(recorded_probes(), T0 - 0.25, T0 + 0.7, 5.0)
    paths = plot.plot_transfer(recorded_result().as_dict(), series, tmp_path / "timeline-t1")
    png, svg = tmp_path / "timeline-t1.png", tmp_path / "timeline-t1.svg"
    assert paths == [png, svg]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = svg.read_text()
    assert svg.stat().st_size > 20_000
    for label in ("cpr-transfer 1:", "target listening", "migrate issued", "source stopped", "target running",
                  "first probe answered", "SSH answered", "blackout", "102.7 ms", "probe never answered (2)"):
        assert label in text, f"{label!r} missing from the picture"


def test_plot_without_matplotlib_returns_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    series = plot.ProbeSeries.of(recorded_probes(), T0 - 0.25, T0 + 0.7, 5.0)
    assert plot.plot_transfer(recorded_result().as_dict(), series, tmp_path / "t") == []
    assert list(tmp_path.iterdir()) == []


def test_redraw_from_saved_artifacts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "transfers.json").write_text(json.dumps([recorded_result().as_dict()]))
    plot.ProbeSeries.of(recorded_probes(), T0 - 0.25, T0 + 0.7, 5.0).save(tmp_path / "probe-t1.json")
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "timeline-t1.png").stat().st_size > 20_000


def test_label_levels_stack_close_phases() -> None:
    levels = plot._label_levels([0.0, 1.0, 2.0, 300.0], ["a" * 20] * 4, span=600.0)
    assert levels[:3] == [0, 1, 2] and levels[3] == 0


def test_send_stall_flags_a_blackout_the_harness_caused() -> None:
    """A 60 ms hole in the sends (sender thread not scheduled) inside the largest answer gap."""
    rows: list[tuple[int, float, float | None]] = []
    for seq in range(40):
        sent = T0 + seq * 0.005 + (0.060 if seq >= 20 else 0.0)
        rows.append((seq, sent, sent + 0.001))
    series = plot.ProbeSeries(5.0, rows)
    assert series.send_gaps(15.0) == [(rows[19][1], rows[20][1])]
    stall = series.send_stall(rows[19][2], rows[20][2])
    assert stall == {"max_send_gap_ms": pytest.approx(65.0, abs=0.01), "blackout_overlaps_send_stall": True,
                     "send_jitter_p99_ms": pytest.approx(60.0, abs=0.01)}
    steady = plot.ProbeSeries(5.0, rows[:20]).send_stall(rows[5][2], rows[6][2])
    assert steady["blackout_overlaps_send_stall"] is False
    assert steady["send_jitter_p99_ms"] == pytest.approx(0.0, abs=0.001)


def test_send_jitter_p99_is_the_99th_percentile_of_the_interval_error() -> None:
    """200 sends every 1 ms, two of them 0.4 ms late: p99 of |interval - 1 ms| (nearest rank of 199
    intervals: the 198th smallest) is the 0.4 ms error, and p50 would be 0."""
    sends = [T0 + i * 0.001 + (0.0004 if i in (50, 150) else 0.0) for i in range(200)]
    series = plot.ProbeSeries(1.0, [(i, t, t + 0.0002) for i, t in enumerate(sends)])
    assert series.send_stall(None, None)["send_jitter_p99_ms"] == pytest.approx(0.4, abs=0.001)
    assert plot.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0 and plot.percentile([5.0], 99) == 5.0


def test_ram_scaling_plot_draws_every_size_and_leaves_out_a_null_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"memory_mib": m, "blackout_ms": 40.0, "qemu_downtime_ms": 3.0, "total_ms": 60.0,
             "normal_total_ms": None if m == 16384 else m * 5.0, "normal_blackout_ms": None}
            for m in (512, 2048, 16384)]
    paths = plot.plot_ram_scaling(rows, tmp_path / "ram-scaling", "test")
    assert [p.name for p in paths] == ["ram-scaling.png", "ram-scaling.svg"]
    svg = paths[1].read_text()
    assert "16 GiB" in svg and "normal migration total" in svg and "normal migration guest blackout" not in svg
