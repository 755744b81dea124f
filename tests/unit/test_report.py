"""The run summary (terminal table, GitHub Markdown) from recorded transfers, as the plugin sees them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_cpr import report
from pytest_cpr.cpr import ProcessRef, TransferResult

NODE = "tests/integration/test_transfer.py::test_three_transfers"


def recorded(index: int, downtime: int, blackout: float, lost: int, status: str = "completed",
             dma_stall_ms: float | None = None) -> TransferResult:
    result = TransferResult(index, ProcessRef(f"g{index - 1}", "10.0.2"), ProcessRef(f"g{index}", "10.1.0"),
                            status=status,
                            timeline={"step_start": 100.0, "target_spawned": 100.002,
                                      "target_listening": 100.030, "migrate_issued": 100.033,
                                      "target_running": 100.073},
                            qemu={"downtime": downtime, "total-time": 36, "setup-time": 1})
    result.probe = {"sent": 40, "answered": 40 - lost, "lost": lost, "reordered": 0, "max_gap_ms": blackout}
    result.dma_stall_ms = dma_stall_ms
    return result


def property_value(results: list[TransferResult], node: str = NODE, vm: str = "vm0") -> str:
    """What fixtures.cpr_vm_factory records as cpr_transfers_json."""
    return json.dumps([{"test": node, "vm": vm, **r.numbers(), "index": r.index, "source": str(r.source),
                        "target": str(r.target)} for r in results])


class FakeTerminal:
    def __init__(self, stats: dict[str, list[Any]]) -> None:
        self.stats = stats
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str) -> None:
        self.lines.append(f"{sep * 3} {title} {sep * 3}")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def terminal(results: list[TransferResult], outcome: str = "passed") -> FakeTerminal:
    teardown = pytest.TestReport(NODE, ("x", 1, "t"), {}, "passed", None, "teardown",
                                 user_properties=[("cpr_transfers_json", property_value(results))])
    call = pytest.TestReport(NODE, ("x", 1, "t"), {}, outcome, None, "call")
    return FakeTerminal({"": [teardown], outcome: [call]})


def test_terminal_table_is_aligned_and_has_the_issue_columns() -> None:
    rows = report.collect_rows(terminal([recorded(1, 4, 99.6, 0), recorded(2, 2, 35.6, 3)], "failed"))
    text = report.table(rows)
    lines = text.splitlines()
    for column in ("test", "mode", "QEMU source -> target", "QEMU downtime ms", "guest blackout ms",
                   "lost probes", "result"):
        assert column in lines[0]
    assert "cpr-transfer" in lines[2], "each row says the transfer's mode"
    assert "DMA stall ms" not in lines[0], "an empty optional column is left out"
    assert len(lines) == 4 and set(lines[1]) <= {"-", " "}
    assert "g0 10.0.2 -> g1 10.1.0" in lines[2] and "99.6" in lines[2] and lines[2].endswith("failed")
    blackout_end = lines[0].index("guest blackout ms") + len("guest blackout ms")
    assert [line[blackout_end - 4:blackout_end] for line in lines[2:]] == ["99.6", "35.6"], "right-aligned"


def test_dma_stall_column_appears_when_measured() -> None:
    rows = report.collect_rows(terminal([recorded(1, 4, 99.6, 0, dma_stall_ms=12.5)]))
    assert "DMA stall ms" in report.table(rows) and "12.5" in report.table(rows)


def test_overview_gives_medians_and_maxima() -> None:
    rows = report.collect_rows(terminal([recorded(1, 4, 99.6, 0), recorded(2, 2, 35.6, 1),
                                         recorded(3, 3, 32.0, 0), recorded(4, 9, 1.0, 0, status="failed")]))
    line = report.overview(rows)
    assert line.startswith("4 transfer(s), 3 completed")
    assert "QEMU downtime median 3.0 ms, max 4.0 ms" in line
    assert "guest blackout median 35.6 ms, max 99.6 ms" in line and "probes lost 1" in line


def test_summary_goes_to_the_terminal_and_to_github_step_summary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    term = terminal([recorded(1, 4, 99.6, 0), recorded(2, 2, 35.6, 0)])
    config = pytest.Config.__new__(pytest.Config)
    object.__setattr__(config, "stash", pytest.Stash())
    report.terminal_summary(term, config)
    assert any("cpr-transfer summary" in line for line in term.lines)
    text = summary.read_text()
    assert text.startswith("# earlier step\n## cpr-transfer summary")
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_lines) == 4
    assert table_lines[1].startswith("|---|---:|---|---|---|---:")
    assert "| test_three_transfers | 1 | cpr-transfer | g0 10.0.2 -> g1 10.1.0 | completed | 4 | 36 | 99.6 | 0 " \
        "| passed |" in table_lines
    assert summary.stat().st_size > 300


def test_no_transfers_no_summary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "s.md"))
    config = pytest.Config.__new__(pytest.Config)
    object.__setattr__(config, "stash", pytest.Stash())
    term = FakeTerminal({})
    report.terminal_summary(term, config)
    assert term.lines == [] and not (tmp_path / "s.md").exists()


def test_html_table_escapes_and_holds_the_same_cells_as_the_terminal_table() -> None:
    rows = report.collect_rows(terminal([recorded(1, 4, 99.6, 0)]))
    rows[0]["test"] = "tests/x.py::test_a[<b>]"
    html = report.table(rows, html=True)
    assert html.startswith('<table class="cpr-transfers"><tr><th style="padding:2px 8px">test</th>')
    assert '>test_a[&lt;b&gt;]</td>' in html and "<b>" not in html
    assert '>99.6</td>' in html and '>4</td>' in html


def test_job_page_names_the_html_report_and_the_run_page(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = report.collect_rows(terminal([recorded(1, 4, 99.6, 0)]))
    assert "report.html" not in report.markdown_summary(rows)
    monkeypatch.setenv("GITHUB_SERVER_URL", "https://github.com")
    monkeypatch.setenv("GITHUB_REPOSITORY", "org/repo")
    monkeypatch.setenv("GITHUB_RUN_ID", "42")
    text = report.markdown_summary(rows, "/out/report.html")
    assert "`report.html`, the pytest-html report" in text
    assert "(https://github.com/org/repo/actions/runs/42)" in text


def test_html_extras_embed_each_plot_and_a_numbers_table(tmp_path: Path) -> None:
    pytest.importorskip("pytest_html")
    png = tmp_path / "timeline-t1.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    rows = json.loads(property_value([recorded(1, 4, 99.6, 0), recorded(2, 2, 35.6, 3)]))
    rows[0]["plot_png"] = str(png)
    rows[1]["plot_png"] = str(tmp_path / "missing.png")  # a plot that was not drawn: no image, no error
    teardown = pytest.TestReport(NODE, ("x", 1, "t"), {}, "passed", None, "teardown",
                                 user_properties=[("cpr_transfers_json", json.dumps(rows))])
    extras = report.html_extras(teardown)
    assert [e["format_type"] for e in extras] == ["html", "image"]
    assert ">99.6</td>" in extras[0]["content"] and ">35.6</td>" in extras[0]["content"]
    assert ">test</th>" not in extras[0]["content"] and ">result</th>" not in extras[0]["content"]
    assert extras[1]["name"] == "vm0 transfer 1: timeline"
    assert extras[1]["content"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    empty = pytest.TestReport(NODE, ("x", 1, "t"), {}, "passed", None, "teardown")
    assert report.html_extras(empty) == []


def test_a_run_of_several_modes_names_them_all_with_an_overview_each() -> None:
    reboot = recorded(2, 40, 400.0, 1)
    reboot.mode = "cpr-reboot"
    rows = report.collect_rows(terminal([reboot, recorded(1, 4, 99.6, 0)]))
    assert report.heading(rows) == "cpr-transfer + cpr-reboot summary"
    lines = report.overviews(rows)
    assert [line.split(":")[0] for line in lines] == ["cpr-transfer", "cpr-reboot"]
    assert "guest blackout median 400.0 ms" in lines[1]
    assert report.markdown_summary(rows).startswith("## cpr-transfer + cpr-reboot summary")
    single = report.collect_rows(terminal([recorded(1, 4, 99.6, 0)]))
    assert report.heading(single) == "cpr-transfer summary" and len(report.overviews(single)) == 1
