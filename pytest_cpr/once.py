"""Work done once per run although the run has several processes (pytest-xdist workers): the first
process to take the file lock computes the value and stores it as JSON beside the lock; the others
wait for the lock (bounded) and read it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_cpr.errors import CprError
from pytest_cpr.leftovers import ClaimLock, LockTimeout
from pytest_cpr.waits import ONCE_LOCK_TIMEOUT_S


def worker_tag() -> str:
    """This process's pytest-xdist worker id (gw0, gw1, ...), or '' outside xdist workers. Names of
    what a worker makes carry it (run directories, hence namespaces), so a person sees whose it is."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def computed_once(path: Path, compute: Callable[[], Any], timeout: float = ONCE_LOCK_TIMEOUT_S) -> Any:
    """compute()'s JSON value, computed by the first caller across processes sharing `path`. A
    compute() that raises stores nothing: the next caller tries again (and meets its own error)."""
    lock = ClaimLock(path.name, path.parent)  # <path>.lock
    try:
        lock.acquire(timeout)
    except LockTimeout as exc:
        raise CprError(f"{path}: the lock was {exc} while its value was computed (a hung pytest-xdist "
                       "worker?)") from None
    try:
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        staged = path.with_name(f"{path.name}.{os.getpid()}")
        staged.write_text(json.dumps(value))
        staged.rename(path)
        return value
    finally:
        lock.release()
