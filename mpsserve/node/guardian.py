"""The node's guardian of the MPS control daemon, and each replica's attach verification.

Guardian: every GPU replica starts one as a background thread, but only the thread holding
the node's guardian lock works (a ``flock``; when its replica dies the lock frees and another
takes over), so each node has exactly one while any replica lives there. Every few seconds
it checks that the daemon answers, starts it if not (a first start when no daemon ran here
before, else a restart), and writes the node's MPS state (daemon pid, restarts, servers and
their clients) to a JSON file for replicas, ``doctor`` and operators. A restart is counted
when the daemon's pid changes, whoever started the new one. A busy daemon (DaemonBusy) is
neither down nor restarted: the round keeps the last view of the servers and says it is busy.
The leader also runs the node's metrics sampler (mpsserve/node/sampler.py), and follows GPU faults
(mpsserve/node/faults.py): which clients of the faulted server were hit, and when the last one
left, so the server takes new clients again. Every replica's guardian thread, leader or not,
also looks for fault records naming its own server twice a second (``on_round``).

Attach verification: after its first CUDA call a replica looks for its own pid in the client
list of the daemon's servers (NVML need not list MPS clients). The server it attached to is
remembered; when that server is gone (a daemon restart kills it, and with it every client's
CUDA context) the replica is unhealthy and Ray Serve replaces it with one that attaches anew.
A health check first reads the guardian's state file and asks the daemon only when that is
stale or does not list the replica under its server (fewer clients of a busy daemon); a
daemon that is busy (in that file, or when asked) is no verdict: the replica stays healthy
and counts the busy check.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mpsserve.config import MpsConfig
from mpsserve.errors import MpsError
from mpsserve.node import faults, hook
from mpsserve.node.control import DaemonBusy, DaemonNotRunning, MpsControl
from mpsserve.node.sampler import NodeSampler
from mpsserve.node.state import NodeState, read_state, write_state
from mpsserve.periodic import Periodic

logger = logging.getLogger(__name__)
LEADER_LOCK = "guardian.lock"
#: A state file older than this many guardian intervals is stale: replicas ask the daemon.
STALE_INTERVALS = 3
#: How often every guardian thread runs ``on_round`` (a replica looking for GPU faults).
ROUND_S = 0.5
#: A client hit by a GPU fault still there after this is named in a warning (it holds the
#: server's recovery back).
LINGER_WARN_S = 30.0


class Guardian(Periodic):
    """Keeps the node's control daemon up; one active per node (leader lock).

    One ``Periodic`` round every ``ROUND_S`` (at most ``interval_s``): ``on_round`` each
    round, leader or not, and the daemon's check when ``interval_s`` has passed since the
    last one, if this thread leads."""

    def __init__(
        self, control: MpsControl, state_dir: Path, interval_s: float, restart: bool = True
    ) -> None:
        super().__init__(
            "mps-guardian", min(ROUND_S, interval_s), self._round_of_checks, on_exit=self._release
        )
        self.control, self.state_dir, self.check_interval_s = control, state_dir, interval_s
        self.restart = restart  # False: the daemon is external; watch and report only
        self._next_check = 0.0
        self._lock_handle: Any = None
        self.sampler: NodeSampler | None = None  # the node's metrics sampler, started by the leader
        #: Run by this thread every ROUND_S, leader or not (a replica's own watch).
        self.on_round: Callable[[], None] = lambda: None

    def _round_of_checks(self) -> None:
        try:
            if time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + self.check_interval_s
                if self._lead():
                    self.check()
                    self._start_sampler()
        finally:
            self.on_round()  # a failed check must not keep a replica from its faults

    def _release(self) -> None:
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
            self.sampler = NodeSampler(self.state_dir)
            self.sampler.start()

    def check(self) -> NodeState:
        """One round: start the daemon if it is down, then record what is there."""
        previous = read_state(self.state_dir) or NodeState()
        state = NodeState(
            restarts=previous.restarts,
            known_daemon_pid=previous.known_daemon_pid,
            busy_rounds=previous.busy_rounds,
            checked_at=time.time(),
            gpu_faults=previous.gpu_faults,
            faults=previous.faults,
        )
        try:
            state.servers = {str(s): c for s, c in self._servers(state).items()}
            state.daemon_pid, state.up = self.control.daemon_pid(), True
            self._count_restart(state)
            self._follow_faults(previous, state)
        except DaemonBusy as exc:
            self._busy(previous, state, exc)
        except MpsError as exc:
            state.last_error = exc.message
            logger.error("MPS guardian: %s", exc.message)
        write_state(self.state_dir, state)
        return state

    def _servers(self, state: NodeState) -> dict[int, list[int]]:
        try:
            return self.control.clients()
        except DaemonNotRunning:
            self._start(state)
            return self.control.clients()

    def _start(self, state: NodeState) -> None:
        """The daemon is down: start it, saying whether one ran here before."""
        pipe_dir = self.control.pipe_dir
        if not self.restart:
            raise MpsError(
                f"the external MPS control daemon on {pipe_dir} is down "
                "(mps.daemon is 'external': mpsserve does not restart it)"
            )
        # A daemon that died before this guardian saw it left its pid file behind.
        state.known_daemon_pid = state.known_daemon_pid or self.control.recorded_pid()
        if state.known_daemon_pid is None:
            logger.info("starting the MPS control daemon on %s (first start)", pipe_dir)
        else:
            logger.warning(
                "MPS control daemon on %s is down (was pid %d); restarting (restart %d)",
                pipe_dir,
                state.known_daemon_pid,
                state.restarts + 1,
            )
        hook.ensure_daemon(self.control, self.state_dir)  # replicas' hooks may race

    def _count_restart(self, state: NodeState) -> None:
        """A daemon pid other than the last one seen is a restart (by us or anyone)."""
        pid, known = state.daemon_pid, state.known_daemon_pid
        if pid is None:
            return
        if known is not None and pid != known:
            state.restarts += 1
            logger.warning(
                "MPS control daemon on %s is pid %d now, was %d: restart %d",
                self.control.pipe_dir,
                pid,
                known,
                state.restarts,
            )
        state.known_daemon_pid = pid

    def _follow_faults(self, previous: NodeState, state: NodeState) -> None:
        """New fault records start being followed; followed ones lose the clients that left."""
        follows = [faults.Follow(**f) for f in state.faults]
        known = {key for f in follows for key in f.reports}
        for fault in faults.recorded(self.state_dir, time.time() - faults.KEEP_S):
            if fault.key() in known:
                continue
            same = next((f for f in follows if f.covers(fault)), None)
            if same is not None:  # more clients telling of one fault (they all saw it)
                same.reports.append(fault.key())
                continue
            follows.append(self._start_following(fault, previous, state))
            state.gpu_faults += 1
        for follow in follows:
            self._update(follow, state)
        state.faults = [asdict(f) for f in follows[-faults.KEEP_IN_STATE :]]
        faults.prune(self.state_dir)
        faults.forget_gone_clients(self.state_dir)

    def _start_following(
        self, fault: faults.GpuFault, previous: NodeState, state: NodeState
    ) -> faults.Follow:
        key = str(fault.server)
        seen = set(previous.servers.get(key, []))
        if not seen or previous.checked_at > fault.at:  # no view from before the fault
            seen |= set(state.servers.get(key, []))
        follow = faults.Follow.start(self.state_dir, fault, sorted(seen))
        logger.error(
            "GPU %s fault on MPS server %d, reported by pid %d: %s; the server takes no new "
            "client until its %d client(s) on that GPU have exited: %s",
            fault.gpu,
            fault.server,
            fault.reporter,
            fault.message[:300],
            len(follow.clients),
            follow.clients,
        )
        if follow.others:
            logger.warning(
                "MPS server %d also serves client(s) %s that are not mpsserve replicas: if they "
                "use GPU %s they were hit too, and the server waits for them to exit",
                fault.server,
                follow.others,
                fault.gpu,
            )
        return follow

    def _update(self, follow: faults.Follow, state: NodeState) -> None:
        now = time.time()
        if follow.update(state.servers.get(str(follow.server), []), now):
            logger.warning(
                "all %d client(s) hit by the GPU %s fault on MPS server %d exited %.1fs after "
                "it; the server takes new clients again",
                len(follow.clients),
                follow.gpu,
                follow.server,
                now - follow.at,
            )
        elif follow.cleared_at is None and now - follow.at > LINGER_WARN_S:
            logger.warning(
                "GPU %s fault on MPS server %d %.0fs ago: client(s) %s have not exited; the "
                "server takes no new client until they do",
                follow.gpu,
                follow.server,
                now - follow.at,
                follow.remaining,
            )

    def _busy(self, previous: NodeState, state: NodeState, exc: DaemonBusy) -> None:
        """Busy is not down: no restart, and the last view of the servers stays."""
        state.up, state.busy, state.busy_rounds = True, True, state.busy_rounds + 1
        state.daemon_pid, state.servers = self.control.daemon_pid(), previous.servers
        state.last_error = exc.message
        logger.warning("MPS guardian (busy round %d): %s", state.busy_rounds, exc.message)


@dataclass
class Attachment:
    """Whether a process is an MPS client, and of which server."""

    server: int | None
    detail: str
    busy: bool = False  # the daemon did not answer in time: nothing is known


def find_attachment(control: MpsControl, pid: int) -> Attachment:
    try:
        servers = control.clients()
    except DaemonBusy as exc:
        return Attachment(None, exc.message, busy=True)
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

    def __init__(self, mps: MpsConfig, pid: int | None = None, gpu: str | None = None) -> None:
        self.mode = mps.mode
        self.state_dir = Path(mps.state_dir)
        self.pid = pid or os.getpid()
        self.gpu = gpu  # as Ray names it on the node; None: no GPU
        #: Before this process's first CUDA call: a GPU fault after it may have hit this process.
        self.started_at = time.time()
        self._hit: faults.GpuFault | None = None
        self.control = hook.control_for(mps)
        self.server: int | None = None
        self.detail = "MPS off" if self.mode == "off" else "not checked yet"
        self.stale_after_s = STALE_INTERVALS * mps.guardian_interval_s
        self.unverified = False  # the daemon was busy when asked after load: ask again
        self.busy_checks = 0  # health checks that found the daemon busy (no verdict)
        self.guardian: Guardian | None = None
        if self.mode != "off":
            self.guardian = Guardian(
                self.control,
                self.state_dir,
                mps.guardian_interval_s,
                restart=mps.daemon != "external",
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
            found = self._from_state() or find_attachment(self.control, self.pid)
            self.unverified = found.busy
            self.server = found.server
            self.detail = f"not verified yet: {found.detail}" if found.busy else found.detail
            if self.server is not None and self.gpu is not None:
                faults.note_client(self.state_dir, self.pid, self.gpu)
        log = logger.info if self.server is not None else logger.warning
        log("replica %d: %s", self.pid, self.detail)

    def problem(self) -> str | None:
        """Why this replica must be replaced, or None. Asked by ``check_health``; a daemon
        too busy to answer is no verdict (None)."""
        if self.mode == "off":
            return None
        if self.unverified:  # the one question to the daemon this time
            self.verify()
            if self.unverified:
                self._note_busy(self.detail)
                return None
            return self._unattached()
        if self.server is None:
            return self._unattached()
        now = self._from_state()  # the guardian asked a moment ago: most checks end here
        if now is None or (not now.busy and now.server != self.server):
            now = find_attachment(self.control, self.pid)
        if now.busy:
            self._note_busy(now.detail)
            return None
        if now.server != self.server:
            return f"lost its MPS server {self.server}: {now.detail}"
        return None

    def report_fault(self, message: str) -> None:
        """Tell the node this process hit a fatal device error on its server's GPU, so every
        other client of it exits too (nothing to tell without MPS: the fault stays here)."""
        if self.server is None or self.gpu is None:
            return
        if faults.hitting(self.state_dir, self.server, self.gpu, self.started_at, self.pid):
            return  # a peer told the node first: this is the same fault reaching this client
        fault = faults.GpuFault(self.server, self.gpu, self.pid, time.time(), message[:2000])
        faults.report(self.state_dir, fault)
        logger.error(
            "replica %d: reported a GPU %s fault on MPS server %d", self.pid, self.gpu, self.server
        )

    def watch_faults(self, on_fault: Callable[[faults.GpuFault], None]) -> None:
        """Call ``on_fault`` (once, from the guardian thread) when another process reports a
        fault on this process's server and GPU after this process started."""

        def look() -> None:
            if self._hit is not None or self.server is None or self.gpu is None:
                return
            self._hit = faults.hitting(
                self.state_dir, self.server, self.gpu, self.started_at, self.pid
            )
            if self._hit is not None:
                on_fault(self._hit)

        if self.guardian is not None:
            self.guardian.on_round = look

    def memory_limit(self) -> str | None:
        """What bounds this process's device memory, for its out-of-memory errors."""
        limit = hook.pinned_limit_set()
        if self.mode == "off" or not limit:
            return None
        return (
            f"this replica's MPS device memory limit is {limit.split('=', 1)[-1]} "
            "(CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, from mps.limits.pinned_mem_limit_mb)"
        )

    def _unattached(self) -> str | None:
        """Never attached: fatal only when MPS is required."""
        if self.server is None and self.mode == "on":
            return f"MPS mode is 'on' but this replica is not attached: {self.detail}"
        return None

    def _note_busy(self, detail: str) -> None:
        self.busy_checks += 1
        logger.warning(
            "replica %d: MPS control daemon busy, health check passes without a verdict "
            "(%d so far): %s",
            self.pid,
            self.busy_checks,
            detail,
        )

    def _from_state(self) -> Attachment | None:
        """What the guardian's fresh state file says: this replica's server, or that the
        daemon is busy; None when it is stale or does not list this replica (ask the daemon)."""
        state = read_state(self.state_dir)
        if state is None or not state.up or time.time() - state.checked_at > self.stale_after_s:
            return None
        if state.busy:
            return Attachment(None, f"(guardian) {state.last_error}", busy=True)
        for server, clients in state.servers.items():
            if self.pid in clients:
                return Attachment(int(server), f"MPS client of server {server} (guardian)")
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
            "busy_checks": self.busy_checks,
        }
