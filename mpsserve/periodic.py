"""One periodic task on its own daemon thread: the one way mpsserve runs a loop every N s.

The MPS guardian, the node's metrics sampler, the model store's watcher, the gauge refresher
and the transport key reloader all need the same thing: call a function every interval until
told to stop, sooner when woken, and never let one failed round end the loop (a watcher that
dies quietly is worse than one that logs). A failure is logged with its traceback the first
time in a row, in one line while it keeps failing, and once more when a round works again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Periodic(threading.Thread):
    """Calls ``fn`` every ``interval_s`` seconds until ``stop``; ``wake`` runs a round now.

    ``immediately``: the first round runs at start (else after one interval). ``on_exit``
    runs on the thread after the last round (to release what the rounds held).
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        fn: Callable[[], object],
        *,
        immediately: bool = True,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval_s = interval_s
        self._fn, self._immediately, self._on_exit = fn, immediately, on_exit
        self._stopping, self._wake = threading.Event(), threading.Event()
        self._failing = False

    def stop(self) -> None:
        """End the loop after the round in progress (join to wait for it)."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Run the next round now rather than at the end of the interval."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        try:
            if self._immediately:
                self._round()
            while not self._stopping.is_set():
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if not self._stopping.is_set():
                    self._round()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _round(self) -> None:
        try:
            self._fn()
        except Exception as exc:
            if self._failing:
                logger.warning("%s failed again: %s: %s", self.name, type(exc).__name__, exc)
            else:
                logger.exception("%s failed; trying again every %gs", self.name, self.interval_s)
            self._failing = True
            return
        if self._failing:
            logger.info("%s works again", self.name)
        self._failing = False
