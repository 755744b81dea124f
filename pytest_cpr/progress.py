"""Progress of long steps (image and kernel builds, the virtual host's boot): a line with the elapsed
time every `every` seconds while the step runs, so a person never watches minutes of silence."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


def elapsed(seconds: float) -> str:
    """'+45s', '+3m07s'."""
    s = int(seconds)
    return f"+{s}s" if s < 60 else f"+{s // 60}m{s % 60:02d}s"


@contextlib.contextmanager
def heartbeat(say: Callable[[str], None], what: str, every: float = 60.0,
              detail: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Say `what` with the elapsed time (and `detail()`, e.g. a log's last line) every `every`
    seconds until the block ends."""
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            try:
                more = detail()
            except Exception as exc:  # progress must never break the step it reports on
                more = f"({exc!r})"
            say(f"{what}: {elapsed(time.monotonic() - t0)}" + (f", {more}" if more else ""))

    thread = threading.Thread(target=beat, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
