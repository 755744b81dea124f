"""The stop stress tool's plan, its one-line refusals, where it says a stop landed and its summary;
and the plugin taking SIGTERM over also where Ctrl-C is ignored (a run started with `&`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from pytest_cpr import plugin, stopstress
from pytest_cpr.errors import CprSettingError
from pytest_cpr.stopstress import POINTS, SIGNALS, Stop, StopRun


@pytest.fixture
def saved_stop_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    restorers = len(plugin._restore)
    yield
    del plugin._restore[restorers:]
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_plan_takes_every_point_with_each_signal_in_turn() -> None:
    pairs = stopstress.plan(2 * len(POINTS) * len(SIGNALS) + 1)
    assert pairs[:len(POINTS)] == [(p, "SIGTERM") for p in POINTS]
    assert pairs[len(POINTS):2 * len(POINTS)] == [(p, "SIGINT") for p in POINTS]
    assert pairs[2 * len(POINTS) * len(SIGNALS)] == (POINTS[0], "SIGTERM")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"point": "boot"}, r"^stop point 'boot': use one of spawn, spawned, "),
    ({"signal": "SIGHUP"}, r"^signal 'SIGHUP': use one of SIGTERM, SIGINT$"),
    ({"transfer": 1}, r"^transfer 1: stops land in transfer 2 or later"),
])
def test_stop_refuses_what_it_cannot_do_in_one_line(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"point": "spawn", "signal": "SIGTERM", "marks": "/tmp/m", **kwargs}
    with pytest.raises(CprSettingError, match=message):
        Stop(**args)  # type: ignore[arg-type]


def test_unknown_stop_point_on_the_command_line_is_one_line(capsys: pytest.CaptureFixture[str],
                                                             saved_stop_handlers: None) -> None:
    assert stopstress.main(["--at", "spawn,boot"]) == 2
    assert capsys.readouterr().err == ("stopstress: --at: unknown stop point boot: use any of "
                                       f"{','.join(POINTS)}\n")


def on_sigint() -> None:  # named as the plugin's handler: landing_site leaves it out
    raise KeyboardInterrupt


def spawn_here() -> None:
    on_sigint()


def test_landing_site_is_the_frame_the_handler_interrupted() -> None:
    with pytest.raises(KeyboardInterrupt) as excinfo:
        spawn_here()
    site = stopstress.landing_site(excinfo.value)
    assert site.startswith("test_stopstress.py:") and site.endswith(" spawn_here"), site


def test_summary_counts_stops_leftovers_by_kind_and_time() -> None:
    runs = [StopRun(1, "spawn", "SIGTERM", 10.0, 2, "x", ["QEMU pid 7 (generation g2)"]),
            StopRun(2, "retire", "SIGINT", 8.0, 2, "y", []),
            StopRun(3, "random", "SIGINT", 6.0, 1, "", [], "missed")]
    assert stopstress.summary(runs) == ("stopstress: 3 stops, 1 left something behind (1 leftovers: QEMU 1), "
                                        "1 did not stop as planned; 8.0s per stop")


def test_sigterm_runs_teardown_also_where_ctrl_c_is_ignored(saved_stop_handlers: None) -> None:
    """A shell starts `pytest &` with SIGINT ignored: SIGTERM must still become a KeyboardInterrupt
    (teardown runs), and the ignored Ctrl-C stays ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    plugin._second_interrupt_kills_leftovers()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert callable(signal.getsignal(signal.SIGTERM)), "SIGTERM would end pytest with no teardown"
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGTERM)
