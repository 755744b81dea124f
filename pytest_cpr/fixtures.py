"""pytest fixtures of pytest-cpr. Each is thin: it reads settings, yields a helper object that works
without pytest, and cleans up. Override any of them in a conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pytest_cpr import leftovers
from pytest_cpr.cpr import TransferResult
from pytest_cpr.errors import CprError, CprSettingError
from pytest_cpr.guest.ssh import SessionKey
from pytest_cpr.images import GuestImage, cached_path, verify, verify_binary
from pytest_cpr.kinds import Accel, Mode, values
from pytest_cpr.once import computed_once, worker_tag
from pytest_cpr.passthrough import PASSTHROUGH_THRESHOLDS
from pytest_cpr.qemu.probe import QemuBuild, choose_accel, probe
from pytest_cpr.settings import CprSettings, thresholds_in_force
from pytest_cpr.vm import CprVM, VmConfig, record_private_dir

SETTINGS_KEY = pytest.StashKey[CprSettings]()
REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


@contextlib.contextmanager
def one_line_errors(what: str) -> Iterator[None]:
    """Report pytest-cpr's own errors as a one-line failure (no traceback into the plugin): a
    CprSettingError names the setting and the fix already; others are prefixed with `what`."""
    try:
        yield
    except CprSettingError as exc:
        raise pytest.fail.Exception(f"[pytest-cpr] {exc}", pytrace=False) from None
    except CprError as exc:
        raise pytest.fail.Exception(f"[pytest-cpr] {what}: {exc}", pytrace=False) from None


def host_unavailable(reason: str, settings: CprSettings, lacking: bool = True) -> NoReturn:
    """Skip (or, with --cpr-strict, fail) a test the host cannot serve. `lacking=False`: the host has
    more than the test needs (a negative test with nothing to provoke), a skip even when strict."""
    if settings.strict and lacking:
        pytest.fail(f"[cpr-strict] {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cpr_settings(pytestconfig: pytest.Config) -> CprSettings:
    """The resolved pytest-cpr settings (CLI > environment > ini > default)."""
    return pytestconfig.stash[SETTINGS_KEY]


def probe_build(settings: CprSettings, binary: str, option: str) -> QemuBuild:
    with one_line_errors(f"probing {binary}"):
        verify_binary(binary)
        return probe(binary, option)


@pytest.fixture(scope="session")
def cpr_source_build(cpr_settings: CprSettings) -> QemuBuild:
    """The source QEMU build (--cpr-qemu / CPR_QEMU), probed once per session."""
    return probe_build(cpr_settings, cpr_settings.qemu, "--cpr-qemu / CPR_QEMU")


@pytest.fixture(scope="session")
def cpr_target_build(cpr_settings: CprSettings) -> QemuBuild:
    """The target QEMU build (--cpr-target-qemu / CPR_TARGET_QEMU; default: the source binary)."""
    return probe_build(cpr_settings, cpr_settings.target_qemu_binary, "--cpr-target-qemu / CPR_TARGET_QEMU")


@pytest.fixture(scope="session")
def cpr_image(cpr_settings: CprSettings) -> GuestImage | None:
    """The guest image: --cpr-image, else the cached build of images/guest. Never built here.
    None when only --cpr-user-image (a cloud image booted through a NoCloud seed) is set."""
    with one_line_errors("guest image"):
        if cpr_settings.image:
            return GuestImage.load(Path(cpr_settings.image), "--cpr-image / CPR_IMAGE")
        try:
            path = cached_path("guest", Path(cpr_settings.cache_dir))
        except CprSettingError as exc:
            raise CprSettingError(f"{exc}; or give a built image with --cpr-image") from None
        if not path.exists() and cpr_settings.user_image:
            return None  # guests boot the user's cloud image instead
        if not path.exists():
            host_unavailable(f"guest image not built ({path} missing): run `cpr-image build guest` "
                             "(or set --cpr-image / CPR_IMAGE)", cpr_settings)
        verify(path, "guest")
        return GuestImage.load(path, "--cpr-image / CPR_IMAGE")


@pytest.fixture(scope="session")
def cpr_accel(cpr_settings: CprSettings, cpr_source_build: QemuBuild, cpr_image: GuestImage | None,
              tmp_path_factory: pytest.TempPathFactory) -> Accel:
    """The accelerator in use: --cpr-accel, or auto: KVM if it boots the image's kernel here, else TCG.
    Decided once per run: pytest-xdist workers take the first worker's answer (file lock)."""
    kernel = cpr_image.kernel if cpr_image is not None else None

    def decide() -> str:
        return str(choose_accel(cpr_settings.accel, cpr_source_build, kernel))

    if not worker_tag():
        return Accel(decide())
    key = hashlib.sha256(f"{cpr_settings.accel}\0{cpr_source_build.binary}\0{kernel}".encode()).hexdigest()[:16]
    run_dir = tmp_path_factory.getbasetemp().parent  # the run's folder, shared by its workers
    with one_line_errors("choosing the accelerator"):
        return Accel(computed_once(run_dir / f"cpr-accel-{key}.json", decide))


@pytest.fixture(scope="session")
def cpr_session_key() -> Iterator[SessionKey]:
    """An ed25519 key generated for this session, in a private directory removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="cpr-key-"))
    record_private_dir(directory)
    try:
        yield SessionKey(directory / "ssh")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        leftovers.forget("rundir", directory.name)


@pytest.fixture
def cpr_artifacts(request: pytest.FixtureRequest, cpr_settings: CprSettings) -> Iterator[Path]:
    """This test's artifacts folder (QEMU stderr, console, QMP transcript, guest dmesg, transfers.json).
    With keep_artifacts=on-failure it is removed when the test passed."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[-150:]
    path = Path(cpr_settings.artifacts).resolve() / name
    try:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as exc:
        raise pytest.fail.Exception(f"[pytest-cpr] --cpr-artifacts / CPR_ARTIFACTS / ini cpr_artifacts: "
                                    f"cannot create {path}: {exc.strerror}; use a writable directory",
                                    pytrace=False) from None
    request.node.user_properties.append(("cpr_artifacts", str(path)))
    yield path
    report = request.node.stash.get(REPORT_KEY, {}).get("call")
    if cpr_settings.keep_artifacts == "on-failure" and report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)


def cpr_mode(request: pytest.FixtureRequest) -> Mode:
    """The CPR mode of the test: the `cpr` marker's mode (default cpr-transfer)."""
    marker = request.node.get_closest_marker("cpr")
    mode = (marker.kwargs.get("mode") or (marker.args[0] if marker.args else None)) if marker else None
    try:
        return Mode(mode or Mode.CPR_TRANSFER)
    except ValueError:
        raise pytest.UsageError(f"cpr marker of {request.node.nodeid}: unknown mode {mode!r}; use one of "
                                f"{', '.join(values(Mode))}") from None


def _record_transfer(node: pytest.Item) -> Callable[[TransferResult], None]:
    def record(result: TransferResult) -> None:
        """Each number once: a second call for the same transfer (checks added figures) updates them."""
        props = node.user_properties
        for name, value in result.numbers().items():
            key = f"cpr_t{result.index}_{name}"
            at = next((i for i, (k, _) in enumerate(props) if k == key), None)
            if at is None:
                props.append((key, value))
            else:
                props[at] = (key, value)

    return record


@pytest.fixture
def cpr_vm_factory(request: pytest.FixtureRequest, cpr_settings: CprSettings, cpr_source_build: QemuBuild,
                   cpr_target_build: QemuBuild, cpr_image: GuestImage | None, cpr_accel: Accel,
                   cpr_session_key: SessionKey, cpr_artifacts: Path) -> Iterator[Callable[..., CprVM]]:
    """Make guests (not yet booted): `vm = cpr_vm_factory(memory_mib=1024)`. All are shut down and their
    networks removed at teardown; the guest dmesg and the transfer numbers are saved."""
    mode = cpr_mode(request)
    for build, option in ((cpr_source_build, "--cpr-qemu"), (cpr_target_build, "--cpr-target-qemu")):
        if (reason := build.missing(mode)) is not None:  # a build older than a newer mode: a skip even
            # with --cpr-strict (one run covers each mode with the build that has it, ci/test.sh)
            host_unavailable(f"{reason}; set {option} to a build that has it", cpr_settings,
                             lacking=mode is Mode.CPR_TRANSFER)
    made: list[CprVM] = []

    def make(**overrides: Any) -> CprVM:
        name = overrides.pop("name", f"vm{len(made)}")
        config = VmConfig(
            name=name, image=cpr_image, source=cpr_source_build, target=cpr_target_build, accel=cpr_accel, mode=mode,
            memory_mib=cpr_settings.memory, cpus=cpr_settings.cpus, boot_timeout=cpr_settings.boot_timeout,
            boot_attempts=cpr_settings.boot_attempts, transfer_timeout=cpr_settings.transfer_timeout,
            command_timeout=cpr_settings.command_timeout,
            artifacts=cpr_artifacts / name if made else cpr_artifacts, key_dir=cpr_session_key.path.parent,
            vnet_hdr=cpr_settings.vnet_hdr, probe_interval_ms=cpr_settings.probe_interval_ms,
            cpr_channel_fd=cpr_settings.channel_fd,
            user_image=Path(cpr_settings.user_image) if cpr_settings.user_image else None)
        config = dataclasses.replace(config, **overrides)  # a misspelt key raises TypeError
        config.cmdline = (*config.cmdline, *cpr_settings.guest_cmdline.split())
        config.on_transfer.append(_record_transfer(request.node))
        vm = CprVM(config)
        made.append(vm)
        return vm

    yield make
    errors = []
    # a stopped run (Ctrl-C, SIGTERM) ends at once: no guest dmesg (up to DMESG_CONSOLE_TIMEOUT_S over a
    # console) while a CI job's SIGKILL may follow its SIGTERM within seconds
    stopped = request.session.exitstatus == pytest.ExitCode.INTERRUPTED
    for vm in made:
        if not stopped and (vm.ssh is not None or vm.generations):
            vm.collect_dmesg()
        summary = [r.as_dict() for r in vm.transfers]
        request.node.user_properties.append(("cpr_transfers_json", json.dumps(
            [{"test": request.node.nodeid, "vm": vm.config.name, **s["numbers"], "index": s["index"],
              "source": s["source"], "target": s["target"], "plot_png": s["files"].get("plot_png")}
             for s in summary])))
        if vm.ssh_ready_seconds is not None:
            request.node.user_properties.append(("cpr_boot_to_ssh_s", round(vm.ssh_ready_seconds, 3)))
        try:
            vm.close()
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


@pytest.fixture
def cpr_vm(cpr_vm_factory: Callable[..., CprVM]) -> CprVM:
    """A booted guest reachable over SSH (`vm.run(...)`), ready for `vm.transfer()`."""
    vm = cpr_vm_factory()
    with one_line_errors(f"guest {vm.config.name} did not boot (--cpr-boot-timeout "
                         f"{vm.config.boot_timeout:g}s; logs: {vm.artifacts})"):
        vm.boot()
    return vm


def _thresholds(request: pytest.FixtureRequest, settings: CprSettings) -> dict[str, float | None]:
    marker = request.node.get_closest_marker("cpr_thresholds")
    defaults = PASSTHROUGH_THRESHOLDS if request.node.get_closest_marker("vfio") is not None else {}
    try:
        return thresholds_in_force(marker.kwargs if marker else {}, settings, defaults)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def cpr_thresholds(request: pytest.FixtureRequest, cpr_settings: CprSettings) -> dict[str, float | None]:
    """max_blackout_ms / max_lost_probes in force: the cpr_thresholds marker, else the settings, else
    (tests with passthrough devices) the passthrough defaults; keyword arguments of vm.live_update."""
    values = _thresholds(request, cpr_settings)
    return {"max_blackout_ms": values["max_blackout_ms"], "max_lost_probes": values["max_lost_probes"]}


@pytest.fixture
def cpr_max_dma_stall_ms(request: pytest.FixtureRequest, cpr_settings: CprSettings) -> float | None:
    """The longest stall of a DMA stream across a transfer a test allows (None: record only), by the
    precedence of cpr_thresholds."""
    return _thresholds(request, cpr_settings)["max_dma_stall_ms"]


