"""Logging inside Serve replicas: mpsserve's loggers write where Ray Serve's do.

Serve gives each replica a log file (``/tmp/ray/session_latest/logs/serve/replica_*.log``,
shown in the Ray dashboard) and, by default, echoes to stderr (the driver's console).
mpsserve's own loggers use the same handlers; the per-request access log
(``mpsserve.access``) goes to the file only, so a busy service does not flood the console.
"""

from __future__ import annotations

import logging
import logging.handlers

from mpsserve.settings import settings


def configure_replica_logging() -> None:
    serve_handlers = logging.getLogger("ray.serve").handlers
    service = logging.getLogger("mpsserve")
    if service.handlers or not serve_handlers:
        return  # done already, or not inside a Serve replica
    service.setLevel(settings().log_level)
    for handler in serve_handlers:
        service.addHandler(handler)
    service.propagate = False
    access = logging.getLogger("mpsserve.access")
    access.setLevel(logging.INFO)
    for handler in serve_handlers:
        if isinstance(handler, logging.handlers.MemoryHandler | logging.FileHandler):
            access.addHandler(handler)
    access.propagate = False
