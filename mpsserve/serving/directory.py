"""Where each model replica's data port is: a one-replica Serve deployment.

A model replica registers ``{key, model, host, port, pid, node}`` once its model is loaded and
again every few seconds (an ingress replica registers too, with ``kind: ingress`` and its
recent request figures, for ``mpsserve status``); entries not refreshed within ``TTL_S``
drop out (a replica that died without saying so). Ingress replicas read the list every
second. The directory is not on the request path: if Serve restarts it, replicas re-register
within one heartbeat and ingresses keep routing on their last list meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

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


class Registration(threading.Thread):
    """Keeps a replica's entry (``entry()`` is called for each heartbeat) in the directory
    fresh until withdrawn."""

    def __init__(self, directory: DeploymentHandle, entry: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name="directory-heartbeat", daemon=True)
        self.directory, self.entry = directory, entry
        self._stopping = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.directory.register.remote(self.entry()).result(timeout_s=HEARTBEAT_S * 2)
                if self._failing:
                    logger.info("registered in the directory again")
                self._failing = False
            except Exception as exc:  # the directory restarts: say so once, keep trying
                if not self._failing:
                    logger.warning("cannot register in the directory: %s", exc)
                self._failing = True
            self._stopping.wait(HEARTBEAT_S)

    def withdraw(self) -> None:
        """Leave the directory now (ingresses stop sending within a poll)."""
        self._stopping.set()
        # Serve may call this on the replica's event loop, where a blocking ``result()`` is
        # refused: make the call from a thread of its own.
        leave = threading.Thread(target=self._deregister, name="directory-leave", daemon=True)
        leave.start()
        leave.join(HEARTBEAT_S * 2)

    def _deregister(self) -> None:
        try:
            self.directory.deregister.remote(self.entry()["key"]).result(timeout_s=HEARTBEAT_S)
        except Exception as exc:
            logger.warning("cannot leave the directory: %s", exc)
