"""Every pytest-cpr setting in one table, with one precedence rule: CLI > environment > ini > default.

The same table drives the pytest options, the ini keys, the environment variables, the report header
and validation, so a setting cannot exist in one place and not another.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprSettingError
from pytest_cpr.kinds import Accel, values
from pytest_cpr.units import parse_mib as parse_mib  # re-exported: its old home


@dataclass(frozen=True)
class Setting:
    key: str  # ini key and attribute name, e.g. "qemu"
    help: str
    default: str | None
    parse: Callable[[str], Any] = str
    fix: str = ""  # what a user should write instead, shown in errors

    @property
    def ini(self) -> str:
        return f"cpr_{self.key}"

    @property
    def option(self) -> str:
        return "--cpr-" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return f"CPR_{self.key.upper()}"

    def names(self) -> str:
        return f"{self.option} / {self.env} / ini {self.ini}"


MAX_COUNT = 1024  # vCPUs, boot attempts
MAX_SECONDS = 24 * 3600.0  # no wait of the harness is meant to last a day
PROBE_INTERVAL_MS = (0.5, 1000.0)  # below: a busy loop; above: no blackout measurement to speak of


def parse_positive_int(text: str) -> int:
    """A whole number from 1 to MAX_COUNT."""
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise ValueError(f"{n} is not positive")
    if n > MAX_COUNT:
        raise ValueError(f"{n} is above {MAX_COUNT}")
    return n


def _number(text: str) -> float:
    """A finite float: nan and inf (which float() accepts) are refused, they disable waits and checks."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text.strip()!r} is not a finite number")
    return value


def parse_seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise ValueError(f"{value} is not a positive number of seconds")
    if value > MAX_SECONDS:
        raise ValueError(f"{value:g} seconds is more than a day")
    return value


def parse_interval_ms(text: str) -> float:
    low, high = PROBE_INTERVAL_MS
    value = _number(text)
    if not low <= value <= high:
        raise ValueError(f"{value:g} ms is outside {low:g}..{high:g} ms")
    return value


def parse_optional_float(text: str) -> float | None:
    """A threshold: a finite number >= 0, or none/off/empty (no threshold)."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    value = _number(text)
    if value < 0:
        raise ValueError(f"{value:g} is negative")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def parse_accel(text: str) -> Accel:
    return Accel(choice(*values(Accel))(text))


SETTINGS: tuple[Setting, ...] = (
    Setting("qemu", "source QEMU binary (the build that boots the guest)", "qemu-system-x86_64",
            fix="a qemu-system-x86_64 path or name on PATH"),
    Setting("target_qemu", "target QEMU binary the guest is transferred to (default: the source binary)",
            None, fix="a qemu-system-x86_64 path or name on PATH"),
    Setting("cross_qemu", "a second build for the cross-version passthrough tests (test_cross_*): each runs "
            "the older build -> the newer and back, with the source build (none: they skip)", None,
            fix="a qemu-system-x86_64 path or name on PATH"),
    Setting("accel", "accelerator: auto (KVM where it boots a guest, else TCG), kvm or tcg", "auto",
            parse_accel, fix="auto, kvm or tcg"),
    Setting("image", "guest image directory (vmlinuz, initrd.img, rootfs.img); default: the cached "
            "build of images/guest", None, fix="a directory made by `cpr-image build guest`"),
    Setting("user_image", "your own cloud image (qcow2/raw with cloud-init) to boot instead of the built "
            "guest, through a NoCloud seed the plugin writes", None,
            fix="the path of a qcow2 or raw disk image with cloud-init"),
    Setting("cache_dir", "cache for built images", str(Path.home() / ".cache" / "pytest-cpr"),
            fix="a writable directory"),
    Setting("memory", "guest memory", "512M", parse_mib, fix="a size such as 512M or 2G"),
    Setting("cpus", "guest vCPUs", "1", parse_positive_int, fix="a whole number >= 1"),
    Setting("boot_timeout", "seconds from QEMU start to SSH ready", "240", parse_seconds,
            fix="a positive number of seconds"),
    Setting("boot_attempts", "boots a guest gets when one hangs before printing its host key (QEMU "
            "running, boot not finished): each retry is announced and the hung boot's logs kept; 1 on "
            "hardware, the virtual host sets 2 (nested emulation hangs an L2 boot now and then)", "1",
            parse_positive_int, fix="a whole number >= 1"),
    Setting("guest_cmdline", "more guest kernel parameters, after the plugin's (e.g. loglevel=7 to see how "
            "far a hanging boot gets; the plugin boots with quiet)", "", fix="kernel parameters, space separated"),
    Setting("transfer_timeout", "seconds for one cpr-transfer to complete", "120", parse_seconds,
            fix="a positive number of seconds"),
    Setting("command_timeout", "seconds for one guest command over SSH", "60", parse_seconds,
            fix="a positive number of seconds"),
    Setting("artifacts", "directory for per-test artifacts (logs, console, QMP transcript, plots)",
            "artifacts/cpr", fix="a writable directory"),
    Setting("keep_artifacts", "keep per-test artifacts: on-failure or always", "always",
            choice("on-failure", "always"), fix="on-failure or always"),
    Setting("vnet_hdr", "open the shared tap with IFF_VNET_HDR (offloads on, but the target QEMU "
            "resets the header length under the running source: frames are lost)", "off", parse_bool,
            fix="on or off"),
    Setting("channel_fd", "cpr-transfer: the harness listens on the cpr channel's UNIX socket itself and "
            "passes the new QEMU the listening fd (addr.type=fd), as management software does; off: QEMU "
            "listens on the path", "off", parse_bool, fix="on or off"),
    Setting("device_fds", "VFIO passthrough with the iommufd backend: the harness opens /dev/iommu and the "
            "devices' cdevs (/dev/vfio/devices/vfioN) itself and passes QEMU the fds (-object iommufd,fd=, "
            "-device vfio-pci,fd=), as management software does; the legacy backend has no fd to pass (QEMU "
            "opens its container and groups); off: QEMU opens them by path", "off", parse_bool,
            fix="on or off"),
    Setting("probe_interval_ms", "interval of the ICMP probe stream during transfers", "5", parse_interval_ms,
            fix="a number of milliseconds from 0.5 to 1000, e.g. 5"),
    Setting("max_blackout_ms", "fail a transfer whose guest-visible blackout exceeds this (none: record "
            "only)", None, parse_optional_float, fix="a number of milliseconds >= 0, or none"),
    Setting("max_lost_probes", "fail a transfer that loses more probes than this (none: record only)",
            None, parse_optional_float, fix="a count >= 0, or none"),
    Setting("max_dma_stall_ms", "fail a transfer whose longest stall of the NVMe DMA stream exceeds this "
            "(none: record only)", None, parse_optional_float, fix="a number of milliseconds >= 0, or none"),
    Setting("host_config", "host config file (TOML) describing passthrough devices", None,
            fix="the path of a TOML host config file"),
    Setting("strict", "turn 'host cannot serve this test' skips into failures (hardware CI)", "off",
            parse_bool, fix="on or off"),
    Setting("ioctl_shim", "the ioctl fault shim (pytest_cpr/qemu/ioctl_fault.c) built as a shared object, for "
            "hosts without a C compiler (none: built at test time with cc)", None,
            fix="the path of a shared object built from pytest_cpr/qemu/ioctl_fault.c"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def unknown_ini_keys(keys: Iterable[str]) -> list[str]:
    """One line per cpr_* ini key that is no setting (a typo is otherwise silently ignored)."""
    known = [s.ini for s in SETTINGS]
    lines = []
    for key in sorted(k for k in keys if k.startswith("cpr_") and k not in known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"pytest-cpr ini keys: {', '.join(known)}"
        lines.append(f"unknown pytest-cpr ini key {key}: {hint}")
    return lines


@dataclass(frozen=True)
class CprSettings:
    """Resolved settings, one typed field per row of SETTINGS (a unit test keeps the two in step);
    `source` tells where each value came from (cli, env, ini, default, host config)."""

    qemu: str
    target_qemu: str | None
    cross_qemu: str | None
    accel: Accel
    image: str | None
    user_image: str | None
    cache_dir: str
    memory: int
    cpus: int
    boot_timeout: float
    boot_attempts: int
    guest_cmdline: str
    transfer_timeout: float
    command_timeout: float
    artifacts: str
    keep_artifacts: str
    vnet_hdr: bool
    channel_fd: bool
    device_fds: bool
    probe_interval_ms: float
    max_blackout_ms: float | None
    max_lost_probes: float | None
    max_dma_stall_ms: float | None
    host_config: str | None
    strict: bool
    ioctl_shim: str | None
    source: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def target_qemu_binary(self) -> str:
        return str(self.target_qemu or self.qemu)

    def value(self, key: str) -> object:
        """The value of the setting `key` (a row of SETTINGS)."""
        return getattr(self, BY_KEY[key].key)

    def overridden(self, values: Mapping[str, str], where: str) -> CprSettings:
        """These settings with `values` (raw text, parsed by the table) taken from `where`."""
        parsed = {key: _parse(BY_KEY[key], raw, where) for key, raw in values.items()}
        return dataclasses.replace(self, **parsed,  # type: ignore[arg-type]
                                   source={**self.source, **dict.fromkeys(values, where)})

    def header_lines(self) -> list[str]:
        return [f"  {s.key} = {_shown(self.value(s.key))!r} ({self.source[s.key]})" for s in SETTINGS]


THRESHOLDS = ("max_blackout_ms", "max_lost_probes", "max_dma_stall_ms")


def thresholds_in_force(marker: Mapping[str, object], settings: CprSettings,
                        defaults: Mapping[str, float]) -> dict[str, float | None]:
    """Each threshold from the first of: the test's cpr_thresholds marker, the setting (CLI, env, ini;
    `none` there switches a default off), `defaults` (passthrough tests have some), none."""
    if unknown := sorted(set(marker) - set(THRESHOLDS)):
        raise ValueError(f"cpr_thresholds marker: unknown key {unknown[0]!r}; use {list(THRESHOLDS)}")
    values: dict[str, float | None] = {
        key: defaults.get(key) if settings.source.get(key, "default") == "default" else settings.value(key)  # type: ignore[misc]
        for key in THRESHOLDS}
    return {**values, **marker}  # type: ignore[dict-item]


def _shown(value: object) -> object:
    """A value as the header shows it: an enum as its plain string."""
    return value.value if isinstance(value, Enum) else value


def _parse(setting: Setting, raw: str, where: str) -> object:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise CprSettingError(f"setting {setting.names()} from {where}: {exc}; use {setting.fix}") from None


def resolve(cli: Mapping[str, str | None], env: Mapping[str, str] | None = None,
            ini: Mapping[str, str | None] | None = None) -> CprSettings:
    """Pick each setting from CLI, then environment, then ini, then default; parse and validate it."""
    env = os.environ if env is None else env
    ini = ini or {}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for s in SETTINGS:
        raw, where = s.default, "default"
        for origin, mapping, name in (("cli", cli, s.key), ("env", env, s.env), ("ini", ini, s.ini)):
            candidate = mapping.get(name)
            if candidate is not None and candidate != "":
                raw, where = candidate, origin
                break
        values[s.key] = None if raw is None else _parse(s, raw, where)
        source[s.key] = where
    return CprSettings(**values, source=source)
