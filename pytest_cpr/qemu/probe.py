"""What a QEMU build can do, asked once per session: version, migration modes, devices, objects.

The build itself is asked over QMP (query-version, query-qmp-schema, qom-list-types), so a test
that needs what a build lacks is skipped with the build, its version and the missing feature.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprSettingError, CprUnsupported
from pytest_cpr.kinds import Accel
from pytest_cpr.qemu.process import unix_listening
from pytest_cpr.qemu.qmp import QmpSession
from pytest_cpr.qemu.spec import opt

CPR_TRANSFER_MIN = (10, 0)
VFIO_CPR_MIN = (10, 1)
CPR_CHANNEL_FD_MIN = (10, 1)  # 10.0 refuses it: "bad cpr channel socket type; must be unix"


@dataclass(frozen=True)
class QemuBuild:
    binary: str
    version: tuple[int, int, int]
    package: str
    migration_modes: frozenset[str]
    device_types: frozenset[str]
    object_types: frozenset[str]
    accels: frozenset[str] = field(default=frozenset())
    q35_machine: str = "q35"  # the versioned machine type "q35" stands for in this build

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version)) + (f" ({self.package.strip()})" if self.package.strip() else "")

    @property
    def short_version(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> str:
        return f"{self.binary} (QEMU {self.version_text})"

    @property
    def has_cpr_transfer(self) -> bool:
        return "cpr-transfer" in self.migration_modes

    @property
    def has_vfio_cpr(self) -> bool:
        """VFIO and iommufd devices under cpr-transfer: QEMU 10.1 (no QMP-visible interface)."""
        return self.has_cpr_transfer and self.version[:2] >= VFIO_CPR_MIN and "vfio-pci" in self.device_types

    def missing(self, feature: str) -> str | None:
        """None if the build has `feature`; else the skip reason."""
        checks = {
            "cpr-transfer": (self.has_cpr_transfer, "migration mode cpr-transfer (QEMU >= 10.0)"),
            "cpr-exec": ("cpr-exec" in self.migration_modes, "migration mode cpr-exec (QEMU >= 10.2)"),
            "cpr-reboot": ("cpr-reboot" in self.migration_modes, "migration mode cpr-reboot (QEMU >= 8.2)"),
            "normal": (True, "normal migration"),
            "vfio-pci": ("vfio-pci" in self.device_types, "device vfio-pci"),
            "iommufd": ("iommufd" in self.object_types, "object iommufd"),
            "cpr-channel-fd": (self.has_cpr_transfer and self.version[:2] >= CPR_CHANNEL_FD_MIN,
                               "a cpr channel given as a listening fd (addr.type=fd; QEMU >= 10.1)"),
            "vfio-cpr": (self.has_vfio_cpr, "VFIO support in cpr-transfer (QEMU >= 10.1 with vfio-pci)"),
            "kvm": ("kvm" in self.accels, "accelerator kvm"),
        }
        ok, what = checks[feature]
        return None if ok else f"{self.describe()} lacks {what}"

    def require(self, *features: str) -> None:
        for feature in features:
            if (reason := self.missing(feature)) is not None:
                raise CprUnsupported(reason)


def resolve_binary(binary: str, setting: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise CprSettingError(f"{setting}: QEMU binary {binary!r} not found or not executable; install "
                              "qemu-system-x86 (>= 10.0, Debian 12: from bookworm-backports) or give its path")
    return os.path.realpath(path)


def _enum_values(schema: list[dict[str, Any]], command: str, member: str) -> set[str]:
    """Values of the enum type of `member` in `command`'s arguments (names in the schema are masked)."""
    by_name = {e["name"]: e for e in schema}
    cmd = by_name.get(command)
    if not cmd:
        return set()
    args = by_name.get(cmd.get("arg-type", ""), {})
    for m in args.get("members", []):
        if m["name"] == member:
            enum = by_name.get(m["type"], {})
            return {v if isinstance(v, str) else v["name"] for v in enum.get("values", enum.get("members", []))}
    return set()


_CACHE: dict[tuple[str, float, int], QemuBuild] = {}


def probe(binary: str, setting: str = "--cpr-qemu", timeout: float = 30.0) -> QemuBuild:
    """Ask a QEMU build what it supports (cached per binary and mtime)."""
    path = resolve_binary(binary, setting)
    st = os.stat(path)
    key = (path, st.st_mtime, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    with tempfile.TemporaryDirectory(prefix="cpr-probe-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        argv = [path, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S",
                "-chardev", f"socket,id=qmp0,path={opt(sock)},server=on,wait=off", "-qmp", "chardev:qmp0"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        qmp = QmpSession("probe", Path(tmp) / "transcript.jsonl")
        try:
            deadline = time.monotonic() + timeout
            while not unix_listening(sock):  # the file appears at bind(), connects work after listen()
                if proc.poll() is not None:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    said = out.strip()[:300] or "no output"
                    raise CprSettingError(f"{setting}: {path} is not a working QEMU system emulator "
                                          f"(exit code {proc.returncode}: {said}); "
                                          "give the path of a qemu-system-x86_64 >= 10.0")
                if time.monotonic() > deadline:
                    raise CprSettingError(f"{setting}: {path} did not open its QMP socket within {timeout:.0f}s")
                time.sleep(0.005)
            try:
                qmp.connect(sock, timeout)
                ver = qmp.execute("query-version")
                schema = qmp.execute("query-qmp-schema", timeout=timeout)
                devices = qmp.execute("qom-list-types", {"implements": "device", "abstract": False})
                objects = qmp.execute("qom-list-types", {"abstract": False})
                accels = qmp.execute("qom-list-types", {"implements": "accel", "abstract": False})
                machines = qmp.execute("query-machines")
                qmp.execute("quit")
            except Exception as exc:  # QEMU died or hung while being asked: the build is unusable
                if proc.poll() is None:
                    proc.kill()
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                said = out.strip().splitlines()[-1][:300] if out.strip() else str(exc)[:300]
                raise CprSettingError(f"{setting}: {path} failed while its capabilities were probed over QMP "
                                      f"({said}); give the path of a complete qemu-system-x86_64 >= 10.0 "
                                      "(with its modules)") from None
        finally:
            qmp.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
    q = ver["qemu"]
    build = QemuBuild(
        binary=path,
        version=(q["major"], q["minor"], q["micro"]),
        package=ver.get("package", ""),
        migration_modes=frozenset(_enum_values(schema, "migrate-set-parameters", "mode")),
        device_types=frozenset(d["name"] for d in devices),
        object_types=frozenset(o["name"] for o in objects),
        accels=frozenset(re.sub(r"-accel$", "", a["name"]) for a in accels),
        q35_machine=next((m["name"] for m in machines if m.get("alias") == "q35"), "q35"),
    )
    _CACHE[key] = build
    return build


def kvm_boots(binary: str, kernel: Path, timeout: float = 20.0) -> tuple[bool, str]:
    """Does KVM boot a guest kernel here? (A /dev/kvm that exists is not enough: nested or broken
    hosts abort on the first vCPU setup.) Returns (ok, reason)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    argv = [binary, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256M", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 earlyprintk=serial panic=-1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
                if b"Linux version" in seen:
                    return True, "KVM boots a guest kernel"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    text = seen.decode(errors="replace").strip().splitlines()
    return False, f"KVM did not boot a guest kernel: {text[0] if text else 'no console output'}"


def choose_accel(setting: str, build: QemuBuild, kernel: Path | None) -> Accel:
    """The accelerator for `setting` (auto, kvm, tcg): auto is KVM if it boots `kernel` with this build,
    else TCG; with no kernel to try, an accessible /dev/kvm is trusted."""
    if setting != Accel.AUTO:
        return Accel(setting)
    if Accel.KVM not in build.accels:
        return Accel.TCG
    if kernel is None:
        return Accel.KVM if os.access("/dev/kvm", os.R_OK | os.W_OK) else Accel.TCG
    return Accel.KVM if kvm_boots(build.binary, kernel)[0] else Accel.TCG
