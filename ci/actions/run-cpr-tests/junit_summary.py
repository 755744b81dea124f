#!/usr/bin/env python3
"""Markdown for the job page from pytest's JUnit XML: counts, failures, skip reasons, worst transfers.

    python junit_summary.py junit.xml >> "$GITHUB_STEP_SUMMARY"

Standard library only, so it runs with any Python 3.11+. The per-transfer table itself is written by
the plugin (pytest_cpr/report.py); this adds what a reader of a red or oddly green job needs first.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

TRANSFER_PROPERTY = re.compile(r"^cpr_t(\d+)_(\w+)$")


@dataclass
class Case:
    name: str
    outcome: str  # passed | failed | error | skipped
    message: str = ""
    seconds: float = 0.0
    properties: list[tuple[str, str]] = field(default_factory=list)

    def transfers(self) -> dict[int, dict[str, str]]:
        """cpr_t<N>_<figure> properties grouped by transfer number N."""
        out: dict[int, dict[str, str]] = {}
        for key, value in self.properties:
            if m := TRANSFER_PROPERTY.match(key):
                out.setdefault(int(m.group(1)), {})[m.group(2)] = value
        return out


def _outcome(tc: ET.Element) -> tuple[str, str]:
    for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
        child = tc.find(tag)
        if child is not None:
            text = child.get("message") or (child.text or "")
            return outcome, text.strip().splitlines()[0] if text.strip() else ""
    return "passed", ""


def read_cases(path: Path) -> list[Case]:
    cases = []
    root = ET.parse(path).getroot()  # noqa: S314 - the file our own pytest run just wrote
    for tc in root.iter("testcase"):
        outcome, message = _outcome(tc)
        name = "::".join(p for p in (tc.get("classname", ""), tc.get("name", "")) if p)
        props = [(p.get("name", ""), p.get("value", "")) for p in tc.iter("property")]
        cases.append(Case(name, outcome, message, float(tc.get("time", "0") or 0), props))
    return cases


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def worst(cases: list[Case], figure: str) -> tuple[float, str] | None:
    """The largest value of one transfer figure across all tests, with where it happened."""
    best: tuple[float, str] | None = None
    for case in cases:
        for index, figures in case.transfers().items():
            value = _number(figures.get(figure))
            if value is not None and (best is None or value > best[0]):
                best = (value, f"{case.name.split('::')[-1]} #{index}")
    return best


def markdown(cases: list[Case]) -> str:
    counts = {k: sum(c.outcome == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    seconds = sum(c.seconds for c in cases)
    n_transfers = sum(len(c.transfers()) for c in cases)
    lines = ["## pytest-cpr results", "",
             f"**{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
             f"{counts['error']} errors** in {seconds:.1f} s; {n_transfers} transfers", ""]
    for figure, label, unit in (("blackout_ms", "largest guest-visible blackout", " ms"),
                                ("qemu_downtime_ms", "largest QEMU-reported downtime", " ms"),
                                ("lost_probes", "most probes lost in one transfer", "")):
        if (w := worst(cases, figure)) is not None:
            lines.append(f"- {label}: {w[0]:g}{unit} ({w[1]})")
    for outcome, title in (("failed", "Failed"), ("error", "Errors"),
                           ("skipped", "Skipped (the host could not serve these)")):
        rows = [c for c in cases if c.outcome == outcome]
        if rows:
            lines += ["", f"### {title}", "", "| test | message |", "|---|---|"]
            lines += [f"| `{_cell(c.name)}` | {_cell(c.message)} |" for c in rows]
    return "\n".join(lines) + "\n\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: junit_summary.py JUNIT_XML", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(read_cases(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
