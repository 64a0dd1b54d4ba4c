"""The node's guardian of the MPS control daemon, and each replica's attach verification.

Guardian: every GPU replica starts one as a background thread, but only the thread holding
the node's guardian lock works (a ``flock``; when its replica dies the lock frees and another
takes over), so each node has exactly one while any replica lives there. Every few seconds
it checks that the daemon answers, restarts it if not, and writes the node's MPS state
(daemon pid, restarts, servers and their clients) to a JSON file for replicas, ``doctor`` and
operators. The leader also runs the node's metrics sampler (mpsserve/sampler.py).

Attach verification: after its first CUDA call a replica looks for its own pid in the client
list of the daemon's servers (NVML need not list MPS clients). The server it attached to is
remembered; when that server is gone (a daemon restart kills it, and with it every client's
CUDA context) the replica is unhealthy and Ray Serve replaces it with one that attaches anew.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpsserve.errors import MpsError
from mpsserve.mps import hook
from mpsserve.mps.control import MpsControl
from mpsserve.settings import Settings

if TYPE_CHECKING:
    from mpsserve.sampler import NodeSampler

logger = logging.getLogger(__name__)
STATE_FILE = "guardian.json"
LEADER_LOCK = "guardian.lock"


@dataclass
class NodeState:
    """What the guardian last saw on this node."""

    node: str = field(default_factory=socket.gethostname)
    up: bool = False
    daemon_pid: int | None = None
    restarts: int = 0
    servers: dict[str, list[int]] = field(default_factory=dict)  # server pid -> client pids
    checked_at: float = 0.0
    guardian_pid: int = field(default_factory=os.getpid)
    last_error: str | None = None


def read_state(state_dir: Path) -> NodeState | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return NodeState(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_state(state_dir: Path, state: NodeState) -> None:
    """Atomically (rename), so readers never see half a file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    partial = state_dir / f".{STATE_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(asdict(state), indent=2))
    partial.replace(state_dir / STATE_FILE)


class Guardian(threading.Thread):
    """Keeps the node's control daemon up; one active per node (leader lock)."""

    def __init__(
        self, control: MpsControl, state_dir: Path, interval_s: float, restart: bool = True
    ) -> None:
        super().__init__(name="mps-guardian", daemon=True)
        self.control, self.state_dir, self.interval_s = control, state_dir, interval_s
        self.restart = restart  # False: the daemon is external; watch and report only
        self._stopping = threading.Event()
        self._lock_handle: Any = None
        self.sampler: NodeSampler | None = None  # the node's metrics sampler, started by the leader

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._lead():
                    self.check()
                    self._start_sampler()
                self._stopping.wait(self.interval_s)
        finally:
            if self.sampler is not None:
                self.sampler.stop()
            if self._lock_handle is not None:
                self._lock_handle.close()  # frees the node's guardian lock for another
                self._lock_handle = None

    def _lead(self) -> bool:
        if self._lock_handle is not None:
            return True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = (self.state_dir / LEADER_LOCK).open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._lock_handle = handle  # held for the life of this process
        logger.info("MPS guardian for this node is pid %d", os.getpid())
        return True

    def _start_sampler(self) -> None:
        """The node's metrics (MPS state, GPU load) come from its one leader."""
        if self.sampler is None:
            from mpsserve.sampler import NodeSampler  # imports this module

            self.sampler = NodeSampler(self.state_dir)
            self.sampler.start()

    def check(self) -> NodeState:
        """One round: restart the daemon if it is down, then record what is there."""
        previous = read_state(self.state_dir) or NodeState()
        state = NodeState(restarts=previous.restarts, checked_at=time.time())
        try:
            if not self.control.running():
                if not self.restart:
                    raise MpsError(
                        f"the external MPS control daemon on {self.control.pipe_dir} is down "
                        "(mps.daemon is 'external': mpsserve does not restart it)"
                    )
                logger.warning(
                    "MPS control daemon on %s is down; restarting", self.control.pipe_dir
                )
                hook.ensure_daemon(self.control, self.state_dir)  # replicas' hooks may race
                state.restarts += 1
            state.servers = {str(s): c for s, c in self.control.clients().items()}
            state.daemon_pid, state.up = self.control.daemon_pid(), True
        except MpsError as exc:
            state.last_error = exc.message
            logger.error("MPS guardian: %s", exc.message)
        write_state(self.state_dir, state)
        return state


@dataclass
class Attachment:
    """Whether a process is an MPS client, and of which server."""

    server: int | None
    detail: str


def find_attachment(control: MpsControl, pid: int) -> Attachment:
    try:
        servers = control.clients()
    except MpsError as exc:
        return Attachment(None, exc.message)
    for server, clients in servers.items():
        if pid in clients:
            return Attachment(server, f"MPS client of server {server}")
    return Attachment(
        None, f"pid {pid} is in no MPS server's client list (servers: {sorted(servers)})"
    )


class ReplicaMps:
    """One GPU replica's view of MPS: attach after load, then health."""

    def __init__(self, s: Settings, pid: int | None = None) -> None:
        self.mode = s.mps_mode
        self.state_dir = Path(s.mps_state_dir)
        self.pid = pid or os.getpid()
        self.control = hook.control_from(s)
        self.server: int | None = None
        self.detail = "MPS off" if self.mode == "off" else "not checked yet"
        self.guardian: Guardian | None = None
        if self.mode != "off":
            self.guardian = Guardian(
                self.control,
                Path(s.mps_state_dir),
                s.mps_guardian_interval_s,
                restart=s.mps_daemon != "external",
            )

    def start_guardian(self) -> None:
        if self.guardian is not None and not self.guardian.is_alive():
            self.guardian.start()

    def verify(self) -> None:
        """Call after the replica's first CUDA call (model load and warm-up)."""
        if self.mode == "off":
            return
        if hook.setup_error is not None:
            self.detail = f"MPS unavailable: {hook.setup_error}"
        else:
            found = find_attachment(self.control, self.pid)
            self.server, self.detail = found.server, found.detail
        log = logger.info if self.server is not None else logger.warning
        log("replica %d: %s", self.pid, self.detail)

    def problem(self) -> str | None:
        """Why this replica must be replaced, or None. Asked by ``check_health``."""
        if self.mode == "off":
            return None
        if self.server is None:  # never attached: fatal only when MPS is required
            if self.mode == "on":
                return f"MPS mode is 'on' but this replica is not attached: {self.detail}"
            return None
        now = find_attachment(self.control, self.pid)
        if now.server != self.server:
            return f"lost its MPS server {self.server}: {now.detail}"
        return None

    def node_state(self) -> dict[str, Any] | None:
        """The node's daemon as its guardian last wrote it (None: no guardian there)."""
        if self.mode == "off":
            return None
        state = read_state(self.state_dir)
        return asdict(state) if state is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "attached": self.server is not None,
            "server": self.server,
            "detail": self.detail,
        }
