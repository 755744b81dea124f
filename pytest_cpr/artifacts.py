"""The files a VM's transfers leave in its artifacts folder: transfers.json (every transfer so far),
and per transfer the probe series, the timeline and its picture."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_cpr import plot
from pytest_cpr.cpr import TransferResult
from pytest_cpr.kinds import Phase
from pytest_cpr.observers import ProbeSeriesSource


class ArtifactWriter:
    """Writes a VM's transfer files into `directory`; `plots`: draw timeline pictures (matplotlib)."""

    def __init__(self, directory: Path, plots: bool = True) -> None:
        self.directory, self.plots = directory, plots

    def write_transfers(self, results: Sequence[TransferResult]) -> None:
        (self.directory / "transfers.json").write_text(
            json.dumps([r.as_dict() for r in results], indent=1, default=str))

    def save_measurements(self, result: TransferResult, probes: ProbeSeriesSource | None) -> None:
        """probe-t<i>.json (every probe of the transfer window), timeline-t<i>.json and the
        timeline-t<i>.png/.svg picture; their paths go to result.files."""
        t, i = result.timeline, result.index
        series = None
        if probes is not None and Phase.STEP_START in t:
            series = probes.probe_series(t[Phase.STEP_START] - plot.CONTEXT_BEFORE_S, time.time())
            result.files["probe_series"] = str(series.save(self.directory / f"probe-t{i}.json"))
        if series is not None and self.plots:
            self._draw(result, series)
        path = self.directory / f"timeline-t{i}.json"
        result.files["timeline"] = str(path)
        path.write_text(json.dumps(plot.timeline_document(result.as_dict()), indent=1, default=str))

    def _draw(self, result: TransferResult, series: plot.ProbeSeries) -> None:
        try:
            drawn = plot.plot_transfer(result.as_dict(), series, self.directory / f"timeline-t{result.index}")
        except Exception as exc:  # a picture must not fail a transfer
            result.notes.append(f"timeline plot failed: {exc!r}")
            return
        result.files.update({f"plot_{p.suffix[1:]}": str(p) for p in drawn})
        if not drawn:
            result.notes.append(plot.MISSING_MATPLOTLIB)
