"""The main job without pytest: boot the default guest, live-update it N times under traffic,
check every transfer and print the numbers. `cpr-demo --transfers 3`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pytest_cpr import checks, leftovers
from pytest_cpr.errors import CprError
from pytest_cpr.images import GuestImage, guest_image_dir
from pytest_cpr.qemu.probe import choose_accel, probe
from pytest_cpr.settings import resolve
from pytest_cpr.vm import CprVM, VmConfig

COLUMNS = ("#", "QEMU", "downtime ms", "total ms", "wall ms", "blackout ms", "lost", "ssh after ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpr-demo", description=__doc__)
    parser.add_argument("--transfers", type=int, default=3)
    parser.add_argument("--artifacts", default="artifacts/demo")
    args = parser.parse_args(argv)
    try:
        return run(args.transfers, Path(args.artifacts))
    except CprError as exc:
        print(f"cpr-demo: {exc}", file=sys.stderr)
        return 2


def run(transfers: int, artifacts: Path) -> int:
    settings = resolve({}, os.environ, {})  # CPR_* environment variables apply, as in pytest
    leftovers.clean_stale()
    source = probe(settings.qemu, "CPR_QEMU")
    target = probe(settings.target_qemu_binary, "CPR_TARGET_QEMU")
    for build in (source, target):
        build.require("cpr-transfer")
    image_dir = guest_image_dir(settings.image, Path(settings.cache_dir))
    image = GuestImage.load(image_dir, "CPR_IMAGE")
    accel = choose_accel(settings.accel, source, image.kernel)
    config = VmConfig(name="demo", image=image, source=source, target=target, accel=accel,
                      memory_mib=settings.memory, cpus=settings.cpus, boot_timeout=settings.boot_timeout,
                      transfer_timeout=settings.transfer_timeout, command_timeout=settings.command_timeout,
                      artifacts=artifacts.resolve(), vnet_hdr=settings.vnet_hdr,
                      probe_interval_ms=settings.probe_interval_ms)
    print(f"source {source.describe()}\ntarget {target.describe()}\naccelerator {accel}; "
          f"guest {image.directory}; artifacts {config.artifacts}", flush=True)
    t0 = time.monotonic()
    with CprVM(config) as vm:
        boot = vm.boot()
        print(f"guest booted: SSH answered {boot:.2f}s after QEMU started", flush=True)
        results = []
        with vm.traffic() as traffic:
            for _ in range(transfers):
                r = vm.live_update(traffic)
                results.append(r)
                print(f"transfer {r.index}: completed, QEMU downtime {r.qemu_downtime_ms} ms, guest blackout "
                      f"{r.blackout_ms} ms, interrupts fired after: {sorted(r.interrupts['after'])}"
                      if r.interrupts else f"transfer {r.index}: {r.status}", flush=True)
        checks.assert_stream_intact(traffic.stream_result, vm.artifacts)
        checks.assert_clean_dmesg(vm.collect_dmesg(), vm.artifacts)
    rows = [[str(r.index), f"{r.source.version} -> {r.target.version}",
             *(str(r.numbers()[k]) for k in ("qemu_downtime_ms", "qemu_total_ms", "wall_ms", "blackout_ms",
                                             "lost_probes", "ssh_after_ms"))] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    print()
    for row in (list(COLUMNS), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    stream = traffic.stream_result
    summary = {"boot_to_ssh_s": round(boot, 3), "transfers": len(results),
               "qemu_downtime_ms": [r.qemu_downtime_ms for r in results],
               "blackout_ms": [r.blackout_ms for r in results],
               "lost_probes": [r.numbers()["lost_probes"] for r in results],
               "tcp_stream_bytes": stream.bytes_received if stream else None,
               "tcp_stream_intact": stream.intact if stream else None,
               "wall_s": round(time.monotonic() - t0, 2)}
    print("\nall checks passed: SSH session kept, TCP stream intact, same boot, NIC interrupts continue, "
          "guest log clean")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
