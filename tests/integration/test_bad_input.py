"""Bad input, as a user meets it: each case runs pytest in a subprocess on a small test file and checks
what that user sees. Every case must give one line that names the setting (or input) and the fix,
as an error, a usage error or a skip reason; never a traceback into the plugin; and leave nothing
behind (no QEMU process, no namespace, no registry record).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_cpr import leftovers
from pytest_cpr.images import cached_path, file_hashes
from pytest_cpr.settings import BY_KEY

pytestmark = pytest.mark.timeout(600)

OLD_QEMU_VERSION = "1:7.2+dfsg-7+deb12u18+b3"  # Debian bookworm: QEMU 7.2, no cpr-transfer (10.0+)
OLD_QEMU_DIR = Path.home() / ".cache" / "pytest-cpr" / "old-qemu"
OLD_QEMU_BIN = OLD_QEMU_DIR / "root" / "usr" / "bin" / "qemu-system-x86_64"

BOOT_TEST = """
import pytest
pytestmark = pytest.mark.cpr(mode="cpr-transfer")

def test_guest(cpr_vm):
    cpr_vm.run("true")
"""

SETTINGS_TEST = """
def test_settings(cpr_settings):
    assert cpr_settings.memory
"""

SSH_REFUSED_TEST = """
import pytest
from pytest_cpr.guest.ssh import SessionKey
pytestmark = pytest.mark.cpr(mode="cpr-transfer")

def test_guest(cpr_vm_factory, tmp_path):
    stranger = SessionKey(tmp_path / "stranger")  # the guest authorizes this key, not the session's
    vm = cpr_vm_factory(cmdline=(f"cpr.sshkey={stranger.public_base64}",))
    vm.boot()
"""

# unshare + setpriv: /dev/net/tun replaced (in a private mount namespace) by a mode-000 node and the
# harness run as root without CAP_DAC_OVERRIDE: exactly what a user without access to the device sees.
NO_TUN = ('set -e; mknod "$1/tun" c 10 200; chmod 000 "$1/tun"; mount --bind "$1/tun" /dev/net/tun; '
          'shift; exec setpriv --bounding-set -dac_override,-dac_read_search -- "$@"')


@dataclass
class Case:
    name: str
    expect: str  # "error" (setup error), "failed", "skipped" or "usage" (pytest exit code 4)
    pattern: str  # regex of the one line the user must see
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    ini: str = ""
    test: str = BOOT_TEST
    prepare: Callable[[Path], object] | None = None
    no_tun: bool = False


def _image_dir(tmp: Path, name: str, **replace: bytes | None) -> Path:
    """A copy-by-symlink of the built guest image with some files replaced (bytes) or missing (None)."""
    real = cached_path("guest", Path(str(BY_KEY["cache_dir"].default)))
    if not real.is_dir():
        pytest.skip(f"guest image not built ({real}): run `cpr-image build guest`")
    d = tmp / name
    d.mkdir()
    for f in ("vmlinuz", "initrd.img", "rootfs.img"):
        if f not in replace:
            (d / f).symlink_to(real / f)
        elif (content := replace[f]) is not None:
            (d / f).write_bytes(content)
    return d


def _cache_entry(tmp: Path, hashes: bool = True) -> Path:
    """A cache {tmp}/cache whose guest entry (current recipe) has small files and a manifest: what is
    checked first is the manifest, before the files are looked at as an image."""
    entry = cached_path("guest", tmp / "cache")
    entry.mkdir(parents=True)
    for f in ("vmlinuz", "initrd.img", "rootfs.img"):
        (entry / f).write_text(f)
    manifest = {"name": "guest", **({"files": file_hashes(entry)} if hashes else {})}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


def _poisoned_entry(tmp: Path) -> None:
    (_cache_entry(tmp) / "vmlinuz").write_text("another kernel")


def _loose_cache(tmp: Path) -> None:
    (_cache_entry(tmp).parent).chmod(0o777)


def _empty_ext4(tmp: Path) -> None:
    """A guest image whose root filesystem is a valid but empty ext4: the kernel finds no init."""
    d = _image_dir(tmp, "emptyroot", **{"rootfs.img": None})
    subprocess.run(["mkfs.ext4", "-q", "-F", str(d / "rootfs.img"), "16M"], check=True, timeout=60,
                   capture_output=True)


def _bad_pci_config(tmp: Path) -> None:
    (tmp / "host.toml").write_text('[host]\nname = "bad-input"\n\n[[device]]\naddress = "0000:zz:00.0"\n'
                                   'role = "nic"\n')


def _host_config(text: str) -> Callable[[Path], object]:
    """Writes host.toml (a format error: it is refused before anything on the host is looked at)."""
    return lambda tmp: (tmp / "host.toml").write_text(text)


NIC_ENTRY = ('[[device]]\naddress = "0000:01:00.0"\nrole = "nic"\nguest_ip = "10.78.0.2/24"\n'
             'peer_ip = "10.78.0.1/24"\n')
HOST_CONFIG = ("--cpr-host-config={tmp}/host.toml",)
SECONDS = "use a positive number of seconds$"
MILLISECONDS = "use a number of milliseconds >= 0, or none$"


def _setting(key: str, where: str) -> str:
    """The start of the one line a bad setting gives: its three names and where the value came from."""
    return (rf"^ERROR: setting --cpr-{key.replace('_', '-')} / CPR_{key.upper()} / ini cpr_{key} "
            rf"from {where}: ")


def _not_executable(tmp: Path) -> None:
    (tmp / "qemu-noexec").write_text("#!/bin/sh\n")
    (tmp / "qemu-noexec").chmod(0o644)


CASES = [
    Case("qemu-path-missing", "error", r"\[pytest-cpr\] --cpr-qemu / CPR_QEMU: QEMU binary "
         r"'/nonexistent/qemu-system-x86_64' not found or not executable; install qemu-system-x86",
         args=("--cpr-qemu=/nonexistent/qemu-system-x86_64",)),
    Case("qemu-not-executable", "error", r"--cpr-qemu / CPR_QEMU: QEMU binary '.*qemu-noexec' not found or "
         r"not executable", args=("--cpr-qemu={tmp}/qemu-noexec",), prepare=_not_executable),
    Case("qemu-not-qemu", "error", r"--cpr-qemu / CPR_QEMU: /usr/bin/true is not a working QEMU system "
         r"emulator .*give the path of a qemu-system-x86_64 >= 10.0", args=("--cpr-qemu=/bin/true",)),
    Case("target-qemu-path-missing", "error", r"--cpr-target-qemu / CPR_TARGET_QEMU: QEMU binary "
         r"'/nonexistent/qemu' not found", env={"CPR_TARGET_QEMU": "/nonexistent/qemu"}),
    Case("qemu-without-cpr-transfer", "skipped", r"\(QEMU 7\.2\.\d+ .*\) lacks migration mode cpr-transfer "
         r"\(QEMU >= 10\.0\); set --cpr-qemu to a build that has it", args=("--cpr-qemu={old_qemu}",)),
    Case("target-without-cpr-transfer", "skipped", r"QEMU 7\.2\.\d+ .* lacks migration mode cpr-transfer "
         r".*; set --cpr-target-qemu to a build", args=("--cpr-target-qemu={old_qemu}",)),
    Case("image-missing", "error", r"--cpr-image / CPR_IMAGE: guest image /nonexistent/image does not "
         r"exist; build it with `cpr-image build guest`", args=("--cpr-image=/nonexistent/image",)),
    Case("image-missing-kernel", "error", r"--cpr-image / CPR_IMAGE: guest image .*/nokernel has no "
         r"vmlinuz .*rebuild with `cpr-image build guest --force`", args=("--cpr-image={tmp}/nokernel",),
         prepare=lambda t: _image_dir(t, "nokernel", vmlinuz=None)),
    Case("image-corrupt-rootfs", "error", r"--cpr-image / CPR_IMAGE: .*/badroot/rootfs.img is not an ext4 "
         r"image \(corrupt\); rebuild", args=("--cpr-image={tmp}/badroot",),
         prepare=lambda t: _image_dir(t, "badroot", **{"rootfs.img": b"\x01" * 65536})),
    Case("image-corrupt-kernel", "error", r"--cpr-image / CPR_IMAGE: .*/badkernel/vmlinuz is not a bootable "
         r"x86 kernel; rebuild", args=("--cpr-image={tmp}/badkernel",),
         prepare=lambda t: _image_dir(t, "badkernel", vmlinuz=b"\x7fELF" + b"\0" * 8192)),
    Case("image-not-built", "skipped", r"guest image not built \(.*emptycache/images/guest-[0-9a-f]+ "
         r"missing\): run `cpr-image build guest` \(or set --cpr-image / CPR_IMAGE\)",
         args=("--cpr-cache-dir={tmp}/emptycache",)),
    Case("cache-entry-poison-file-changed", "error", r"image cache entry .*/cache/images/guest-[0-9a-f]{16}: "
         r"vmlinuz does not match its manifest \(sha256:.*\): rebuild it with `cpr-image build guest --force`$",
         args=("--cpr-cache-dir={tmp}/cache",), prepare=_poisoned_entry),
    Case("cache-entry-manifest-without-hashes", "error", r"image cache entry .*/guest-[0-9a-f]{16} has no file "
         r"hashes in its manifest \(built by an older pytest-cpr, or not by cpr-image\): rebuild it with "
         r"`cpr-image build guest --force`$", args=("--cpr-cache-dir={tmp}/cache",),
         prepare=lambda t: _cache_entry(t, hashes=False)),
    Case("cache-dir-writable-by-others", "error", r"image cache .*/cache/images is writable by group or others "
         r"\(mode 777\): pytest-cpr runs what it holds .*point --cpr-cache-dir / CPR_CACHE_DIR at one$",
         args=("--cpr-cache-dir={tmp}/cache",), prepare=_loose_cache),
    Case("memory-not-a-size", "usage", r"^ERROR: setting --cpr-memory / CPR_MEMORY / ini cpr_memory from "
         r"cli: '12X' is not a size; use a size such as 512M or 2G$", args=("--cpr-memory=12X",)),
    Case("memory-too-small", "usage", r"setting --cpr-memory .* from env: '32M' is below 64 MiB, too small "
         r"to boot a guest; use a size such as 512M", env={"CPR_MEMORY": "32M"}),
    Case("cpus-zero", "usage", r"setting --cpr-cpus .* from cli: 0 is not positive; use a whole number >= 1",
         args=("--cpr-cpus=0",)),
    Case("accel-unknown-ini-value", "usage", r"setting --cpr-accel / CPR_ACCEL / ini cpr_accel from ini: "
         r"'xen' is not one of auto, kvm, tcg; use auto, kvm or tcg", ini="cpr_accel = xen"),
    Case("unknown-ini-key", "usage", r"^ERROR: unknown pytest-cpr ini key cpr_memroy: did you mean "
         r"cpr_memory\?$", ini="cpr_memroy = 1G", test=SETTINGS_TEST),
    Case("boot-timeout-negative", "usage", r"setting --cpr-boot-timeout .*: -5.0 is not a positive number "
         r"of seconds; use a positive number of seconds", args=("--cpr-boot-timeout=-5",)),
    Case("strict-not-boolean", "usage", r"setting --cpr-strict / CPR_STRICT / ini cpr_strict from env: "
         r"'maybe' is not a boolean; use on or off", env={"CPR_STRICT": "maybe"}),
    Case("keep-artifacts-unknown", "usage", r"setting --cpr-keep-artifacts .*: 'never' is not one of "
         r"on-failure, always; use on-failure or always", args=("--cpr-keep-artifacts=never",)),
    Case("artifacts-unwritable", "error", r"--cpr-artifacts / CPR_ARTIFACTS / ini cpr_artifacts: cannot "
         r"create /proc/cpr-artifacts/.*; use a writable directory",
         args=("--cpr-artifacts=/proc/cpr-artifacts",)),
    Case("host-config-missing", "usage", r"--cpr-host-config / CPR_HOST_CONFIG", args=(
         "--cpr-host-config={tmp}/missing.toml",)),
    Case("host-config-bad-pci-address", "usage", r"host\.toml: device\[0\]\.address = '0000:zz:00\.0': not "
         r"a PCI address; write domain:bus:slot\.function", args=("--cpr-host-config={tmp}/host.toml",),
         prepare=_bad_pci_config),
    # numbers: nan and inf (float() takes both) would make waits unbounded and switch checks off
    Case("boot-timeout-nan", "usage", _setting("boot_timeout", "cli") + rf"'nan' is not a finite number; {SECONDS}",
         args=("--cpr-boot-timeout=nan",)),
    Case("boot-timeout-inf", "usage", _setting("boot_timeout", "env") + rf"'inf' is not a finite number; {SECONDS}",
         env={"CPR_BOOT_TIMEOUT": "inf"}),
    Case("boot-timeout-zero", "usage", _setting("boot_timeout", "cli") + rf"0\.0 is not a positive number of "
         rf"seconds; {SECONDS}", args=("--cpr-boot-timeout=0",)),
    Case("transfer-timeout-nan-ini", "usage", _setting("transfer_timeout", "ini") + rf"'NaN' is not a finite "
         rf"number; {SECONDS}", ini="cpr_transfer_timeout = NaN"),
    Case("command-timeout-inf", "usage", _setting("command_timeout", "cli") + rf"'-inf' is not a finite number; "
         rf"{SECONDS}", args=("--cpr-command-timeout=-inf",)),
    Case("command-timeout-more-than-a-day", "usage", _setting("command_timeout", "cli") + rf"1e\+09 seconds is "
         rf"more than a day; {SECONDS}", args=("--cpr-command-timeout=1e9",)),
    Case("probe-interval-zero", "usage", _setting("probe_interval_ms", "cli") + r"0 ms is outside 0\.5\.\.1000 "
         r"ms; use a number of milliseconds from 0\.5 to 1000, e\.g\. 5$", args=("--cpr-probe-interval-ms=0",)),
    Case("probe-interval-negative", "usage", _setting("probe_interval_ms", "cli") + r"-5 ms is outside 0\.5\.\.1000 "
         r"ms; use a number of milliseconds", args=("--cpr-probe-interval-ms=-5",)),
    Case("probe-interval-nan", "usage", _setting("probe_interval_ms", "env") + r"'nan' is not a finite number; "
         r"use a number of milliseconds from 0\.5 to 1000", env={"CPR_PROBE_INTERVAL_MS": "nan"}),
    Case("probe-interval-inf", "usage", _setting("probe_interval_ms", "ini") + r"'inf' is not a finite number; "
         r"use a number of milliseconds", ini="cpr_probe_interval_ms = inf"),
    Case("max-blackout-nan", "usage", _setting("max_blackout_ms", "cli") + rf"'nan' is not a finite number; "
         rf"{MILLISECONDS}", args=("--cpr-max-blackout-ms=nan",)),
    Case("max-blackout-inf", "usage", _setting("max_blackout_ms", "env") + rf"'inf' is not a finite number; "
         rf"{MILLISECONDS}", env={"CPR_MAX_BLACKOUT_MS": "inf"}),
    Case("max-blackout-negative", "usage", _setting("max_blackout_ms", "cli") + rf"-1 is negative; {MILLISECONDS}",
         args=("--cpr-max-blackout-ms=-1",)),
    Case("max-lost-probes-nan", "usage", _setting("max_lost_probes", "ini") + r"'nan' is not a finite number; "
         r"use a count >= 0, or none$", ini="cpr_max_lost_probes = nan"),
    Case("memory-above-1t", "usage", _setting("memory", "cli") + r"'99999999T' is above 1T, more than a test "
         r"guest can get; use a size such as 512M or 2G$", args=("--cpr-memory=99999999T",)),
    Case("cpus-above-1024", "usage", _setting("cpus", "cli") + r"100000 is above 1024; use a whole number >= 1$",
         args=("--cpr-cpus=100000",)),
    Case("cpus-nan", "usage", _setting("cpus", "env") + r"'nan' is not a whole number; use a whole number >= 1$",
         env={"CPR_CPUS": "nan"}),
    # host config structure: one line each, no traceback, nothing on the host looked at
    Case("host-config-device-not-a-table", "usage", r"host\.toml: device\[0\] = 'x': must be a table; write "
         r"\[\[device\]\] with address = \.\.\. and role = \.\.\. below it$", args=HOST_CONFIG,
         prepare=_host_config('device = ["x"]\n')),
    Case("host-config-device-a-number", "usage", r"host\.toml: device\[0\] = 1: must be a table; write "
         r"\[\[device\]\]", args=HOST_CONFIG, prepare=_host_config("device = [1]\n")),
    Case("host-config-not-toml", "usage", r"host\.toml: not valid TOML: .*line 2.*; fix the syntax$",
         args=HOST_CONFIG, prepare=_host_config("[host]\nname runner\n")),
    Case("host-config-peer-interface-path", "usage", r"host\.toml: device\[0\]\.peer_interface = '\.\./eth0': "
         r"not a plain name \(letters, digits, '_', '\.', ':', '-'\); write e\.g\. \"enp0s5\"$", args=HOST_CONFIG,
         prepare=_host_config(NIC_ENTRY + 'peer_interface = "../eth0"\n')),
    Case("host-config-mdev-parent-dotdot", "usage", r"host\.toml: mdev\[0\]\.parent = '\.\.': not a plain name",
         args=HOST_CONFIG, prepare=_host_config('[[mdev]]\nparent = ".."\ntype = "mtty-2"\n')),
    Case("host-config-scratch-not-bool", "usage", r"host\.toml: device\[0\]\.scratch = 'yes': must be a bool; "
         r"write e\.g\. true$", args=HOST_CONFIG,
         prepare=_host_config('[[device]]\naddress = "0000:02:00.0"\nrole = "nvme"\nscratch = "yes"\n')),
    Case("state-dir-writable-by-others", "usage", r"^ERROR: state directory .*/state \(CPR_STATE_DIR\) is "
         r"writable by group or others \(mode 777\): its records are acted on as root; make it a root-owned "
         r"directory with mode 700", test=SETTINGS_TEST, prepare=lambda t: (t / "state").mkdir(mode=0o777)
         or (t / "state").chmod(0o777)),
    Case("no-permission-dev-net-tun", "error", r"\[pytest-cpr\] .*no permission to open /dev/net/tun .*run "
         r"as root, or give this user read/write access to /dev/net/tun", no_tun=True),
    Case("boot-timeout-too-small", "error", r"\[pytest-cpr\] guest vm0 did not boot \(--cpr-boot-timeout "
         r"1s; logs: .*\): console: the guest's SSH host key \(CPR-HOSTKEY line\) not seen within 1s",
         args=("--cpr-boot-timeout=1",)),
    Case("guest-never-boots", "error", r"\[pytest-cpr\] guest vm0 did not boot \(--cpr-boot-timeout 120s; "
         r"logs: .*\): console closed while waiting for the guest's SSH host key",
         args=("--cpr-image={tmp}/emptyroot", "--cpr-boot-timeout=120"), prepare=_empty_ext4),
    Case("ssh-key-refused", "failed", r"CprError: SSH to 10\.77\.0\.\d+: the guest refused the session key "
         r".*cpr\.sshkey= on the kernel command line must carry the session's public key",
         test=SSH_REFUSED_TEST),
]


@pytest.fixture(scope="session")
def old_qemu() -> Path:
    """QEMU 7.2 (Debian bookworm), a real build without cpr-transfer: extracted from its .deb once
    into ~/.cache/pytest-cpr/old-qemu (apt-get download + dpkg-deb -x)."""
    if not OLD_QEMU_BIN.exists():
        debs = OLD_QEMU_DIR / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        # the binary alone cannot run: its accelerator modules are in qemu-system-common, firmware in -data
        data_version = OLD_QEMU_VERSION.rsplit("+b", 1)[0]  # arch-all package: no binNMU suffix
        got = subprocess.run(["apt-get", "download", f"qemu-system-x86={OLD_QEMU_VERSION}",
                              f"qemu-system-common={OLD_QEMU_VERSION}", f"qemu-system-data={data_version}"],
                             cwd=debs, capture_output=True, text=True, timeout=300)
        if got.returncode != 0:
            pytest.skip(f"cannot fetch QEMU {OLD_QEMU_VERSION} (apt-get download): "
                        f"{got.stderr.strip()[:200]}")
        for deb in debs.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(OLD_QEMU_DIR / "root")], check=True, timeout=120)
    ran = subprocess.run([str(OLD_QEMU_BIN), "--version"], capture_output=True, text=True, timeout=30)
    if ran.returncode != 0 or "version 7.2" not in ran.stdout:
        pytest.skip(f"{OLD_QEMU_BIN} does not run here: {(ran.stderr or ran.stdout).strip()[:200]}")
    return OLD_QEMU_BIN


def _netns_of_dead_owners() -> set[str]:
    """cprt-<pid>-* namespaces whose harness process is gone (a live harness may own its own)."""
    netns_dir = Path("/var/run/netns")
    names = set()
    for p in netns_dir.iterdir() if netns_dir.is_dir() else ():
        m = re.match(r"^cprt-(\d+)-", p.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            names.add(p.name)
    return names


def _processes_mentioning(text: str) -> list[str]:
    return [f"{p.pid} {p.cmdline[:120]!r}" for p in leftovers.processes()
            if text.encode() in p.cmdline and p.pid != os.getpid()]


def _run(pytester: pytest.Pytester, case: Case, old_qemu: Path) -> tuple[int, str]:
    tmp = pytester.path
    if case.prepare is not None:
        case.prepare(tmp)
    pytester.makepyfile(test_case=case.test)
    if case.ini:
        pytester.makeini(f"[pytest]\n{case.ini}\n")
    args = [a.format(tmp=tmp, old_qemu=old_qemu) for a in case.args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPR_", "PYTEST_"))}
    # pytester points HOME at its tmp dir: name the real image cache
    env |= {"CPR_STATE_DIR": str(tmp / "state"), "CPR_CACHE_DIR": str(BY_KEY["cache_dir"].default),
            **case.env}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-o",
           "console_output_style=classic", *args]
    if case.no_tun:
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NO_TUN, "sh", str(tmp),
               *cmd]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"bad input {case.name}: the pytest run hung for 300s (interrupted):\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, pytester: pytest.Pytester, old_qemu: Path) -> None:
    """One bad input -> one clear line (error, usage error or skip) naming the setting and the fix;
    no traceback into the plugin; nothing left behind."""
    if case.no_tun and not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("unshare/setpriv (util-linux) not installed")
    stale_before = _netns_of_dead_owners()
    code, out = _run(pytester, case, old_qemu)
    shown = f"--- what the user saw (exit code {code}) ---\n{out}"
    lines = [ln for ln in out.splitlines() if re.search(case.pattern, ln)]
    assert lines, f"bad input {case.name}: no line matches {case.pattern!r}\n{shown}"
    print(f"[bad input {case.name}] {case.expect}: {lines[0].strip()}")
    assert "Traceback (most recent call last)" not in out, f"bad input {case.name}: a traceback\n{shown}"
    assert "During handling of the above exception" not in out, f"{case.name}: chained exceptions\n{shown}"
    plugin_frames = re.findall(r"pytest_cpr/[\w/]+\.py:\d+", out)
    assert not plugin_frames, f"bad input {case.name}: frames inside the plugin {plugin_frames}\n{shown}"
    expected = {"usage": code == 4, "error": " 1 error" in out and code == 1,
                "failed": " 1 failed" in out and code == 1, "skipped": " 1 skipped" in out and code == 0}
    assert expected[case.expect], f"bad input {case.name}: expected {case.expect}\n{shown}"
    state = pytester.path / "state"
    records = sorted(p.name for p in state.glob("*.json")) if state.is_dir() else []
    left = records + _processes_mentioning(str(pytester.path))
    left += sorted(_netns_of_dead_owners() - stale_before)
    assert not left, f"bad input {case.name} left behind: {left}\n{shown}"
