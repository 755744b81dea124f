#!/usr/bin/env python3
"""Virtual hardware host benchmark: L1 boot, L2 boot and one transfer inside L1, as numbers.

    python bench/vhost_bench.py [--accel auto|tcg|kvm] [--l0 auto|both|QEMU...] [--no-vfio] [--artifacts DIR]

For each QEMU that runs L1 (--l0: auto = what the tier uses; both = the system's QEMU and the cached
qemu-next build, measured one after the other in this run):
1. boots L1 (pytest_cpr.vhost.VirtualHost): QEMU start to the agent's answer, on TCG here;
2. inside L1, bench/cpr_bench.py with one boot and one transfer of the default (virtio) guest on
   L1's KVM: L2 boot-to-SSH, QEMU downtime/total, guest-visible blackout;
3. inside L1 (unless --no-vfio), the NIC passthrough test of tests/hardware on every backend of the
   generated host config (legacy container; iommufd with the iommufd-capable kernel): its cpr_
   numbers from the JUnit XML.
With two L0 builds, ratios second/first. Prints a table, then as its last line one JSON object (also
artifacts/vhost/bench-<time>/bench.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without install

from pytest_cpr.errors import CprError
from pytest_cpr.images import default_cache_dir
from pytest_cpr.vhost import L1_GUEST, L1_OUT, L1_PYTHON, L1_SRC, VhostConfig, VirtualHost, l1_qemu


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


def vfio_transfer(l1: VirtualHost, backend: str) -> dict[str, Any]:
    """One NIC passthrough test in L1 on `backend`: its cpr_ properties and its wall time."""
    run = l1.pytest(["tests/hardware/test_passthrough.py", "-k", f"nic_traffic and {backend}", "-q"],
                    name=f"bench-vfio-{backend}", timeout=1200, sink=_progress)
    out: dict[str, Any] = {"exit_code": run.exit_code, "wall_s": round(run.seconds, 1)}
    if run.junit is not None:
        for case in ET.parse(run.junit).getroot().iter("testcase"):
            out["test"] = case.get("name")
            out["test_s"] = float(case.get("time") or 0)
            out.update({name: p.get("value") for p in case.iter("property")
                        if (name := p.get("name") or "").startswith("cpr_t1_")})
    return out


def one_l0(qemu: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Everything above with L1 run by `qemu` ("auto": the tier's choice)."""
    cfg = VhostConfig.from_cache(folder, accel=args.accel, memory=args.memory, junit_dir=folder / "junit",
                                 qemu=qemu)
    report: dict[str, Any] = {"l0_qemu": cfg.qemu}
    t0 = time.monotonic()
    try:
        with VirtualHost(cfg) as l1:
            report["l1"] = {"accel": l1.accel, "boot_s": round(l1.boot_seconds, 1),
                            "kernel": l1.run("uname -r").output.strip(),
                            "qemu": l1.run("qemu-system-x86_64 --version | head -1").output.strip()}
            report["l2_virtio"] = inner_bench(l1)
            if not args.no_vfio:
                for backend in tomllib.loads(l1.host_config)["host"]["backends"]:
                    report[f"l2_vfio_{backend}"] = vfio_transfer(l1, backend)
    except CprError as exc:
        report["error"] = str(exc)
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def _num(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None


def print_report(name: str, report: dict[str, Any]) -> None:
    l1_info, virtio = report.get("l1", {}), report.get("l2_virtio", {})
    print(f"== L0 {name}: {report.get('l0_qemu')} ({report.get('total_s')} s in all)")
    print(f"L1 boot ({l1_info.get('accel')}, kernel {l1_info.get('kernel')}): {l1_info.get('boot_s')} s")
    print(f"L2 virtio boot-to-SSH (KVM in L1): {virtio.get('boot_to_ssh_s')} s")
    print("L2 virtio transfer: " + ", ".join(f"{k}={virtio.get(k)}" for k in (
        "qemu_downtime_ms", "qemu_total_ms", "blackout_ms", "lost_probes", "step_ms")))
    for key, vfio in report.items():
        if key.startswith("l2_vfio_"):
            print(f"L2 vfio {key[8:]} NIC transfer: " + ", ".join(
                f"{k[7:]}={v}" for k, v in vfio.items() if k.startswith("cpr_t1_")))
    if "error" in report:
        print(f"ERROR: {report['error']}")


RATIOS = (("L1 boot", ("l1", "boot_s")), ("L2 virtio boot-to-SSH", ("l2_virtio", "boot_to_ssh_s")),
          ("L2 virtio QEMU downtime", ("l2_virtio", "qemu_downtime_ms")),
          ("vfio legacy QEMU downtime", ("l2_vfio_legacy", "cpr_t1_qemu_downtime_ms")),
          ("vfio legacy guest blackout", ("l2_vfio_legacy", "cpr_t1_blackout_ms")),
          ("whole L1 session", ("total_s",)))


def ratio_lines(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    out = []
    for label, path in RATIOS:
        a, b = (_num(_dig(r, path)) for r in (first, second))
        if a and b is not None:
            out.append(f"{label}: {b:g} / {a:g} = {b / a:.2f}")
    return out


def _dig(data: dict[str, Any], path: tuple[str, ...]) -> object:
    value: object = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"), help="L1's accelerator")
    parser.add_argument("--memory", default="5G")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--no-vfio", action="store_true", help="skip the passthrough transfers")
    parser.add_argument("--l0", nargs="*", help="QEMU builds that run L1: auto (default), both, or paths")
    args = parser.parse_args()
    root = Path(args.artifacts).resolve()
    folder = root / "vhost" / time.strftime("bench-%Y%m%d-%H%M%S")
    l0s = args.l0 or ["auto"]
    if l0s == ["both"]:
        nxt = l1_qemu("auto", default_cache_dir())
        if nxt == "qemu-system-x86_64":
            parser.error("--l0 both needs the qemu-next build: cpr-image build qemu-next")
        l0s = ["qemu-system-x86_64", nxt]
    reports = {f"l0_{i}": one_l0(q, args, folder / f"l0-{i}") for i, q in enumerate(l0s)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(reports, indent=1) + "\n")
    for name, report in reports.items():
        print_report(name, report)
    if len(reports) == 2:
        first, second = reports.values()
        print(f"== ratios, L1 run by {second.get('l0_qemu')} over {first.get('l0_qemu')} (< 1: faster)")
        print("\n".join(ratio_lines(first, second)))
    print(json.dumps(reports))
    return 0 if all("error" not in r for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
