"""pytest hooks of pytest-cpr (fixtures live in fixtures.py, logic in the modules they call)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Generator
from typing import Any

import pytest

from pytest_cpr import leftovers, report, vfio_hooks
from pytest_cpr.errors import CprError, CprSettingError
from pytest_cpr.fixtures import (  # noqa: F401 - fixtures are registered by import
    REPORT_KEY,
    SETTINGS_KEY,
    cpr_accel,
    cpr_artifacts,
    cpr_image,
    cpr_max_dma_stall_ms,
    cpr_session_key,
    cpr_settings,
    cpr_source_build,
    cpr_target_build,
    cpr_thresholds,
    cpr_vm,
    cpr_vm_factory,
)
from pytest_cpr.images import verify_binary
from pytest_cpr.qemu.probe import probe
from pytest_cpr.settings import SETTINGS, resolve, unknown_ini_keys
from pytest_cpr.vfio_fixtures import (  # noqa: F401 - fixtures are registered by import
    cpr_host,
    cpr_mdev,
    cpr_mdev_backend,
    cpr_mdev_guest,
    cpr_vfio,
    cpr_vfio_backend,
    cpr_vfio_guest,
)

MARKERS = (
    "cpr(mode='cpr-transfer'): the test performs CPR in `mode`; skipped where a QEMU build lacks it",
    "cpr_thresholds(max_blackout_ms=None, max_lost_probes=None, max_dma_stall_ms=None): per-test limits "
    "on what the guest may lose during a transfer (override --cpr-max-blackout-ms / --cpr-max-lost-probes "
    "/ --cpr-max-dma-stall-ms and the passthrough defaults)",
    "vfio(role='nic', backend=None, count=1): needs `count` passthrough devices of `role` from the host "
    "config, on `backend` (legacy or iommufd; default: every backend the host supports)",
    "viommu: the passthrough guest gets a vIOMMU (intel-iommu, caching mode): each device in its own "
    "address space, so in its own legacy VFIO container / iommufd IOAS",
    "iommufd: needs the iommufd backend (/dev/iommu and a QEMU with iommufd objects)",
    "virtual_host: runs inside the virtual hardware host (nested L1 VM with emulated VT-d)",
    "slow: takes minutes; deselect with -m 'not slow'",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cpr", "pytest-cpr: QEMU live update (cpr-transfer) tests")
    for s in SETTINGS:
        default = f" (default: {s.default})" if s.default is not None else ""
        group.addoption(s.option, dest=f"cpr_{s.key}", default=None,
                        help=f"{s.help}{default}; env {s.env}, ini {s.ini}")
        parser.addini(s.ini, f"pytest-cpr: {s.help}", default=None)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    cli = {s.key: config.getoption(f"cpr_{s.key}") for s in SETTINGS}
    ini = {s.ini: config.getini(s.ini) for s in SETTINGS}
    with warnings.catch_warnings():  # config.inicfg: deprecated in pytest 9, no public successor yet
        warnings.simplefilter("ignore")
        ini_keys = list(getattr(config, "inicfg", {}))
    if unknown := unknown_ini_keys(ini_keys):
        raise pytest.UsageError("; ".join(unknown))
    try:
        config.stash[SETTINGS_KEY] = resolve(cli, os.environ, ini)
    except CprSettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SETTINGS_KEY] = vfio_hooks.configure(config, config.stash[SETTINGS_KEY])


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    lines = ["pytest-cpr settings:", *settings.header_lines()]
    cross = (("cross", settings.cross_qemu),) if settings.cross_qemu else ()
    for label, binary in (("source", settings.qemu), ("target", settings.target_qemu_binary), *cross):
        try:
            verify_binary(binary)  # before it runs: a QEMU from the image cache must match its manifest
            build = probe(binary)
            modes = ",".join(sorted(build.migration_modes))
            lines.append(f"  {label} QEMU: {build.describe()}; migration modes: {modes}; "
                         f"vfio-pci: {'vfio-pci' in build.device_types}; iommufd: "
                         f"{'iommufd' in build.object_types}; VFIO CPR: {build.has_vfio_cpr}")
        except CprError as exc:
            lines.append(f"  {label} QEMU: unusable: {exc}")
    return lines + vfio_hooks.header_lines(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    vfio_hooks.generate_tests(metafunc)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    vfio_hooks.group_items(config, items)


def _second_interrupt_kills_leftovers() -> None:
    """Ctrl-C once: KeyboardInterrupt as usual, teardown shuts every QEMU down. Ctrl-C again (the
    teardown would be cut short): first SIGKILL this run's QEMU processes and delete its namespaces.
    SIGTERM (a CI job's timeout, `kill`) counts as a Ctrl-C, unless someone else handles it: also when
    Ctrl-C is ignored (a shell starts `pytest &` with SIGINT ignored), else SIGTERM would end such a
    run with no teardown at all. Either signal is left alone when someone else handles it."""
    if threading.current_thread() is not threading.main_thread():
        return
    interrupts = 0
    session_pid = os.getpid()

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupts
        if os.getpid() != session_pid:  # a forked child (pyroute2's netns helper) must not run the
            signal.signal(signum, signal.SIG_DFL)  # session's teardown: it just ends, as by default
            os.kill(os.getpid(), signum)
            return
        interrupts += 1
        if interrupts > 1:
            done = leftovers.clean_own()
            sys.stderr.write("\npytest-cpr: second Ctrl-C: " + ("; ".join(done) or "nothing left to kill")
                             + "\n")
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
        _restore.append(lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, on_sigint)
        _restore.append(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


_restore: list[Any] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    while _restore:
        _restore.pop()()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Generator[None, None, None]:
    """A stop (Ctrl-C, SIGTERM) that lands in a teardown cuts it short: pytest skips the rest of that
    fixture and the fixtures torn down after it. Once the session's teardown is over (or was cut short
    itself), what this process still has on record (QEMUs, namespaces, run directories, device
    bindings) is cleaned, so a stopped run leaves nothing for the next one."""
    cut_short = False
    try:
        return (yield)
    except KeyboardInterrupt:
        cut_short = True
        raise
    finally:
        if cut_short or session.exitstatus == pytest.ExitCode.INTERRUPTED:
            with contextlib.suppress(leftovers.StateDirError, PermissionError):
                if done := leftovers.clean_own():
                    sys.stderr.write("\npytest-cpr: after the stop: " + "; ".join(done) + "\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    _second_interrupt_kills_leftovers()
    if hasattr(session.config, "workerinput"):
        return  # xdist workers: the controller cleans once
    try:
        cleaned = leftovers.clean_stale()
    except PermissionError:
        cleaned = []
    except leftovers.StateDirError as exc:
        raise pytest.UsageError(str(exc)) from None
    session.config.stash[report.CLEANED_KEY] = cleaned


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    rep = yield
    item.stash.setdefault(REPORT_KEY, {})[rep.when] = rep
    if rep.when == "teardown" and item.config.pluginmanager.hasplugin("html"):
        rep.extras = [*getattr(rep, "extras", []), *report.html_extras(rep)]
    if rep.failed and call.excinfo is not None and call.excinfo.errisinstance(CprError):
        rep.longrepr = _without_plugin_frames(call.excinfo)
    return rep


def _without_plugin_frames(excinfo: pytest.ExceptionInfo[BaseException]) -> Any:
    """A pytest-cpr error as the user's own frames plus the message: the message names what failed,
    the setting and the fix, so frames inside the plugin only hide it."""
    package = os.path.dirname(__file__)

    def user_frames(info: pytest.ExceptionInfo[BaseException]) -> Any:
        tb = info.traceback.filter(info)
        return tb.filter(lambda entry: not str(entry.path).startswith(package))

    return excinfo.getrepr(style="short", tbfilter=user_frames, chain=False)


@pytest.hookimpl(optionalhook=True)
def pytest_html_results_summary(prefix: list[str], summary: list[str], postfix: list[str],
                                session: pytest.Session) -> None:
    """pytest-html (when installed): the run's cpr-transfer summary table above its results."""
    prefix.extend(report.html_summary(session.config.pluginmanager.get_plugin("terminalreporter")))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report.terminal_summary(terminalreporter, config)


