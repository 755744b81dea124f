"""pytest side of VFIO, hooks' half (plugin.py calls these): the host config loaded and validated at
startup, the host probe, the report header, the `vfio` markers read, tests parametrized over the
backends and grouped per device set for pytest-xdist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_cpr.host import hostconfig, vfio
from pytest_cpr.host.hostconfig import HostConfig, HostConfigError, HostPaths
from pytest_cpr.host.vfio import HostProbe
from pytest_cpr.kinds import Backend, Role
from pytest_cpr.passthrough import Want, select
from pytest_cpr.settings import CprSettings

HOST_CONFIG_KEY = pytest.StashKey[HostConfig | None]()
HOST_PROBE_KEY = pytest.StashKey[HostProbe]()
NO_CONFIG = ("no host config: this test needs passthrough devices; describe them in a TOML file and give it "
             "with --cpr-host-config / CPR_HOST_CONFIG / ini cpr_host_config (docs/hardware-runners.md)")


def configure(config: pytest.Config, settings: CprSettings) -> CprSettings:
    """Load and validate the host config before anything starts; returns the settings with its
    qemu/target_qemu/accel taking over for this host (shown as 'host config' in the header)."""
    config.addinivalue_line("markers", "vfio_blocker: the test expects QEMU to refuse cpr-transfer of "
                            "its vfio devices (a kernel or QEMU feature is missing); skipped where nothing "
                            "blocks")
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): pytest-xdist group (set by pytest-cpr)")
    host: HostConfig | None = None
    if settings.host_config:
        try:
            host = hostconfig.load(Path(settings.host_config))
        except HostConfigError as exc:
            raise pytest.UsageError(str(exc)) from None
        given = {"qemu": host.qemu, "target_qemu": host.target_qemu, "accel": host.accel}
        settings = settings.overridden({k: v for k, v in given.items() if v is not None},
                                       f"host config {host.path}")
    config.stash[HOST_CONFIG_KEY] = host
    return settings


def host_probe(config: pytest.Config) -> HostProbe:
    if HOST_PROBE_KEY not in config.stash:
        host = config.stash.get(HOST_CONFIG_KEY, None)
        config.stash[HOST_PROBE_KEY] = vfio.probe_host(host.paths if host else HostPaths())
    return config.stash[HOST_PROBE_KEY]


def header_lines(config: pytest.Config) -> list[str]:
    host = config.stash.get(HOST_CONFIG_KEY, None)
    described = host.describe() if host else "none (--cpr-host-config): passthrough tests skip"
    lines = ["pytest-cpr host (VFIO):", f"  host config: {described}"]
    try:
        lines += host_probe(config).header_lines()
    except OSError as exc:
        lines.append(f"  probe failed: {exc}")
    return lines


def wants(node: pytest.Item | Any) -> list[Want]:
    """What the test's `vfio` markers ask for (several markers: several roles)."""
    out = []
    for mark in node.iter_markers("vfio"):
        role = mark.kwargs.get("role", mark.args[0] if mark.args else "nic")
        if role not in hostconfig.ROLES:
            raise pytest.UsageError(f"{node.nodeid}: vfio marker role={role!r}: use one of "
                                    f"{hostconfig.ROLES}")
        backend = mark.kwargs.get("backend")
        if backend is not None and backend not in hostconfig.BACKENDS:
            raise pytest.UsageError(f"{node.nodeid}: vfio marker backend={backend!r}: use one of "
                                    f"{hostconfig.BACKENDS}")
        out.append(Want(Role(role), int(mark.kwargs.get("count", 1)), None if backend is None else Backend(backend)))
    return out


def backends_for(node: Any, host: HostConfig | None) -> list[Backend]:
    """Backends a test runs on: its marker's backend, else `iommufd` marker, else the host's."""
    fixed = {w.backend for w in wants(node) if w.backend}
    if node.get_closest_marker("iommufd") is not None:
        fixed.add(Backend.IOMMUFD)
    if len(fixed) > 1:
        raise pytest.UsageError(f"{node.nodeid}: vfio markers ask for backends {sorted(map(str, fixed))}; one test "
                                "runs on one backend")
    if fixed:
        return sorted(fixed)
    return [Backend(b) for b in (host.backends if host else hostconfig.BACKENDS)]


def generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cpr_vfio_backend" in metafunc.fixturenames:
        host = metafunc.config.stash.get(HOST_CONFIG_KEY, None)
        metafunc.parametrize("cpr_vfio_backend", backends_for(metafunc.definition, host), indirect=True)


def group_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """xdist_group per set of devices: tests sharing a device (directly or through another test)
    share a group, so pytest-xdist --dist loadgroup never binds one device twice at once."""
    host = config.stash.get(HOST_CONFIG_KEY, None)
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    per_item: dict[str, list[str]] = {}
    for item in items:
        want = wants(item)
        if not want:
            continue
        chosen = select(host, want) if host else "none"
        addresses = [d.address for d in chosen] if isinstance(chosen, list) else ["unassigned"]
        per_item[item.nodeid] = addresses
        for a in addresses[1:]:
            parent[find(a)] = find(addresses[0])
    members: dict[str, set[str]] = {}
    for addresses in per_item.values():
        members.setdefault(find(addresses[0]), set()).update(addresses)
    for item in items:
        if item.nodeid in per_item:
            name = "vfio-" + "+".join(sorted(members[find(per_item[item.nodeid][0])]))
            item.add_marker(pytest.mark.xdist_group(name))
