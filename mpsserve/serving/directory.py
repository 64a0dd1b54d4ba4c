"""Where each model replica's data port is: a one-replica Serve deployment.

A model replica registers ``{key, model, host, port, pid, node}`` once its model is loaded and
again every few seconds; entries not refreshed within ``TTL_S`` drop out (a replica that died
without saying so). Ingress replicas read the list every second. The directory is not on the
request path: if Serve restarts it, replicas re-register within one heartbeat and ingresses
keep routing on their last list meanwhile.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ray import serve

TTL_S = 10.0
HEARTBEAT_S = 2.0


@serve.deployment(
    name="directory",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    logging_config={
        "enable_access_log": False
    },  # a call per replica every 2 s, per ingress every 1 s
)
class Directory:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def register(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._entries[entry["key"]] = {**entry, "seen": time.monotonic()}

    def deregister(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def endpoints(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, e in self._entries.items() if now - e["seen"] > TTL_S]:
                del self._entries[key]
            return [dict(e) for e in self._entries.values()]
