"""Driving the ``mpsserve`` command line as a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import time


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
