"""Drop a framework's known noise from the process's stderr while it initialises.

TensorFlow's C++ code writes to file descriptor 2 itself, and its messages before absl's
logging is set up ignore ``TF_CPP_MIN_LOG_LEVEL``, so neither Python's ``sys.stderr`` nor the
variable can hold them back. For a bounded window, fd 2 becomes a pipe; a thread passes every
line on to the real stderr as it arrives, except those ``drop`` names. Nothing is buffered past
a line, so a crash inside the window loses at most a partial line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

#: How long leaving the window waits for the forwarder to drain (a child process forked
#: inside the window keeps the pipe open; its lines are still forwarded, later).
DRAIN_WAIT_S = 5.0


@contextlib.contextmanager
def dropping_lines(drop: Callable[[str], bool]) -> Iterator[None]:
    """Inside the block, lines written to fd 2 for which ``drop`` is true are not shown."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(
        target=_forward, args=(read_end, saved, drop), name="stderr-filter", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's write end: the forwarder reads to its end
        thread.join(DRAIN_WAIT_S)
        if not thread.is_alive():
            os.close(saved)


def _forward(read_end: int, out: int, drop: Callable[[str], bool]) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if not drop(line.decode(errors="replace")):
                view = memoryview(line)
                while view:
                    view = view[os.write(out, view) :]
