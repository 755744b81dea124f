"""Run-level reporting: the CPR summary table in the terminal and as Markdown for GitHub."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

CLEANED_KEY = pytest.StashKey[list[str]]()

COLUMNS = (("test", "test"), ("#", "index"), ("source -> target", "path"), ("status", "status"),
           ("QEMU downtime ms", "qemu_downtime_ms"), ("blackout ms", "blackout_ms"),
           ("lost", "lost_probes"), ("wall ms", "wall_ms"), ("result", "outcome"))


def collect_rows(terminalreporter: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if not isinstance(rep, pytest.TestReport) or rep.when != "teardown":
                continue
            for name, value in rep.user_properties:
                if name != "cpr_transfers_json":
                    continue
                for row in json.loads(str(value)):
                    row["path"] = f"{row['source']} -> {row['target']}"
                    rows.append(row)
    outcomes = {}
    for key in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(key, []):
            if isinstance(rep, pytest.TestReport) and (rep.when == "call" or rep.failed):
                outcomes[rep.nodeid] = key if rep.when == "call" else "error"
    for row in rows:
        row["outcome"] = outcomes.get(row["test"], "?")
    return sorted(rows, key=lambda r: (r["test"], r["index"]))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = [c[0] for c in COLUMNS]
    body = [[_cell(r.get(key)) if key != "test" else r["test"].split("::")[-1] for _, key in COLUMNS]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*row) for row in body)])


def terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    cleaned = config.stash.get(CLEANED_KEY, [])
    if cleaned:
        terminalreporter.write_sep("-", "pytest-cpr: cleaned up after an earlier run")
        for line in cleaned:
            terminalreporter.write_line(line)
    rows = collect_rows(terminalreporter)
    if not rows:
        return
    terminalreporter.write_sep("=", "cpr-transfer summary")
    terminalreporter.write_line(table(rows))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as fh:
            fh.write("## cpr-transfer summary\n\n" + table(rows, markdown=True) + "\n\n")
