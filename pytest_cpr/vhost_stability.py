"""Stability runner for the virtual host: which L1 configuration holds, measured, not guessed.

Repeats one inner workload (a tests/hardware test, or its control without transfers from
tests/vhost/inner/controls.py) K rounds per L1 configuration, each round a fresh pytest run
and L2 guest inside L1, and appends one JSON line per round to a data file: the outcome, its
failure class, how many transfers had completed, the first lines of the failure and where the
evidence is. L1 is booted once per configuration and again after any failed round (a failure must
not leak into the next round). A configuration is dropped after `--max-failures` failed rounds.

    python -m pytest_cpr.vhost_stability run --config vgif0 --workload two_groups[legacy] --rounds 20
    python -m pytest_cpr.vhost_stability run --config default --workload two_groups[legacy] --control
    python -m pytest_cpr.vhost_stability table            # the Markdown table of every round recorded

The table in docs/virtual-host.md is this command's output over docs/vhost-stability/rounds.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pytest_cpr.errors import CprError
from pytest_cpr.vhost import (
    L1_FAULTS,
    L1_OUT,
    SOURCE_TREE,
    InnerRun,
    VhostConfig,
    VirtualHost,
    failure_of,
    first_class,
    run_as_cli,
)

DATA = Path(__file__).resolve().parent.parent / "docs" / "vhost-stability" / "rounds.jsonl"

# L1 configurations: one variable changed at a time against today's default (VhostConfig fields).
# Under TCG's -cpu max, L1's kvm_amd already runs with vls=0, avic=N, lbrv=0, nrips=0 and
# pause_filter_count=0 (the emulated CPU lacks those features: kvm-parameters.txt of every run), so
# of its parameters only vgif (1) and npt (Y) can be changed; npt=0 does not boot an L2.
CONFIGS: dict[str, dict[str, str]] = {
    "default": {},
    "vgif0": {"append": "kvm_amd.vgif=0"},
    "tdp-mmu0": {"append": "kvm.tdp_mmu=0"},
    "halt-poll0": {"append": "kvm.halt_poll_ns=0"},
    "tcg-single": {"tcg_thread": "single"},
    "qemu-10.0.2": {"qemu": "qemu-system-x86_64"},
    "cpu-epyc": {"cpu": "EPYC-v4,+svm,+npt"},
}

# workload -> (tests/hardware file, its control, -k expression)
HW = "tests/hardware/test_passthrough.py"
CONTROLS = "tests/vhost/inner/controls.py"
WORKLOADS: dict[str, tuple[str, str, str]] = {
    f"{name}[{backend}]": (HW, CONTROLS, f"{name} and {backend}")
    for name in ("two_groups", "nic_traffic", "nvme_dma") for backend in ("legacy", "iommufd")
}

# failure classes, first match wins: (class, pattern over the failure text)
CLASSES: tuple[tuple[str, str], ...] = (
    *L1_FAULTS,
    ("L2 KVM internal error", r"QEMU internal-error|KVM internal error"),
    ("L2 boot hang", r"did not finish booting|CPR-HOSTKEY|SSH to \S+ not ready"),
    ("L2 reset", r"guest-reset|the guest is gone"),
    ("QEMU stderr", r"reported trouble on stderr"),
    ("QEMU quit", r"did not end with exit code 0|the old QEMU .* ended (signal|exit code)"),
    ("old QEMU kept KVM", r"the old QEMU still held"),
    ("link flap", r"link went down"),
    ("lost vector", r"stayed silent|vectors silent|vfio interrupt line"),
    ("DMA hang", r"NVMe DMA"),
    ("connectivity", r"probes|no connectivity|SSH session|TCP stream|blackout"),
    ("guest stuck", r"guest command .* (did not finish|did not start)|snapshot over SSH timed out"),
)


def classify(text: str) -> str:
    """The failure class of a failed round's text (the first matching class, else 'other')."""
    return first_class(text, CLASSES) or "other"


@dataclass
class Round:
    """One round's record (one line of the data file)."""

    config: str
    workload: str
    control: bool
    round: int
    outcome: str  # passed, failed, skipped
    failure_class: str
    transfers: int  # transfers completed before the failure (or in all)
    seconds: float
    message: str
    evidence: str
    l1_boot: int  # which L1 boot of this run the round ran in (1 = first)
    load1: float  # host load average over 1 min at the round's end (2 cores: above ~2.3 = contended)
    when: str
    commit: str  # the source tree's commit (the code L1 ran)


def junit_outcome(junit: Path | None) -> tuple[str, str]:
    """('passed'|'failed'|'skipped'|'none', failure text) from the inner JUnit XML of one round."""
    if junit is None or not junit.is_file():
        return "none", ""
    cases = list(ET.parse(junit).getroot().iter("testcase"))  # noqa: S314 (our own inner run's XML)
    if not cases:
        return "none", ""
    for case in cases:
        if (bad := failure_of(case)) is not None:
            return "failed", f"{bad.get('message') or ''}\n{bad.text or ''}"
    if all(case.find("skipped") is not None for case in cases):
        return "skipped", "; ".join((c.find("skipped").get("message") or "") for c in cases  # type: ignore[union-attr]
                                    if c.find("skipped") is not None)
    return "passed", ""


def transfers_done(folder: Path) -> int:
    """Completed transfers recorded in the round's inner artifacts (transfers.json of its test)."""
    done = 0
    for path in folder.rglob("transfers.json"):
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        entries = rows.get("transfers", rows) if isinstance(rows, dict) else rows
        done += sum(1 for t in entries if isinstance(t, dict) and t.get("status") == "completed")
    return done


def first_lines(text: str, n: int = 3, width: int = 400) -> str:
    text = re.sub(r'"mkdir -p /mnt/out/junit .*?--junitxml=\S+ ', '"<inner pytest> ', text)  # the why, not the how
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[:n])[:width]


def source_commit(tree: Path = SOURCE_TREE) -> str:
    """The commit of the tree L1 runs (with '+' when it has uncommitted changes), or '' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=30).stdout
    head = git("rev-parse", "--short=12", "HEAD").strip()
    return head + ("+" if head and git("status", "--porcelain", "--untracked-files=no").strip() else "")


class Runner:
    """Rounds of one workload under one L1 configuration (see the module docstring)."""

    def __init__(self, config: str, workload: str, control: bool, rounds: int, max_failures: int,
                 data: Path, artifacts: Path, append: str = "") -> None:
        if config not in CONFIGS and not append:
            raise CprError(f"--config {config!r}: use one of {', '.join(CONFIGS)} or give --append")
        if workload not in WORKLOADS:
            raise CprError(f"--workload {workload!r}: use one of {', '.join(WORKLOADS)}")
        self.config, self.workload, self.control = config, workload, control
        self.rounds, self.max_failures, self.data = rounds, max_failures, data
        overrides = dict(CONFIGS.get(config, {}))
        if append:
            overrides["append"] = f"{overrides.get('append', '')} {append}".strip()
        self.overrides = overrides
        self.root = artifacts / "vhost" / f"stability-{config}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.boots = 0
        self.commit = source_commit()

    def _vhost_config(self) -> VhostConfig:
        self.boots += 1
        cfg = VhostConfig.from_cache(self.root / f"l1-{self.boots}", junit_dir=self.root / "junit")
        return dataclasses.replace(cfg, **self.overrides)  # type: ignore[arg-type]

    def _pytest_args(self) -> list[str]:
        hardware, control, select = WORKLOADS[self.workload]
        return [control if self.control else hardware, "-k", select, "-v", "-rs", "-p", "no:randomly"]

    def _record(self, index: int, outcome: str, text: str, seconds: float, evidence: Path, transfers: int) -> Round:
        rnd = Round(config=self.config, workload=self.workload, control=self.control, round=index,
                    outcome=outcome, failure_class=classify(text) if outcome == "failed" else "",
                    transfers=transfers, seconds=round(seconds, 1), message=first_lines(text),
                    evidence=str(evidence), l1_boot=self.boots, load1=round(os.getloadavg()[0], 2),
                    when=time.strftime("%Y-%m-%dT%H:%M:%S"), commit=self.commit)
        self.data.parent.mkdir(parents=True, exist_ok=True)
        with self.data.open("a") as fh:
            fh.write(json.dumps(dataclasses.asdict(rnd)) + "\n")
        mark = "ok  " if outcome == "passed" else outcome.upper()
        print(f"[stability] {self.config} {self.workload}{' control' if self.control else ''} round {index}: "
              f"{mark} {rnd.failure_class} {rnd.seconds}s transfers={transfers} load={rnd.load1} "
              f"{rnd.message[:160]}", flush=True)
        return rnd

    def _one_round(self, l1: VirtualHost, index: int) -> Round:
        name = f"r{index:03d}"
        t0 = time.monotonic()
        env = {"CPR_ARTIFACTS": f"{L1_OUT}/cpr-{name}",  # each round its own evidence
               "CPR_BOOT_ATTEMPTS": "1"}  # a hung L2 boot counts as a failed round here
        run: InnerRun = l1.pytest(self._pytest_args(), name=name, timeout=1500, env=env)
        outcome, text = junit_outcome(run.junit)
        if outcome == "none":
            outcome, text = "failed", f"inner pytest exit {run.exit_code} without a test result; log {run.log}"
        return self._record(index, outcome, text, time.monotonic() - t0, l1.inner / f"cpr-{name}",
                            transfers_done(l1.inner / f"cpr-{name}"))

    def run(self) -> list[Round]:
        records: list[Round] = []
        index = 0
        while index < self.rounds and sum(r.outcome == "failed" for r in records) < self.max_failures:
            cfg = self._vhost_config()
            t0 = time.monotonic()
            try:
                with VirtualHost(cfg) as l1:
                    # evidence that the configuration took effect: L1's KVM module parameters
                    l1.run(f"(grep -H . /sys/module/kvm_amd/parameters/* /sys/module/kvm/parameters/*; "
                           f"grep -m1 '^flags' /proc/cpuinfo) > {L1_OUT}/kvm-parameters.txt 2>&1", 60)
                    while index < self.rounds:
                        rnd = self._one_round(l1, index)
                        records.append(rnd)
                        index += 1
                        if rnd.outcome == "skipped":
                            raise CprError(f"round skipped (the workload cannot run here): {rnd.message}")
                        if rnd.outcome == "failed":
                            break  # a fresh L1 for the next round
            except CprError as exc:  # L1 itself failed: reset, freeze, agent gone, inner timeout
                if "round skipped" in str(exc):
                    raise
                records.append(self._record(index, "failed", str(exc), time.monotonic() - t0, cfg.artifacts,
                                            transfers_done(cfg.artifacts / "inner")))
                index += 1
        return records


# ---- the table ---------------------------------------------------------------------------------------

LOAD_BANDS = ((4.0, "<= 4"), (8.0, "4-8"), (float("inf"), "> 8"))  # host load (1 min) on 2 cores


def load_band(load: float) -> str:
    """The host-load band of a round: rounds on an overloaded host (other work beside L1) are
    reported apart, since load changes the timing the failures may depend on."""
    return next(name for top, name in LOAD_BANDS if load <= top)


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: per (configuration, workload, control, host-load band) the rounds, passes and
    failure classes."""
    groups: dict[tuple[str, str, bool, str], list[dict[str, object]]] = {}
    for row in rows:
        key = (str(row["config"]), str(row["workload"]), bool(row["control"]),
               load_band(float(row["load1"])))  # type: ignore[arg-type]
        groups.setdefault(key, []).append(row)
    lines = ["| L1 configuration | workload | transfers | host load | rounds | passed | failures by class |",
             "|---|---|---|---|---|---|---|"]
    for (config, workload, control, band), group in sorted(groups.items(), key=lambda kv: kv[0]):
        failed = Counter(str(r["failure_class"]) for r in group if r["outcome"] == "failed")
        classes = ", ".join(f"{c} {n}" for c, n in failed.most_common()) or "none"
        lines.append(f"| {config} | {workload} | {'no (control)' if control else 'yes'} | {band} | {len(group)} | "
                     f"{sum(r['outcome'] == 'passed' for r in group)} | {classes} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_cpr.vhost_stability",
                                     description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="K rounds of one workload under one L1 configuration")
    r.add_argument("--config", default="default", help=f"one of: {', '.join(CONFIGS)}")
    r.add_argument("--append", default="", help="more L1 kernel parameters (name the --config after them)")
    r.add_argument("--workload", default="two_groups[legacy]", help=f"one of: {', '.join(WORKLOADS)}")
    r.add_argument("--control", action="store_true", help="the workload's control: same traffic, no transfer")
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--max-failures", type=int, default=3, help="drop the configuration after this many")
    r.add_argument("--data", type=Path, default=DATA, help=f"JSON lines to append to (default {DATA})")
    r.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    t = sub.add_parser("table", help="the Markdown table of the recorded rounds")
    t.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    if args.cmd == "table":
        print(table(read_rows(args.data)))
        return 0
    def rounds() -> int:
        records = Runner(args.config, args.workload, args.control, args.rounds, args.max_failures,
                         args.data, args.artifacts.resolve(), args.append).run()
        passed = sum(r.outcome == "passed" for r in records)
        print(f"[stability] {args.config} {args.workload}: {passed} of {len(records)} rounds passed", flush=True)
        return 0 if passed == len(records) else 1

    return run_as_cli("vhost-stability", rounds)


if __name__ == "__main__":
    sys.exit(main())
