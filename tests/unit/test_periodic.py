"""The periodic-task helper every loop of the service runs on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from mpsserve.periodic import Periodic


def _wait(condition: Callable[[], object], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_runs_every_interval_until_stopped_then_its_exit() -> None:
    rounds: list[float] = []
    exited = threading.Event()
    task = Periodic("tick", 0.02, lambda: rounds.append(time.monotonic()), on_exit=exited.set)
    task.start()
    assert _wait(lambda: len(rounds) >= 3)
    task.stop()
    task.join(5)
    assert not task.is_alive() and exited.is_set() and task.stopping


def test_wake_runs_a_round_now_and_the_first_can_wait() -> None:
    rounds: list[int] = []
    task = Periodic("poll", 60.0, lambda: rounds.append(1), immediately=False)
    task.start()
    try:
        time.sleep(0.1)
        assert rounds == []  # the first round waits for its interval
        task.wake()
        assert _wait(lambda: rounds == [1])
    finally:
        task.stop()
        task.join(5)


def test_a_failing_round_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("store unreachable")

    task = Periodic("watch", 0.01, flaky)
    with caplog.at_level(logging.INFO, logger="mpsserve.periodic"):
        task.start()
        assert _wait(lambda: len(calls) >= 4)
        task.stop()
        task.join(5)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("watch failed; trying again") and caplog.records[0].exc_info
    assert messages[1] == "watch failed again: OSError: store unreachable"
    assert messages[2] == "watch works again" and len(messages) == 3
