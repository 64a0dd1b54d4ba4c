"""Driving the ``mpsserve`` command line as a subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Everything the process printed up to the line holding ``marker``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise TimeoutError(f"no {marker!r} within {timeout_s}s; output:\n{''.join(seen)[-4000:]}")


@dataclass(frozen=True)
class Outcome:
    at: float  # time.monotonic() when the answer came
    ok: bool
    version: str | None  # the response's model_version


class Load(threading.Thread):
    """Sends one request body in a loop, one at a time, and keeps every outcome."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    ok, version = response.status == 200, _version(response.read())
            except Exception:
                ok, version = False, None
            self.outcomes.append(Outcome(time.monotonic(), ok, version))

    def versions(self) -> list[str | None]:
        """The served versions in order, with repeats collapsed: ["1", "2"] for a swap."""
        runs: list[str | None] = []
        for outcome in self.outcomes:
            if not runs or runs[-1] != outcome.version:
                runs.append(outcome.version)
        return runs


def _version(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["model_version"])
    except (ValueError, KeyError):
        return None
