"""The CI kit's outputs on a real run: the action's test step (ci/actions/run-cpr-tests/cpr-ci.sh) runs
`python -m pytest tests/integration/test_transfer.py` as a GitHub job would, with GITHUB_STEP_SUMMARY
and GITHUB_OUTPUT pointing at files; then the Markdown table, the JUnit XML and the job-page summary
are checked. One run (a real guest, three transfers, ~15-30 s) serves every test of this module."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CI_SCRIPT = REPO / "ci" / "actions" / "run-cpr-tests" / "cpr-ci.sh"
TRANSFER_TEST = "tests/integration/test_transfer.py"
NAME = "pytest-cpr-ci-summary"

pytestmark = pytest.mark.cpr(mode="cpr-transfer")


@dataclass
class CiRun:
    returncode: int
    log: str
    out: Path
    step_summary: str
    github_output: str


def _step(command: str, tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CI_SCRIPT), command], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> CiRun:
    """One real run of test_transfer.py through the action's test and summary steps."""
    tmp = tmp_path_factory.mktemp("ci-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "CPR_CI_", "PYTEST_"))}
    env.update(RUNNER_TEMP=str(tmp), GITHUB_STEP_SUMMARY=str(tmp / "step-summary.md"),
               GITHUB_OUTPUT=str(tmp / "github-output"), GITHUB_JOB="ci-summary", CPR_CI_NAME=NAME,
               CPR_CI_VENV_PYTHON=sys.executable, CPR_CI_SUDO="never", CPR_CI_TESTS=TRANSFER_TEST,
               CPR_CI_STRICT="true", CPR_CI_PYTEST_ARGS="-q")
    (tmp / "step-summary.md").touch()
    test = _step("test", tmp, env)
    summary = _step("summary", tmp, env)
    assert summary.returncode == 0, summary.stdout
    return CiRun(test.returncode, test.stdout, tmp / "pytest-cpr" / NAME,
                 (tmp / "step-summary.md").read_text(), (tmp / "github-output").read_text())


def _markdown_rows(summary: str) -> list[dict[str, str]]:
    block = summary.split("## cpr-transfer summary", 1)[1].strip().splitlines()
    table = [line for line in block if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert re.fullmatch(r"\|(:?-{3,}:?\|)+", table[1]), f"second line is not a Markdown separator: {table[1]}"
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:]]
    return [dict(zip(header, row, strict=True)) for row in cells]


def _column(row: dict[str, str], *words: str) -> str:
    """The cell whose header has all `words` (headers are worded by report.py, not pinned here)."""
    found = [v for k, v in row.items() if all(w in k.lower() for w in words)]
    assert len(found) == 1, f"expected one column with {words} in {sorted(row)}"
    return found[0]


def test_the_run_passes_and_reports_its_outputs(ci_run: CiRun) -> None:
    """The transfer test passes under the action's script and the step outputs name real files."""
    assert ci_run.returncode == 0, ci_run.log[-4000:]
    outputs = dict(line.split("=", 1) for line in ci_run.github_output.splitlines())
    assert Path(outputs["junit-xml"]) == ci_run.out / "junit.xml"
    assert (ci_run.out / "junit.xml").is_file() and (ci_run.out / "pytest.log").is_file()
    artifacts = [p for p in (ci_run.out / "artifacts").iterdir() if p.is_dir()]
    assert len(artifacts) == 1, f"one artifacts folder per test expected in {ci_run.out / 'artifacts'}"
    names = {p.name for p in artifacts[0].iterdir()}
    assert {"qmp-transcript.jsonl", "console-g0.log", "transfers.json"} <= names, sorted(names)


def test_step_summary_table_has_one_row_per_transfer_with_numbers(ci_run: CiRun) -> None:
    """The plugin's Markdown table: three rows (one per transfer), numeric downtime/blackout/wall."""
    rows = _markdown_rows(ci_run.step_summary)
    assert [r["#"] for r in rows] == ["1", "2", "3"], ci_run.step_summary
    for row in rows:
        assert _column(row, "status") == "completed" and _column(row, "result") == "passed", row
        assert re.fullmatch(r"g\d .+ -> g\d .+", _column(row, "source", "target")), row
        for words in (("downtime",), ("blackout",), ("lost",)):
            assert float(_column(row, *words)) >= 0, f"{words} is not a number in {row}"
        assert float(_column(row, "blackout")) > 0, f"the guest cannot see a zero blackout: {row}"


def test_junit_xml_carries_numeric_cpr_properties(ci_run: CiRun) -> None:
    """Each transfer's figures are <property name="cpr_t<N>_..."> of the test case, with numbers."""
    cases = list(ET.parse(ci_run.out / "junit.xml").getroot().iter("testcase"))
    assert len(cases) == 1 and cases[0].find("failure") is None and cases[0].find("error") is None
    props = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    for n in (1, 2, 3):
        assert props[f"cpr_t{n}_status"] == "completed"
        for figure in ("qemu_downtime_ms", "blackout_ms", "wall_ms", "lost_probes"):
            value = props.get(f"cpr_t{n}_{figure}")
            assert value is not None and float(value) >= 0, f"cpr_t{n}_{figure} = {value!r}"
    assert "cpr_t4_status" not in props
    assert float(props["cpr_boot_to_ssh_s"]) > 0
    assert Path(str(props["cpr_artifacts"])).is_dir()


def test_job_page_summary_from_junit(ci_run: CiRun) -> None:
    """junit_summary.py adds counts and the worst transfer to the same step summary."""
    summary = ci_run.step_summary.split("## pytest-cpr results", 1)[1]
    assert "**1 passed, 0 failed, 0 skipped, 0 errors**" in summary
    assert "; 3 transfers" in summary
    worst = re.search(r"largest guest-visible blackout: ([\d.]+) ms \((\w+) #(\d)\)", summary)
    assert worst is not None, summary
    rows = _markdown_rows(ci_run.step_summary)
    assert float(worst.group(1)) == pytest.approx(max(float(_column(r, "blackout")) for r in rows), abs=0.1)


def test_html_report_carries_each_transfers_plot_and_numbers(ci_run: CiRun) -> None:
    """With pytest-html installed, the action's run writes report.html: the test's entry embeds each
    transfer's timeline plot (PNG) and a table of its numbers, and the summary section holds the run's
    cpr-transfer table; the job page names the report."""
    pytest.importorskip("pytest_html")
    html = (ci_run.out / "report.html").read_text()
    rows = _markdown_rows(ci_run.step_summary)
    plots = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]{1000,})", html)
    assert len(plots) == 3, f"{len(plots)} embedded PNG plots in report.html, expected one per transfer"
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    for n in (1, 2, 3):
        assert f"vm0 transfer {n}: timeline" in html
    tables = html.count("cpr-transfers")
    assert tables >= 2, "the test's transfer table and the run's summary table"
    for row in rows:  # the numbers of the job page's table are in the HTML report too
        for words in (("downtime",), ("blackout",)):
            cell = _column(row, *words)
            assert f"&gt;{cell}&lt;/td&gt;" in html or f">{cell}</td>" in html, f"{words} {cell} not in report.html"
    assert "cpr-transfer summary" in html
    assert "`report.html`, the pytest-html report" in ci_run.step_summary
