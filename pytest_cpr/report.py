"""Run-level reporting: the CPR summary table in the terminal and as Markdown for GitHub."""

from __future__ import annotations

import base64
import json
import os
from html import escape
from pathlib import Path
from typing import Any

import pytest

from pytest_cpr.kinds import Mode, values

CLEANED_KEY = pytest.StashKey[list[str]]()

# (header, row key, numeric); optional columns are shown only when some row has a value.
COLUMNS = (("test", "test", False), ("#", "index", True), ("mode", "mode", False),
           ("QEMU source -> target", "path", False),
           ("status", "status", False), ("QEMU downtime ms", "qemu_downtime_ms", True),
           ("QEMU total ms", "qemu_total_ms", True), ("VM paused ms", "vm_pause_ms", True),
           ("guest blackout ms", "blackout_ms", True),
           ("lost probes", "lost_probes", True), ("DMA stall ms", "dma_stall_ms", True),
           ("result", "outcome", False))
OPTIONAL = ("dma_stall_ms", "vm_pause_ms")


def report_rows(rep: pytest.TestReport) -> list[dict[str, Any]]:
    """One row per transfer of a test, from the cpr_transfers_json property of its teardown report."""
    rows: list[dict[str, Any]] = []
    for name, value in rep.user_properties:
        if name != "cpr_transfers_json":
            continue
        for row in json.loads(str(value)):
            row["path"] = f"{row['source']} -> {row['target']}"
            rows.append(row)
    return rows


def collect_rows(terminalreporter: Any) -> list[dict[str, Any]]:
    """One row per transfer of the run, from the cpr_transfers_json property of each test."""
    rows: list[dict[str, Any]] = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if isinstance(rep, pytest.TestReport) and rep.when == "teardown":
                rows += report_rows(rep)
    outcomes = {}
    for key in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(key, []):
            if isinstance(rep, pytest.TestReport) and (rep.when == "call" or rep.failed):
                outcomes[rep.nodeid] = key if rep.when == "call" else "error"
    for row in rows:
        row["outcome"] = outcomes.get(row["test"], "?")
    return sorted(rows, key=lambda r: (r["test"], r.get("vm", ""), r["index"]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _test_name(row: dict[str, Any]) -> str:
    name = str(row["test"]).split("::")[-1]
    vm = row.get("vm")
    return f"{name} ({vm})" if vm and vm != "vm0" else name


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    return [c for c in COLUMNS if c[1] not in OPTIONAL or any(r.get(c[1]) is not None for r in rows)]


def table(rows: list[dict[str, Any]], markdown: bool = False, html: bool = False,
          leave_out: tuple[str, ...] = ()) -> str:
    """The summary table: aligned plain text for the terminal, GitHub Markdown, or an HTML table;
    `leave_out`: row keys of columns not shown (one test's table needs no test name nor outcome)."""
    columns = [c for c in _columns(rows) if c[1] not in leave_out]
    header = [c[0] for c in columns]
    body = [[_test_name(r) if key == "test" else _cell(r.get(key)) for _, key, _ in columns] for r in rows]
    if html:
        def tr(cells: list[str], tag: str) -> str:
            return "<tr>" + "".join(f'<{tag} style="padding:2px 8px">{escape(c)}</{tag}>' for c in cells) + "</tr>"

        return ('<table class="cpr-transfers">' + tr(header, "th") + "".join(tr(row, "td") for row in body)
                + "</table>")
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if numeric else "---" for _, _, numeric in columns) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    aligns = [">" if numeric else "<" for _, _, numeric in columns]
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(aligns, widths, strict=True))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row).rstrip() for row in body)])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def overview(rows: list[dict[str, Any]]) -> str:
    """One line: how many transfers, and median / max of QEMU downtime and guest blackout."""
    done = [r for r in rows if r.get("status") == "completed"]
    parts = [f"{len(rows)} transfer(s), {len(done)} completed"]
    for label, key in (("QEMU downtime", "qemu_downtime_ms"), ("guest blackout", "blackout_ms")):
        values = [float(r[key]) for r in done if r.get(key) is not None]
        if values:
            parts.append(f"{label} median {_median(values):.1f} ms, max {max(values):.1f} ms")
    lost = [int(r["lost_probes"]) for r in done if r.get("lost_probes") is not None]
    if lost:
        parts.append(f"probes lost {sum(lost)}")
    return "; ".join(parts)


def modes_of(rows: list[dict[str, Any]]) -> list[str]:
    """The CPR modes of the rows, in the order of kinds.Mode (unknown ones after, as seen)."""
    seen = list(dict.fromkeys(str(r.get("mode") or Mode.CPR_TRANSFER) for r in rows))
    known = [m for m in values(Mode) if m in seen]
    return known + [m for m in seen if m not in known]


def heading(rows: list[dict[str, Any]]) -> str:
    """'cpr-transfer summary', or for a run of several modes 'cpr-transfer + cpr-reboot summary'."""
    return " + ".join(modes_of(rows)) + " summary"


def overviews(rows: list[dict[str, Any]]) -> list[str]:
    """The overview line; with several modes one per mode (their numbers differ by design)."""
    modes = modes_of(rows)
    if len(modes) == 1:
        return [overview(rows)]
    return [f"{mode}: " + overview([r for r in rows if str(r.get("mode") or Mode.CPR_TRANSFER) == mode])
            for mode in modes]


def terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    cleaned = config.stash.get(CLEANED_KEY, [])
    if cleaned:
        terminalreporter.write_sep("-", "pytest-cpr: cleaned up after an earlier run")
        for line in cleaned:
            terminalreporter.write_line(line)
    rows = collect_rows(terminalreporter)
    if not rows:
        return
    terminalreporter.write_sep("=", heading(rows))
    terminalreporter.write_line(table(rows))
    for line in overviews(rows):
        terminalreporter.write_line(line)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write(markdown_summary(rows, html_report_path(config)))


NOTE = ("Times in ms; guest blackout = longest interval between two answered probes (host side, ICMP every "
        "few ms); QEMU downtime/total from query-migrate on the source (cpr-exec: from its MIGRATION/STOP "
        "event times); VM paused = the old QEMU's STOP to the new QEMU's RESUME.")


def html_report_path(config: pytest.Config) -> str | None:
    """The pytest-html report this run writes (--html), or None."""
    return getattr(getattr(config, "option", None), "htmlpath", None)


def markdown_summary(rows: list[dict[str, Any]], html_report: str | None = None) -> str:
    """The section appended to $GITHUB_STEP_SUMMARY; `html_report`: the pytest-html report of the run
    (each test's timeline plots and numbers), named with the run's page where it is uploaded."""
    where = ""
    if html_report:
        run = "/".join(os.environ.get(k, "") for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY"))
        page = f" ([this run's artifacts]({run}/actions/runs/{os.environ['GITHUB_RUN_ID']}))" \
            if os.environ.get("GITHUB_RUN_ID") and os.environ.get("GITHUB_REPOSITORY") else ""
        where = (f"Each test's transfer timelines (plots) and numbers: `{os.path.basename(html_report)}`, "
                 f"the pytest-html report, in the uploaded artifact{page}.\n\n")
    return (f"## {heading(rows)}\n\n" + "\n\n".join(overviews(rows)) + "\n\n" + table(rows, markdown=True)
            + "\n\n" + NOTE + "\n\n" + where)


def html_summary(terminalreporter: Any) -> list[str]:
    """The run's summary table for the pytest-html report's summary section (empty: no transfer)."""
    rows = collect_rows(terminalreporter)
    if not rows:
        return []
    return [f"<h2>{escape(heading(rows))}</h2>" + "".join(f"<p>{escape(line)}</p>" for line in overviews(rows)),
            table(rows, html=True),
            f"<p>{escape(NOTE)}</p>"]


def html_extras(rep: pytest.TestReport) -> list[dict[str, Any]]:
    """pytest-html extras of a test's teardown report: its transfers' numbers (a table) and each
    transfer's timeline plot (PNG, embedded). Empty for a test without transfers."""
    from pytest_html import extras  # only called when pytest-html is loaded

    rows = report_rows(rep)
    if not rows:
        return []
    found: list[dict[str, Any]] = [extras.html("<h4>cpr transfers</h4>"
                                               + table(rows, html=True, leave_out=("test", "outcome")))]
    for row in rows:
        png = Path(str(row.get("plot_png") or ""))
        if png.suffix == ".png" and png.is_file():
            label = f"{row.get('vm', 'vm0')} transfer {row['index']}: timeline"
            found.append(extras.png(base64.b64encode(png.read_bytes()).decode(), name=label))
    return found
