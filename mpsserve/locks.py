"""Locks between the processes of one node (base layer).

The model store (a version's download), the servable (a swap) and the MPS control (a turn at
the daemon) all need an exclusive lock that a dead process cannot leave behind: ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

#: How often a lock with a timeout is tried again while another process holds it.
LOCK_POLL_S = 0.01


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """An exclusive lock between processes (and threads) of one node (flock; released if we
    die). With ``timeout_s``: TimeoutError when it is not ours within that time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        _flock(handle.fileno(), timeout_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flock(fd: int, timeout_s: float | None) -> None:
    if timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"lock held by another process for {timeout_s:.3g}s") from None
            time.sleep(LOCK_POLL_S)
