"""pytest fixtures of VFIO: the host config and probe (session), the devices a test's `vfio` markers
ask for (bound per test, restored after), a booted guest with those devices passed through, and a
guest with a mediated device (mdev) of the host config's first [[mdev]] type.

Logic lives in pytest_cpr.host.{hostconfig,vfio,mdev} and pytest_cpr.passthrough (usable without
pytest); the hooks' helpers are in pytest_cpr.vfio_hooks. The domain names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_cpr.fixtures import host_unavailable
from pytest_cpr.host.hostconfig import HostConfig
from pytest_cpr.host.mdev import Mdev, guest_slot
from pytest_cpr.host.vfio import HostProbe, Passthrough, VfioBinding
from pytest_cpr.kinds import Backend
from pytest_cpr.passthrough import (
    NO_MDEV,
    HostWatch,
    NvmeDma,
    PassthroughGuest,
    VfioDevices,
    after_bind,
    build_reasons,
    mdev_unavailable,
    select,
)
from pytest_cpr.qemu.probe import QemuBuild
from pytest_cpr.settings import CprSettings
from pytest_cpr.vfio_hooks import HOST_CONFIG_KEY, NO_CONFIG, backends_for, host_probe, wants
from pytest_cpr.vm import CprVM

__all__ = ["NO_MDEV", "CprHost", "HostWatch", "NvmeDma", "PassthroughGuest", "VfioDevices", "_mdev_unavailable",
           "boot_passthrough_guest", "cpr_host", "cpr_mdev", "cpr_mdev_backend", "cpr_mdev_guest", "cpr_vfio",
           "cpr_vfio_backend", "cpr_vfio_guest", "passthrough_vm"]
_mdev_unavailable = mdev_unavailable  # the name tests/unit/test_mdev.py knows
VIOMMU_CMDLINE = ("intel_iommu=on", "iommu.passthrough=0")  # the guest translates its devices' DMA
VIOMMU_TRACE = ("iommufd_cdev_alloc_ioas",)  # the IOAS a QEMU allocates: test_viommu counts them


@dataclass
class CprHost:
    """The host config and the kernel probe of this session."""

    config: HostConfig
    probe: HostProbe


@pytest.fixture(scope="session")
def cpr_host(pytestconfig: pytest.Config, cpr_settings: CprSettings) -> CprHost:
    """The host config (--cpr-host-config, validated at startup) and the host's VFIO/iommufd probe,
    once per session. Skips (fails with --cpr-strict) when there is no host config."""
    config = pytestconfig.stash.get(HOST_CONFIG_KEY, None)
    if config is None:
        host_unavailable(NO_CONFIG, cpr_settings)
    return CprHost(config, host_probe(pytestconfig))


@pytest.fixture
def cpr_vfio_backend(request: pytest.FixtureRequest) -> Backend:
    """The VFIO backend of this test (legacy or iommufd): pytest-cpr parametrizes tests over the
    backends in the host config; a `vfio(backend=...)` or `iommufd` marker narrows that."""
    return Backend(getattr(request, "param", None) or backends_for(request.node, None)[0])


@pytest.fixture
def cpr_vfio(request: pytest.FixtureRequest, cpr_settings: CprSettings, cpr_source_build: QemuBuild,
             cpr_target_build: QemuBuild, cpr_vfio_backend: Backend) -> Iterator[VfioDevices]:
    """The devices the test's `vfio` markers ask for, with their IOMMU group companions, bound to
    vfio-pci for this test and given back to their drivers afterwards (also on failure or Ctrl-C).
    Skipped (failed with --cpr-strict) with the precise reason where the host or QEMU cannot serve;
    where QEMU would refuse cpr-transfer (`.blockers`), only `vfio_blocker` tests run. Records whether
    the host posts device interrupts (`cpr_posted_interrupts`: can the irq-bypass log check fire)."""
    want = wants(request.node)
    if not want:
        raise pytest.UsageError(f"{request.node.nodeid}: cpr_vfio needs a @pytest.mark.vfio(role=...) marker")
    expects_blocker = request.node.get_closest_marker("vfio_blocker") is not None
    unavailable, blockers = build_reasons(cpr_source_build, cpr_target_build, cpr_vfio_backend)
    if unavailable or (blockers and not expects_blocker):
        host_unavailable("; ".join(unavailable or blockers), cpr_settings)
    config = request.config.stash.get(HOST_CONFIG_KEY, None)
    if config is None:
        host_unavailable(NO_CONFIG, cpr_settings)
    probe = host_probe(request.config)
    if (reason := probe.missing(cpr_vfio_backend)) is not None:
        host_unavailable(reason, cpr_settings)
    chosen = select(config, want)
    if isinstance(chosen, str):
        host_unavailable(chosen, cpr_settings)
    binding = VfioBinding([d.address for d in chosen], config.paths)
    devices = VfioDevices(config, cpr_vfio_backend, [(d, Passthrough(d.address, d.index, d.role))
                                                     for d in chosen], binding, blockers)
    with binding:
        unserved = after_bind(devices, probe, expects_blocker)
        if unserved is not None:
            binding.restore()
            host_unavailable(unserved.reason, cpr_settings, unserved.lacking)
        request.node.user_properties.append(("cpr_vfio",
                                             f"{cpr_vfio_backend}: {', '.join(devices.addresses)}"))
        request.node.user_properties.append(("cpr_posted_interrupts", probe.posted.text()))
        yield devices


@pytest.fixture
def cpr_vfio_guest(request: pytest.FixtureRequest, cpr_vfio: VfioDevices, cpr_vm_factory: Callable[..., CprVM],
                   cpr_settings: CprSettings) -> PassthroughGuest:
    """A booted guest (full kernel, memory from the host config) with the test's VFIO devices on fixed
    guest PCI slots and its NICs addressed from the host config. cpr_vfio is set up first, so the
    guest is shut down before the devices go back to their drivers. With the `viommu` marker the
    guest has an intel-iommu (its kernel translating DMA) and QEMU traces its IOAS allocations."""
    viommu = request.node.get_closest_marker("viommu") is not None
    return boot_passthrough_guest(cpr_vfio, cpr_vm_factory, cpr_settings, viommu)


def boot_passthrough_guest(devices: VfioDevices, factory: Callable[..., CprVM], settings: CprSettings,
                           viommu: bool = False, cmdline: tuple[str, ...] = ()) -> PassthroughGuest:
    """What cpr_vfio_guest boots, for fixtures of a test module that add guest kernel parameters
    (`cmdline`, e.g. a driver's interrupt mode). With --cpr-device-fds (iommufd backend) QEMU gets the
    devices as fds the harness opens."""
    vm = passthrough_vm(devices, factory, settings, viommu=viommu, cmdline=cmdline,
                        device_fds=settings.device_fds and devices.backend == Backend.IOMMUFD)
    vm.boot()
    return PassthroughGuest(vm, devices)


@pytest.fixture
def cpr_mdev_backend() -> Backend:
    """The VFIO backend the mdev guest uses: legacy; a test parametrizes `cpr_mdev_backend` for iommufd."""
    return Backend.LEGACY


def passthrough_vm(devices: VfioDevices, cpr_vm_factory: Callable[..., CprVM], cpr_settings: CprSettings,
                   viommu: bool = False, device_fds: bool = False, cmdline: tuple[str, ...] = (),
                   **overrides: Any) -> CprVM:
    """A guest (not booted) with `devices` on fixed guest PCI slots, full kernel, memory from the host
    config; `device_fds`: QEMU gets the devices as fds the harness opens (iommufd backend)."""
    devices_by = {"fd_passing": devices.fd_passing()} if device_fds else {"extra_args": devices.qemu_args()}
    return cpr_vm_factory(**devices_by, kernel_flavor="full",
                          memory_mib=devices.host.memory_mib or cpr_settings.memory,
                          cmdline=(*devices.kernel_args(), *(VIOMMU_CMDLINE if viommu else ()), *cmdline),
                          viommu=viommu, trace_events=VIOMMU_TRACE if viommu else (), **overrides)


@pytest.fixture
def cpr_mdev(request: pytest.FixtureRequest, cpr_settings: CprSettings, cpr_source_build: QemuBuild,
             cpr_target_build: QemuBuild, cpr_mdev_backend: Backend) -> Iterator[Mdev]:
    """A new instance of the host config's first [[mdev]] type (UUID per test), removed after the test
    (also on failure or Ctrl-C; a killed run's instance is removed by the next run). Its guest PCI
    slot follows those of the config's passthrough devices. Skipped (failed with --cpr-strict) with
    the reason where the host or QEMU cannot serve; a host config without [[mdev]] skips also under
    --cpr-strict (the operator chose not to test mdevs)."""
    config = request.config.stash.get(HOST_CONFIG_KEY, None)
    if config is None:
        host_unavailable(NO_CONFIG, cpr_settings)
    if not config.mdevs:  # the operator chose not to configure mdev: no deficiency, a skip even when strict
        host_unavailable(NO_MDEV.format(path=config.path), cpr_settings, lacking=False)
    if (reason := mdev_unavailable(config, cpr_source_build, cpr_target_build, cpr_mdev_backend)) is not None:
        host_unavailable(reason, cpr_settings)
    first = config.mdevs[0]
    with Mdev(first.parent, first.type, config.paths, slot=guest_slot(len(config.devices))) as mdev:
        if cpr_mdev_backend == Backend.IOMMUFD and (reason := mdev.cdev_missing()) is not None:
            host_unavailable(reason, cpr_settings)
        request.node.user_properties.append(("cpr_mdev", f"{first.parent}/{first.type}: {mdev.uuid}"))
        yield mdev


@pytest.fixture
def cpr_mdev_guest(cpr_mdev: Mdev, cpr_vm_factory: Callable[..., CprVM], cpr_settings: CprSettings,
                   pytestconfig: pytest.Config, cpr_mdev_backend: Backend) -> tuple[CprVM, Mdev]:
    """(vm, mdev): a booted guest (full kernel, memory from the host config) with the mdev as vfio-pci
    on `cpr_mdev_backend` (legacy container, or iommufd) at `mdev.guest_address`. cpr_mdev is set up
    before cpr_vm_factory, so the guest's QEMU is shut down before the instance is removed (the
    kernel would block the removal of an mdev in use; Mdev refuses it with the holder's pid instead).
    A test that wants this order must not request cpr_vm_factory before cpr_mdev_guest."""
    host = pytestconfig.stash[HOST_CONFIG_KEY]
    assert host is not None  # cpr_mdev skipped otherwise
    iommufd = "iommufd-mdev" if cpr_mdev_backend == Backend.IOMMUFD else None
    vm = cpr_vm_factory(extra_args=tuple(cpr_mdev.qemu_args(iommufd_id=iommufd)), kernel_flavor="full",
                        memory_mib=host.memory_mib or cpr_settings.memory)
    vm.boot()
    return vm, cpr_mdev
