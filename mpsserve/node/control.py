"""Everything mpsserve says to ``nvidia-cuda-mps-control``.

The binary is the only interface: ``-d`` starts the control daemon, a command on stdin is
answered on stdout. Facts from the real binary (driver 580, H100; tests/gpu/mps_probe.sh):
no daemon -> "Cannot find MPS control daemon process", exit 1; ``-d`` twice -> "An instance of
this daemon is already running", exit 1; unknown commands and servers exit 0 with a message,
so answers are read, not only exit codes; killing the daemon kills its server, and every
client's CUDA context then fails (cudaErrorMpsRpcFailure). A stale pid file and socket do not
stop a new ``-d``, and ``-d`` may return before its daemon answers.

Talking to it carefully (seen on an H200 with 8-12 replicas starting together): every replica
and the node's guardian ask it questions, each through a new ``nvidia-cuda-mps-control``
process, and a busy daemon refuses with "Cannot send command to MPS control daemon process".
So commands on a node take turns (a ``flock`` on ``lock_file``, waited for within the retry
budget), and an answer is classified: "Cannot find ..." means no daemon (DaemonNotRunning, at
once); a refusal, a non-zero exit or no answer within ``timeout_s`` means busy, unless the
daemon's process is gone, and is asked again with backoff until ``retry_s`` has passed
(DaemonBusy: the daemon lives, nothing is known about its servers); anything else the daemon
says is its answer ("Unknown command" is an MpsError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mpsserve.errors import MpsError
from mpsserve.locks import file_lock

logger = logging.getLogger(__name__)

NOT_RUNNING = "Cannot find MPS control daemon process"
#: The busy daemon's refusal (seen on the H200 under many clients): transient, asked again.
BUSY = "Cannot send command to MPS control daemon process"
ALREADY_RUNNING = "An instance of this daemon is already running"
PID_FILE = "nvidia-cuda-mps-control.pid"
#: Variables a replica sets for itself that must not leak into the daemon (and its server):
#: the daemon must see every GPU, or it remaps device indices for all clients.
_CLIENT_ONLY = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
)
#: Backoff between tries of a busy daemon: doubling from the first, capped, with jitter.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 1.0
#: No try gets less time than this, even at the end of the budget.
MIN_TRY_S = 0.1


class DaemonNotRunning(MpsError):
    """The control daemon does not answer on this pipe directory."""


class DaemonBusy(MpsError):
    """The control daemon runs but did not take a command within the retry budget (too many
    clients at once, a server starting): no verdict on its servers can be drawn from it."""


class _Busy(Exception):
    """One try found the daemon busy; the message says how."""


@dataclass(frozen=True)
class MpsControl:
    """The control daemon of one pipe directory."""

    pipe_dir: Path
    log_dir: Path
    binary: str = "nvidia-cuda-mps-control"
    #: One try (one run of the binary) is abandoned after this.
    timeout_s: float = 5.0
    #: All tries of one exchange (a command, or ``clients()``) end within this: a busy daemon
    #: is asked again with backoff until then, waits for the node's turn included.
    retry_s: float = 5.0
    #: The node-wide turn: one command at a time per node (None: no turns, e.g. ``doctor``
    #: without a writable state directory).
    lock_file: Path | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ONLY}
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        return env

    def executable(self) -> str:
        found = shutil.which(self.binary)
        if found is None:
            raise MpsError(
                f"{self.binary} not found on PATH; install the NVIDIA driver's MPS tools"
            )
        return found

    def _run(
        self, args: list[str], stdin: str = "", timeout_s: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """One run of the binary; subprocess.TimeoutExpired when it outlives the timeout."""
        return subprocess.run(
            [self.executable(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=self.timeout_s if timeout_s is None else timeout_s,
            start_new_session=True,  # a Ctrl-C to us never reaches the daemon
        )

    def deadline(self) -> float:
        """When an exchange starting now must end (``time.monotonic()``)."""
        return time.monotonic() + self.retry_s

    def command(self, line: str, deadline: float | None = None) -> str:
        """Send one command; its answer. A busy daemon is asked again until ``deadline``
        (default: ``retry_s`` from now), then DaemonBusy; DaemonNotRunning when there is
        none; MpsError for a command it refuses."""
        until = deadline if deadline is not None else self.deadline()
        tries = 0
        while True:
            tries += 1
            try:
                with self._turn(until):
                    return self._try(line, until)
            except _Busy as exc:
                self._pause_or_give_up(line, str(exc), tries, until)

    def _turn(self, until: float) -> contextlib.AbstractContextManager[object]:
        """The node's turn to talk to the daemon, waited for until ``until``."""
        if self.lock_file is None:
            return contextlib.nullcontext()
        turn = contextlib.ExitStack()
        try:
            turn.enter_context(file_lock(self.lock_file, max(until - time.monotonic(), 0.0)))
        except TimeoutError as exc:
            raise _Busy("other processes held the node's turn to talk to it") from exc
        except OSError as exc:  # no writable state directory (doctor as another user)
            logger.debug("MPS control lock %s unusable (%s); no turns", self.lock_file, exc)
        return turn

    def _try(self, line: str, until: float) -> str:
        try:
            left = max(min(self.timeout_s, until - time.monotonic()), MIN_TRY_S)
            done = self._run([], line + "\n", left)
        except subprocess.TimeoutExpired as exc:
            raise _Busy(f"no answer within {exc.timeout:.3g}s") from exc
        answer = (done.stdout + done.stderr).strip()
        if NOT_RUNNING in answer:
            raise DaemonNotRunning(f"no MPS control daemon answers on {self.pipe_dir}")
        if done.returncode != 0:  # BUSY, or a refusal we do not know: busy until proven down
            raise _Busy(answer or f"exit code {done.returncode}")
        if answer.startswith("Unknown command"):
            raise MpsError(f"MPS control daemon refused {line!r}: {answer}")
        return done.stdout.strip()

    def _pause_or_give_up(self, line: str, why: str, tries: int, until: float) -> None:
        """After a busy try: DaemonNotRunning if the daemon's process is gone, DaemonBusy if
        the budget is spent, else sleep a backoff before the next try."""
        if self.daemon_pid() is None:
            raise DaemonNotRunning(f"no MPS control daemon runs on {self.pipe_dir} ({why})")
        pause = backoff_s(tries)
        if time.monotonic() + pause + MIN_TRY_S > until:
            raise DaemonBusy(
                f"MPS control daemon on {self.pipe_dir} is busy: {line!r} not taken after "
                f"{tries} tr{'y' if tries == 1 else 'ies'} within {self.retry_s:g}s ({why})"
            )
        logger.debug("MPS control daemon busy (%s); %r again in %.2fs", why, line, pause)
        time.sleep(pause)

    def running(self) -> bool:
        """Whether a daemon runs here; a busy one does."""
        try:
            self.command("get_server_list")
        except DaemonNotRunning:
            return False
        except DaemonBusy:
            return True
        return True

    def check_dirs(self) -> None:
        """Create the pipe and log directories; refuse ones we cannot write."""
        for path in (self.pipe_dir, self.log_dir):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MpsError(f"cannot create MPS directory {path}: {exc.strerror}") from exc
            if not os.access(path, os.W_OK | os.X_OK):
                raise MpsError(f"MPS directory {path} is not writable by uid {os.getuid()}")

    def start(self) -> bool:
        """Start the daemon (``-d``) and wait until it answers; False when one was already
        running."""
        self.check_dirs()
        before = self.recorded_pid()
        try:
            done = self._run(["-d"])
        except subprocess.TimeoutExpired as exc:
            raise MpsError(
                f"{self.binary} -d ({self.pipe_dir}) did not return within {self.timeout_s:g}s"
            ) from exc
        answer = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            self._wait_answering()
            died = f"; the previous one (pid {before}) is gone" if before else ""
            logger.info(
                "started MPS control daemon on %s (pid %s)%s",
                self.pipe_dir,
                self.daemon_pid(),
                died,
            )
            return True
        if ALREADY_RUNNING in answer:
            return False
        raise MpsError(f"{self.binary} -d failed ({done.returncode}): {answer}")

    def _wait_answering(self) -> None:
        """``-d`` may return before its daemon listens: a query at once would find no daemon
        (and a guardian would 'restart' it)."""
        deadline = time.monotonic() + self.timeout_s
        while not self.running():
            if time.monotonic() > deadline:
                raise MpsError(
                    f"MPS control daemon started on {self.pipe_dir} but did not answer "
                    f"within {self.timeout_s:g}s"
                )
            time.sleep(0.05)

    def ensure_running(self, lock_file: Path) -> bool:
        """Start the daemon unless it answers; safe when many processes race (a file lock).
        Returns True when this call started it."""
        with file_lock(lock_file):
            if self.running():
                return False
            return self.start()

    def server_list(self, deadline: float | None = None) -> list[int]:
        return _pids(self.command("get_server_list", deadline))

    def client_list(self, server: int, deadline: float | None = None) -> list[int]:
        """Client pids of a server; empty when that server is gone."""
        answer = self.command(f"get_client_list {server}", deadline)
        return [] if answer.endswith("not found") else _pids(answer)

    def clients(self) -> dict[int, list[int]]:
        """Every server and its clients (one retry budget for all the commands)."""
        until = self.deadline()
        return {server: self.client_list(server, until) for server in self.server_list(until)}

    def default_active_thread_percentage(self) -> float:
        return float(self.command("get_default_active_thread_percentage"))

    def set_default_active_thread_percentage(self, percentage: float) -> float:
        return float(self.command(f"set_default_active_thread_percentage {percentage:g}"))

    def set_default_device_pinned_mem_limit(self, device: int, limit_mb: int) -> None:
        self.command(f"set_default_device_pinned_mem_limit {device} {limit_mb}M")

    def recorded_pid(self) -> int | None:
        """The pid in the daemon's pid file, alive or not (a SIGKILLed daemon leaves it)."""
        try:
            return int((self.pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def daemon_pid(self) -> int | None:
        """The daemon's pid from its pid file, if that process is alive."""
        pid = self.recorded_pid()
        return pid if pid is not None and alive(pid) else None

    def quit(self) -> None:
        """Stop the daemon (its server ends with it) and wait until it has gone."""
        pid = self.daemon_pid()
        with contextlib.suppress(DaemonNotRunning):
            self.command("quit")
        deadline = time.monotonic() + self.timeout_s
        while pid is not None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is not None and not alive(pid) and self.recorded_pid() == pid:
            # Left behind, its pid file would make the next start look like a restart.
            with contextlib.suppress(OSError):
                (self.pipe_dir / PID_FILE).unlink()


def alive(pid: int) -> bool:
    """A running process; a zombie (dead, not yet reaped by its parent) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (a daemon run by root): it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def backoff_s(tries: int) -> float:
    """The pause after ``tries`` busy tries: doubling, capped, half of it random (jitter
    keeps the node's replicas from asking again in step)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (tries - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _pids(answer: str) -> list[int]:
    return [int(token) for token in answer.split() if token.isdigit()]
