from __future__ import annotations

import dataclasses

import pytest

from pytest_cpr.errors import CprError, CprSettingError
from pytest_cpr.kinds import Accel
from pytest_cpr.qemu.qmp import QmpError
from pytest_cpr.settings import BY_KEY, SETTINGS, CprSettings, parse_mib, resolve


def test_precedence_cli_over_env_over_ini_over_default() -> None:
    ini = {"cpr_memory": "1G", "cpr_cpus": "2", "cpr_accel": "kvm"}
    env = {"CPR_MEMORY": "768M", "CPR_CPUS": "3"}
    cli = {"memory": "2G"}
    s = resolve(cli, env, ini)
    assert (s.memory, s.source["memory"]) == (2048, "cli")
    assert (s.cpus, s.source["cpus"]) == (3, "env")
    assert (s.accel, s.source["accel"]) == ("kvm", "ini")
    assert (s.qemu, s.source["qemu"]) == ("qemu-system-x86_64", "default")


def test_target_defaults_to_source_binary() -> None:
    s = resolve({}, {"CPR_QEMU": "/opt/a/qemu"}, {})
    assert s.target_qemu_binary == "/opt/a/qemu"
    s = resolve({}, {"CPR_QEMU": "/opt/a/qemu", "CPR_TARGET_QEMU": "/opt/b/qemu"}, {})
    assert s.target_qemu_binary == "/opt/b/qemu"


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("memory", "lots", "512M or 2G"),
    ("memory", "16M", "512M or 2G"),
    ("cpus", "0", "whole number"),
    ("accel", "hvf", "auto, kvm or tcg"),
    ("boot_timeout", "-5", "positive number"),
    ("vnet_hdr", "maybe", "on or off"),
    ("boot_timeout", "nan", "'nan' is not a finite number; use a positive number of seconds"),
    ("transfer_timeout", "inf", "'inf' is not a finite number"),
    ("command_timeout", "-inf", "'-inf' is not a finite number"),
    ("command_timeout", "0", "0.0 is not a positive number of seconds"),
    ("boot_timeout", "1e9", "1e+09 seconds is more than a day"),
    ("probe_interval_ms", "0", "0 ms is outside 0.5..1000 ms; use a number of milliseconds from 0.5"),
    ("probe_interval_ms", "-5", "-5 ms is outside"),
    ("probe_interval_ms", "nan", "'nan' is not a finite number"),
    ("probe_interval_ms", "fast", "'fast' is not a number"),
    ("max_blackout_ms", "nan", "'nan' is not a finite number; use a number of milliseconds >= 0, or none"),
    ("max_blackout_ms", "-1", "-1 is negative"),
    ("max_lost_probes", "inf", "'inf' is not a finite number"),
    ("memory", "99999999T", "'99999999T' is above 1T"),
    ("cpus", "100000", "100000 is above 1024"),
    ("cpus", "nan", "'nan' is not a whole number"),
])
def test_bad_values_nan_inf_and_bounds_name_the_setting_and_the_fix(key: str, value: str, fix: str) -> None:
    with pytest.raises(CprSettingError) as err:
        resolve({key: value}, {}, {})
    msg = str(err.value)
    assert BY_KEY[key].option in msg and BY_KEY[key].env in msg and fix in msg
    assert "\n" not in msg


def test_every_setting_has_three_names_and_a_fix() -> None:
    for s in SETTINGS:
        assert s.option.startswith("--cpr-") and s.env.startswith("CPR_") and s.ini.startswith("cpr_")
        assert s.fix, s.key


@pytest.mark.parametrize(("text", "mib"), [("512M", 512), ("2G", 2048), ("1024", 1024), ("1GiB", 1024)])
def test_parse_mib(text: str, mib: int) -> None:
    assert parse_mib(text) == mib


def test_header_shows_every_setting_and_its_source() -> None:
    lines = resolve({"cpus": "2"}, {}, {}).header_lines()
    assert len(lines) == len(SETTINGS)
    assert any("cpus = 2 (cli)" in ln for ln in lines)


def test_settings_fields_follow_the_table() -> None:
    """Each row of SETTINGS is a typed field of CprSettings, in the table's order, and nothing else."""
    fields = [f.name for f in dataclasses.fields(CprSettings) if f.name != "source"]
    assert fields == [s.key for s in SETTINGS]


def test_host_config_values_go_through_the_table() -> None:
    s = resolve({"accel": "tcg"}, {}, {}).overridden({"accel": "kvm"}, "host config /h.toml")
    assert (s.accel, s.source["accel"]) == (Accel.KVM, "host config /h.toml")
    with pytest.raises(CprSettingError, match=r"from host config /h\.toml"):
        s.overridden({"accel": "hvf"}, "host config /h.toml")


def test_qmp_error_is_a_cpr_error() -> None:
    assert issubclass(QmpError, CprError)


@pytest.mark.parametrize(("key", "value", "parsed"), [
    ("probe_interval_ms", "0.5", 0.5), ("probe_interval_ms", "1000", 1000.0), ("max_blackout_ms", "0", 0.0),
    ("max_blackout_ms", "none", None), ("boot_timeout", "86400", 86400.0), ("memory", "1T", 1024 * 1024),
    ("cpus", "1024", 1024),
])
def test_values_at_the_bounds_are_accepted(key: str, value: str, parsed: object) -> None:
    assert getattr(resolve({key: value}, {}, {}), key) == parsed
