"""What the guest saw during one transfer, as files: the probe series (JSON), the timeline (JSON)
and a picture (PNG + SVG): probe round-trip time over time, lost probes, the blackout, and the
transfer phases as labelled vertical lines.

matplotlib (extra `plot`) is imported only when a picture is drawn, with the Agg backend; without
it the picture is skipped and the JSON files are still written. Re-draw from saved files with
`python -m pytest_cpr.plot ARTIFACTS_DIR`.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pytest_cpr.kinds import Phase

# Phases in the order a successful transfer passes them (source_exited is not ordered against the
# last three: the old QEMU is retired while the guest already runs in the new one).
PHASES = (Phase.STEP_START, Phase.TARGET_SPAWNED, Phase.TARGET_LISTENING, Phase.MIGRATE_ISSUED,
          Phase.SOURCE_STOPPED, Phase.MIGRATION_COMPLETED, Phase.TARGET_RUNNING, Phase.FIRST_PROBE_AFTER,
          Phase.SSH_ANSWERED)
PHASE_LABELS: dict[str, str] = {
    Phase.STEP_START: "step start", Phase.TARGET_SPAWNED: "target spawned",
    Phase.TARGET_LISTENING: "target listening", Phase.MIGRATE_ISSUED: "migrate issued",
    Phase.SOURCE_STOPPED: "source stopped", Phase.MIGRATION_COMPLETED: "migration completed",
    Phase.MIGRATION_FAILED: "migration failed", Phase.MIGRATION_CANCELLED: "migration cancelled",
    Phase.TARGET_RUNNING: "target running", Phase.FIRST_PROBE_AFTER: "first probe answered",
    Phase.SSH_ANSWERED: "SSH answered", Phase.SOURCE_EXITED: "source exited",
    Phase.GUEST_SUSPENDED: "guest suspended", Phase.GUEST_WOKEN: "guest woken",
}
STALL_FACTOR = 3  # a send interval this many times the probe interval is a harness stall
CONTEXT_BEFORE_S = 0.25  # probes kept before the transfer step starts, to show the normal RTT
MISSING_MATPLOTLIB = "timeline plot skipped: matplotlib not installed (pip install 'pytest-cpr[plot]')"


class _Probe(Protocol):
    seq: int
    t_send: float
    t_recv: float | None


@dataclass
class ProbeSeries:
    """Every probe sent in a window: (seq, host send time, host answer time or None)."""

    interval_ms: float
    rows: list[tuple[int, float, float | None]]

    @classmethod
    def of(cls, probes: Iterable[_Probe], t_from: float, t_to: float, interval_ms: float) -> ProbeSeries:
        return cls(interval_ms, [(p.seq, p.t_send, p.t_recv) for p in probes if t_from <= p.t_send <= t_to])

    def save(self, path: Path) -> Path:
        data = {"clock": "host wall time, seconds (time.time())", "interval_ms": self.interval_ms,
                "columns": ["seq", "t_send", "t_recv"], "rows": [list(r) for r in self.rows]}
        path.write_text(json.dumps(data, separators=(",", ":")))
        return path

    def send_gaps(self, min_ms: float) -> list[tuple[float, float]]:
        """Intervals of at least `min_ms` in which no probe left (the sender was not scheduled, or could
        not send): the guest cannot be seen there, so a blackout overlapping one is overstated."""
        sends = sorted(t for _, t, _ in self.rows)
        return [(a, b) for a, b in itertools.pairwise(sends) if (b - a) * 1000 >= min_ms]

    def send_stall(self, gap_start: float | None, gap_end: float | None) -> dict[str, Any]:
        """Probe-stat extras: the sender's longest send gap, its send jitter (99th percentile of
        |send interval - probe interval|) and whether a stall overlaps the blackout."""
        sends = sorted(t for _, t, _ in self.rows)
        gaps = [(b - a) * 1000 for a, b in itertools.pairwise(sends)]
        jitter = sorted(abs(g - self.interval_ms) for g in gaps)
        stalls = self.send_gaps(STALL_FACTOR * self.interval_ms)
        overlapping = gap_start is not None and any(
            _overlaps(s, (gap_start, gap_end if gap_end is not None else s[1])) for s in stalls)
        return {"max_send_gap_ms": round(max(gaps, default=0.0), 3),
                "send_jitter_p99_ms": round(percentile(jitter, 99), 3) if jitter else None,
                "blackout_overlaps_send_stall": overlapping}

    @classmethod
    def load(cls, path: Path) -> ProbeSeries:
        data = json.loads(path.read_text())
        return cls(float(data["interval_ms"]), [(int(s), float(a), None if b is None else float(b))
                                                for s, a, b in data["rows"]])


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * pct / 100) - 1))]


def ordered_phases(timeline: dict[str, float]) -> list[tuple[str, float]]:
    """The phases of a timeline, earliest first."""
    return sorted(timeline.items(), key=lambda kv: kv[1])


def timeline_document(result: dict[str, Any]) -> dict[str, Any]:
    """The timeline JSON of one transfer (from TransferResult.as_dict()): phases in time order with
    absolute host times and milliseconds since the transfer step started, plus every number."""
    timeline: dict[str, float] = result["timeline"]
    t0 = timeline.get(Phase.STEP_START, min(timeline.values(), default=0.0))
    return {
        "index": result["index"], "mode": result.get("mode"), "source": result["source"],
        "target": result["target"], "status": result["status"], "error": result.get("error"),
        "clock": "host wall time, seconds (time.time()); QMP event timestamps use the same clock",
        "t0": t0,
        "phases": [{"phase": name, "t": t, "ms": round((t - t0) * 1000, 3)}
                   for name, t in ordered_phases(timeline)],
        "numbers": result.get("numbers", {}), "qemu": result.get("qemu", {}), "probe": result.get("probe"),
        "notes": result.get("notes", []), "files": result.get("files", {}),
    }


def _save_figure(draw: Any, base: Path) -> list[Path]:
    """`draw(pyplot)` returns a figure, saved as `base`.png and `base`.svg; [] when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    from matplotlib import pyplot

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG keeps its text as text
        fig = draw(pyplot)
        try:
            paths = [base.with_suffix(".png"), base.with_suffix(".svg")]
            fig.savefig(paths[0], dpi=110)
            fig.savefig(paths[1])
            return paths
        finally:
            pyplot.close(fig)


def plot_transfer(result: dict[str, Any], series: ProbeSeries, base: Path) -> list[Path]:
    """Draw `base`.png and `base`.svg; returns them, or [] when matplotlib is missing."""
    return _save_figure(_Figure(result, series).draw, base)


RAM_SCALING_SERIES = (("blackout_ms", "cpr-transfer guest blackout"),
                      ("qemu_downtime_ms", "cpr-transfer QEMU downtime"), ("total_ms", "cpr-transfer QEMU total"),
                      ("normal_total_ms", "normal migration total"),
                      ("normal_blackout_ms", "normal migration guest blackout"))


def plot_ram_scaling(rows: Sequence[dict[str, Any]], base: Path, title: str) -> list[Path]:
    """The benchmark's cost against guest size (its `ram_scaling` rows), log-log: one line per figure,
    a missing figure (null: did not fit) left out of its line."""
    def draw(pyplot: Any) -> Any:
        fig, ax = pyplot.subplots(figsize=(7, 4.5))
        for key, label in RAM_SCALING_SERIES:
            sizes = [r["memory_mib"] for r in rows if r.get(key)]
            if sizes:
                ax.plot(sizes, [r[key] for r in rows if r.get(key)], marker="o", label=label,
                        linestyle="--" if "normal" in key else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["memory_mib"] for r in rows], [f"{r['memory_mib'] // 1024} GiB" if r["memory_mib"] >= 1024
                                                         else f"{r['memory_mib']} MiB" for r in rows])
        ax.set_xlabel("guest RAM (75% dirtied before the transfers)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    return _save_figure(draw, base)


class _Figure:
    """The picture: RTT panel on top, phase strip below, sharing a time axis in ms since step start."""

    def __init__(self, result: dict[str, Any], series: ProbeSeries) -> None:
        self.result = result
        self.series = series
        self.timeline: dict[str, float] = result["timeline"]
        self.t0 = float(self.timeline.get(Phase.STEP_START, series.rows[0][1] if series.rows else 0.0))
        self.view = self._view()

    def ms(self, t: float) -> float:
        return (t - self.t0) * 1000

    def _view(self) -> tuple[float, float]:
        """Window shown: a little before the step, to well after the guest answered again (SSH, which
        comes hundreds of ms later, is listed at the edge rather than squeezing the gap)."""
        probe = self.result.get("probe") or {}
        ends = [self.ms(self.timeline[k]) for k in (Phase.FIRST_PROBE_AFTER, Phase.TARGET_RUNNING,
                                                    Phase.MIGRATION_FAILED, Phase.MIGRATION_CANCELLED)
                if k in self.timeline]
        ends += [self.ms(probe[k]) for k in ("gap_start", "gap_end") if probe.get(k) is not None]
        end_phase = max(ends, default=None)  # the blackout is always in view, even after the resume
        if end_phase is None:
            end_phase = max((self.ms(t) for t in self.timeline.values()), default=100.0)
        left = -min(60.0, CONTEXT_BEFORE_S * 1000)
        right = end_phase + max(80.0, 0.4 * (end_phase - left))
        return left, right

    def draw(self, pyplot: Any) -> Any:
        fig, (top, strip) = pyplot.subplots(2, 1, sharex=True, figsize=(11, 6.6),
                                            gridspec_kw={"height_ratios": [3, 1.35], "hspace": 0.06})
        self._rtt(top)
        self._phase_lines(top, labels=False)
        self._phase_lines(strip, labels=True)
        top.set_xlim(*self.view)
        top.set_title(self._title(), fontsize=10, loc="left", pad=34)
        strip.set_xlabel("ms since the transfer step started (host wall clock)" + self._later())
        fig.subplots_adjust(left=0.07, right=0.985, top=0.84, bottom=0.1)
        return fig

    def _title(self) -> str:
        r = self.result
        numbers = r.get("numbers", {})
        probe = r.get("probe") or {}

        def fmt(value: Any, unit: str = " ms") -> str:
            if value is None:
                return "-"
            return f"{value:.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"

        warning = "   [blackout overlaps a probe send stall: overstated]" \
            if probe.get("blackout_overlaps_send_stall") else ""
        mode = r.get("mode", "cpr-transfer")
        return (f"{mode} {r['index']}: {r['source']} -> {r['target']} ({r['status']}), "
                f"probe every {self.series.interval_ms:g} ms{warning}\n"
                f"guest blackout {fmt(numbers.get('blackout_ms'))}   QEMU downtime "
                f"{fmt(numbers.get('qemu_downtime_ms'))}   QEMU total {fmt(numbers.get('qemu_total_ms'))}   "
                f"lost probes {fmt(probe.get('lost'), '')}/{fmt(probe.get('sent'), '')}{_lost_phases(probe)}")

    def _rtt(self, ax: Any) -> None:
        left, right = self.view
        answered = [(self.ms(s), (r - s) * 1000) for _, s, r in self.series.rows
                    if r is not None and left <= self.ms(s) <= right]
        lost = [self.ms(s) for _, s, r in self.series.rows if r is None and left <= self.ms(s) <= right]
        ymax = max((y for _, y in answered), default=1.0) * 1.18 + 0.5
        if answered:
            xs, ys = zip(*answered, strict=True)
            ax.plot(xs, ys, color="#1f5fa8", linewidth=0.8, alpha=0.55)
            ax.scatter(xs, ys, s=9, color="#1f5fa8", zorder=3, label="probe answered (x: sent, y: RTT)")
        if lost:
            ax.scatter(lost, [ymax * 0.97] * len(lost), marker="x", s=30, color="#c0392b", zorder=4,
                       label=f"probe never answered ({len(lost)})")
        self._gaps(ax, ymax)
        ax.set_ylim(0, ymax)
        ax.set_ylabel("probe RTT (ms)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False,
                  borderaxespad=0.2, handletextpad=0.3, columnspacing=1.2)

    def _gaps(self, ax: Any, ymax: float) -> None:
        """The blackout (largest interval without answers) in red; other long silences lighter."""
        probe = self.result.get("probe") or {}
        largest = (probe.get("gap_start"), probe.get("gap_end"))
        floor_ms = max(20.0, 4 * self.series.interval_ms)
        answers = sorted(r for _, _, r in self.series.rows if r is not None)
        other = [(a, b) for a, b in itertools.pairwise(answers)
                 if (b - a) * 1000 >= floor_ms and not _overlaps((a, b), largest)]
        for n, (a, b) in enumerate(other):
            ax.axvspan(self.ms(a), self.ms(b), color="#f5b041", alpha=0.18, zorder=0,
                       label=f"other silence >= {floor_ms:g} ms" if n == 0 else None)
        stall_ms = STALL_FACTOR * self.series.interval_ms
        for n, (a, b) in enumerate(self.series.send_gaps(stall_ms)):
            ax.axvspan(self.ms(a), self.ms(b), ymin=0, ymax=0.06, facecolor="none", edgecolor="#566573",
                       hatch="////", linewidth=0, zorder=1,
                       label=f"no probe sent (>= {stall_ms:g} ms)" if n == 0 else None)
        if largest[0] is not None and largest[1] is not None:
            a, b = self.ms(largest[0]), self.ms(largest[1])
            ax.axvspan(a, b, color="#e74c3c", alpha=0.16, zorder=0, label="blackout: longest silence")
            ax.annotate(f"blackout\n{b - a:.1f} ms", xy=((a + b) / 2, ymax * 0.8), ha="center",
                        fontsize=10, color="#a93226", fontweight="bold")

    def _phase_lines(self, ax: Any, labels: bool) -> None:
        left, right = self.view
        inside = [(n, self.ms(t)) for n, t in ordered_phases(self.timeline) if left <= self.ms(t) <= right]
        for name, x in inside:
            ax.axvline(x, color=_phase_colour(name), linewidth=1.1, linestyle="--", alpha=0.85)
        if not labels:
            return
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        levels = _label_levels([x for _, x in inside], [_label(n, x) for n, x in inside], right - left)
        for (name, x), level in zip(inside, levels, strict=True):
            ax.text(x, 0.86 - level * 0.2, " " + _label(name, x), fontsize=8, va="center", ha="left",
                    color=_phase_colour(name), bbox={"boxstyle": "square,pad=0.1", "fc": "white",
                                                     "ec": "none", "alpha": 0.85})

    def _later(self) -> str:
        """Phases right of the view (SSH answers hundreds of ms after the guest is back)."""
        right = self.view[1]
        later = [_label(n, self.ms(t)) for n, t in ordered_phases(self.timeline) if self.ms(t) > right]
        return ("      later: " + ", ".join(later) + " ms") if later else ""


def _lost_phases(probe: dict[str, Any]) -> str:
    """' (1 before stop, 2 in downtime, 0 after)' (the resume) when the probe stats attribute the losses."""
    if "lost_in_downtime" not in probe:
        return ""
    return (f" ({probe['lost_before_stop']} before stop, {probe['lost_in_downtime']} in downtime, "
            f"{probe['lost_after_resume']} after)")


def _overlaps(span: tuple[float, float], other: tuple[float | None, float | None]) -> bool:
    return other[0] is not None and other[1] is not None and span[0] < other[1] and other[0] < span[1]


def _label(name: str, x: float) -> str:
    return f"{PHASE_LABELS.get(name, name)} {x:+.1f}"


def _phase_colour(name: str) -> str:
    if name in (Phase.SOURCE_STOPPED, Phase.MIGRATION_COMPLETED, Phase.TARGET_RUNNING):
        return "#8e44ad"  # the pause itself, as QEMU sees it
    if name.startswith("migration_") or name == Phase.SOURCE_EXITED:
        return "#7f8c8d"
    if name in (Phase.FIRST_PROBE_AFTER, Phase.SSH_ANSWERED):
        return "#1e8449"  # the guest, as the network sees it
    return "#d35400"  # harness steps


def _label_levels(xs: Sequence[float], texts: Sequence[str], span: float, levels: int = 5) -> list[int]:
    """Stack labels that would overlap: each goes to the first row whose last label ended left of it."""
    char_width = span / 150  # ~150 characters of 8 pt text across the 11 in figure
    ends = [float("-inf")] * levels
    out = []
    for x, text in zip(xs, texts, strict=True):
        row = next((i for i, end in enumerate(ends) if end < x), min(range(levels), key=lambda i: ends[i]))
        ends[row] = x + (len(text) + 2) * char_width
        out.append(row)
    return out


def redraw(directory: Path) -> list[Path]:
    """Re-draw every transfer of an artifacts folder from its transfers.json and probe-t<i>.json."""
    drawn: list[Path] = []
    for result in json.loads((directory / "transfers.json").read_text()):
        series_path = directory / f"probe-t{result['index']}.json"
        if series_path.exists():
            drawn += plot_transfer(result, ProbeSeries.load(series_path),
                                   directory / f"timeline-t{result['index']}")
    return drawn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pytest_cpr.plot ARTIFACTS_DIR", file=sys.stderr)
        return 2
    paths = redraw(Path(args[0]))
    print("\n".join(str(p) for p in paths) or "nothing drawn (no probe-t<i>.json, or matplotlib missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
