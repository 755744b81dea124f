#!/usr/bin/env python3
"""Virtual hardware host benchmark: L1 boot, L2 boot and one transfer inside L1, as numbers.

    python bench/vhost_bench.py [--accel auto|tcg|kvm] [--no-vfio] [--artifacts DIR]

1. boots L1 (pytest_cpr.vhost.VirtualHost): QEMU start to the agent's answer, on TCG here;
2. inside L1, bench/cpr_bench.py with one boot and one transfer of the default (virtio) guest on
   L1's KVM: L2 boot-to-SSH, QEMU downtime/total, guest-visible blackout;
3. inside L1 (unless --no-vfio), the NIC passthrough test of tests/hardware (vfio-pci, legacy
   container) on the generated host config: its cpr_ numbers from the JUnit XML.
Prints a table, then as its last line one JSON object (also artifacts/vhost/bench-<time>/bench.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from pytest_cpr.errors import CprError
from pytest_cpr.vhost import L1_GUEST, L1_OUT, L1_PYTHON, L1_SRC, VhostConfig, VirtualHost


def _progress(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def inner_bench(l1: VirtualHost) -> dict[str, Any]:
    """bench/cpr_bench.py inside L1: one L2 boot and one transfer (virtio guest, L2 on KVM)."""
    command = (f"cd {L1_SRC} && PYTHONDONTWRITEBYTECODE=1 {L1_PYTHON} bench/cpr_bench.py --boots 1 "
               f"--transfers 1 --soak 0 --accel auto --image {L1_GUEST} --artifacts {L1_OUT}/bench "
               "--no-plots")
    t0 = time.monotonic()
    result = l1.run(command, 900, sink=_progress)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("{")]
    data: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": result.output[-2000:]}
    data["wall_s"] = round(time.monotonic() - t0, 1)
    return data


def vfio_transfer(l1: VirtualHost) -> dict[str, Any]:
    """One NIC passthrough test in L1 (legacy container): its cpr_ properties and its wall time."""
    run = l1.pytest(["tests/hardware/test_passthrough.py", "-k", "nic_traffic and legacy", "-q"],
                    name="bench-vfio", timeout=1200, sink=_progress)
    out: dict[str, Any] = {"exit_code": run.exit_code, "wall_s": round(run.seconds, 1)}
    if run.junit is not None:
        for case in ET.parse(run.junit).getroot().iter("testcase"):
            out["test"] = case.get("name")
            out["test_s"] = float(case.get("time") or 0)
            out.update({name: p.get("value") for p in case.iter("property")
                        if (name := p.get("name") or "").startswith("cpr_t1_")})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"), help="L1's accelerator")
    parser.add_argument("--memory", default="5G")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--no-vfio", action="store_true", help="skip the passthrough transfer")
    args = parser.parse_args()
    root = Path(args.artifacts).resolve()
    folder = root / "vhost" / time.strftime("bench-%Y%m%d-%H%M%S")
    cfg = VhostConfig.from_cache(folder, accel=args.accel, memory=args.memory, junit_dir=folder / "junit")
    report: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        with VirtualHost(cfg) as l1:
            report["l1"] = {"accel": l1.accel, "boot_s": round(l1.boot_seconds, 1),
                            "kernel": l1.run("uname -r").output.strip(),
                            "qemu": l1.run("qemu-system-x86_64 --version | head -1").output.strip()}
            report["l2_virtio"] = inner_bench(l1)
            if not args.no_vfio:
                report["l2_vfio_legacy"] = vfio_transfer(l1)
    except CprError as exc:
        report["error"] = str(exc)
    report["total_s"] = round(time.monotonic() - t0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    l1_info, virtio = report.get("l1", {}), report.get("l2_virtio", {})
    vfio = report.get("l2_vfio_legacy", {})
    print(f"L1 boot ({l1_info.get('accel')}): {l1_info.get('boot_s')} s")
    print(f"L2 virtio boot-to-SSH (KVM in L1): {virtio.get('boot_to_ssh_s')} s")
    print("L2 virtio transfer: " + ", ".join(f"{k}={virtio.get(k)}" for k in (
        "qemu_downtime_ms", "qemu_total_ms", "blackout_ms", "lost_probes", "step_ms")))
    if vfio:
        print("L2 vfio legacy transfer: " + ", ".join(f"{k[7:]}={v}" for k, v in vfio.items()
                                                       if k.startswith("cpr_t1_")))
    print(json.dumps(report))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
