"""Environment knobs, declared once. Every variable starts with ``MPSSERVE_``.

Code reads ``settings()``, never ``os.environ``, so the full list of knobs is this file. The
``mps_*`` knobs are how the app builder hands a replica its MPS setup: they travel in the
replica's Ray runtime environment (``env_vars``), written by ``to_env``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Any

PREFIX = "MPSSERVE_"


@dataclass(frozen=True)
class Settings:
    #: Where remote model versions are cached on a node (default: the system temp dir).
    cache_dir: str | None = None
    #: Python log level for mpsserve's own loggers.
    log_level: str = "INFO"
    #: Seconds a health or readiness probe waits on a replica before calling it not ready.
    probe_timeout_s: float = 2.0
    #: One access-log line per request at the ingress: text, json or off.
    access_log: str = "text"
    #: Threads running inference in each model replica (2 overlaps one request's host work
    #: with another's GPU work).
    replica_threads: int = 2
    #: CUDA-graph capture beside other work of the process: concurrent (thread-local capture
    #: mode, the default) or exclusive (replays and eager runs pause while a graph captures).
    graph_capture: str = "concurrent"
    #: This replica's MPS mode: off (no MPS), auto (use it when it works), on (required).
    mps_mode: str = "off"
    #: Who runs the node's control daemon: managed (mpsserve) or external.
    mps_daemon: str = "managed"
    #: The control daemon's pipe, log and state (locks, guardian) directories.
    mps_pipe_dir: str = "/tmp/mpsserve/mps-pipe"
    mps_log_dir: str = "/tmp/mpsserve/mps-log"
    mps_state_dir: str = "/tmp/mpsserve/mps-state"
    #: The control program, the deadline for one try of a command to it, and how long a busy
    #: daemon is asked again (mps.command_retry_s).
    mps_control_binary: str = "nvidia-cuda-mps-control"
    mps_command_timeout_s: float = 5.0
    mps_command_retry_s: float = 5.0
    #: How often the node's guardian checks the daemon.
    mps_guardian_interval_s: float = 2.0
    #: Replicas sharing each GPU and the share of the GPU they take (for derived limits).
    mps_replicas_per_gpu: int = 1
    mps_gpu_share: float = 1.0
    #: Explicit per-replica pinned device memory limit in MB; 0 derives it from NVML.
    mps_pinned_mem_limit_mb: int = 0
    #: Tests only: a file whose appearance makes one replica inject the fault written in it
    #: into its next request (mpsserve/runtime/injected.py). Empty: never.
    inject_fault_file: str = ""


def _convert(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _read() -> Settings:
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = os.environ.get(PREFIX + item.name.upper())
        if raw is not None:
            values[item.name] = _convert(raw, item.default)
    return Settings(**values)


@functools.cache
def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return _read()


def to_env(**values: Any) -> dict[str, str]:
    """Environment variables that make ``settings()`` return ``values`` in another process."""
    known = {item.name for item in fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"unknown settings {unknown}")
    return {PREFIX + name.upper(): str(value) for name, value in values.items()}
