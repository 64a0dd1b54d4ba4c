"""Environment knobs, declared once. Every variable starts with ``MPSSERVE_``.

Code reads ``settings()``, never ``os.environ``, so the full list of knobs is this file. Service
config is not declared here: a replica gets its MPS config as one validated JSON value
(``mps_config``), which travels in its Ray runtime environment (``env_vars``, by ``to_env``).
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
    #: This replica's MPS setup: ``ReplicaMpsConfig`` as JSON, written by the app builder
    #: (``mpsserve.node.hook.replica_runtime_env``) and validated where it is read; the MPS
    #: knobs themselves are declared once, in ``mpsserve.config.MpsConfig``. Empty: MPS off.
    mps_config: str = ""
    #: This model replica's model: ``ModelConfig`` as JSON (its version policy aside, which
    #: arrives as ``user_config``), written by the app builder (``serving.app.model_options``)
    #: into the replica's runtime environment, so that Serve replaces exactly the replicas of
    #: a model whose settings changed (a changed environment is a new process).
    model_config: str = ""
    #: A service YAML whose ``mps`` section ``ray_start_hook`` applies on a ``ray start``
    #: node (the daemon up before the raylet); empty: ``mps_config``, else nothing to do.
    service_config: str = ""
    #: Tests only: a file whose appearance makes one replica inject the fault written in it
    #: into its next request (mpsserve/model/runtime/injected.py). Empty: never.
    inject_fault_file: str = ""
    #: Where ops state lives: ``clusters/<app>.json``, the record ``mpsserve serve`` keeps of
    #: its cluster so that ``status`` and ``deploy`` find it (default: ``~/.mpsserve``).
    state_dir: str = ""
    #: Seconds an ops command (status, deploy) waits for a Ray cluster to answer before it
    #: fails; a closed port fails at once, before Ray is asked.
    connect_timeout_s: float = 20.0


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
