"""Environment knobs, declared once. Every variable starts with ``MPSSERVE_``.

Code reads ``settings()``, never ``os.environ``, so the full list of knobs is this file.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

PREFIX = "MPSSERVE_"


@dataclass(frozen=True)
class Settings:
    #: Where remote model versions are cached on a node (default: the system temp dir).
    cache_dir: str | None = None
    #: Python log level for mpsserve's own loggers.
    log_level: str = "INFO"
    #: Seconds a health or readiness probe waits on a replica before calling it not ready.
    probe_timeout_s: float = 2.0


def _read() -> Settings:
    values: dict[str, object] = {}
    for name, field in Settings.__dataclass_fields__.items():
        raw = os.environ.get(PREFIX + name.upper())
        if raw is not None:
            values[name] = float(raw) if field.type == "float" else raw
    return Settings(**values)  # type: ignore[arg-type]


@functools.cache
def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return _read()
