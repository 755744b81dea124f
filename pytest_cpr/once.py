"""Work done once per run although the run has several processes (pytest-xdist workers): the first
process to take the file lock computes the value and stores it as JSON beside the lock; the others
wait for the lock (bounded) and read it."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprError
from pytest_cpr.waits import ONCE_LOCK_TIMEOUT_S


def worker_tag() -> str:
    """This process's pytest-xdist worker id (gw0, gw1, ...), or '' outside xdist workers. Names of
    what a worker makes carry it (run directories, hence namespaces), so a person sees whose it is."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def computed_once(path: Path, compute: Callable[[], Any], timeout: float = ONCE_LOCK_TIMEOUT_S) -> Any:
    """compute()'s JSON value, computed by the first caller across processes sharing `path`. A
    compute() that raises stores nothing: the next caller tries again (and meets its own error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CprError(f"{path}: another process held its lock for more than {timeout:g}s while "
                                   "computing it (a hung pytest-xdist worker?)") from None
                time.sleep(0.05)
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        staged = path.with_name(f"{path.name}.{os.getpid()}")
        staged.write_text(json.dumps(value))
        staged.rename(path)
        return value
