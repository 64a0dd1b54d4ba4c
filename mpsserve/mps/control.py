"""Everything mpsserve says to ``nvidia-cuda-mps-control``.

The binary is the only interface: ``-d`` starts the control daemon, a command on stdin is
answered on stdout. Facts from the real binary (driver 580, H100; tests/gpu/mps_probe.sh):
no daemon -> "Cannot find MPS control daemon process", exit 1; ``-d`` twice -> "An instance of
this daemon is already running", exit 1; unknown commands and servers exit 0 with a message,
so answers are read, not only exit codes; killing the daemon kills its server, and every
client's CUDA context then fails (cudaErrorMpsRpcFailure). A stale pid file and socket do not
stop a new ``-d``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mpsserve.errors import MpsError

logger = logging.getLogger(__name__)

NOT_RUNNING = "Cannot find MPS control daemon process"
ALREADY_RUNNING = "An instance of this daemon is already running"
PID_FILE = "nvidia-cuda-mps-control.pid"
#: Variables a replica sets for itself that must not leak into the daemon (and its server):
#: the daemon must see every GPU, or it remaps device indices for all clients.
_CLIENT_ONLY = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
)


class DaemonNotRunning(MpsError):
    """The control daemon does not answer on this pipe directory."""


@dataclass(frozen=True)
class MpsControl:
    """The control daemon of one pipe directory."""

    pipe_dir: Path
    log_dir: Path
    binary: str = "nvidia-cuda-mps-control"
    timeout_s: float = 5.0

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

    def _run(self, args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.executable(), *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=self.timeout_s,
                start_new_session=True,  # a Ctrl-C to us never reaches the daemon
            )
        except subprocess.TimeoutExpired as exc:
            what = "starting" if args else f"command {stdin.strip()!r}"
            raise MpsError(
                f"MPS control daemon ({self.pipe_dir}) did not answer {what} "
                f"within {self.timeout_s:g}s"
            ) from exc

    def command(self, line: str) -> str:
        """Send one command; its answer, or DaemonNotRunning / MpsError."""
        done = self._run([], line + "\n")
        answer = (done.stdout + done.stderr).strip()
        if NOT_RUNNING in answer:
            raise DaemonNotRunning(f"no MPS control daemon answers on {self.pipe_dir}")
        if done.returncode != 0 or answer.startswith("Unknown command"):
            raise MpsError(f"MPS control daemon refused {line!r}: {answer or done.returncode}")
        return done.stdout.strip()

    def running(self) -> bool:
        try:
            self.command("get_server_list")
        except DaemonNotRunning:
            return False
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
        """Start the daemon (``-d``); False when one was already running."""
        self.check_dirs()
        done = self._run(["-d"])
        answer = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            logger.info("started MPS control daemon on %s", self.pipe_dir)
            return True
        if ALREADY_RUNNING in answer:
            return False
        raise MpsError(f"{self.binary} -d failed ({done.returncode}): {answer}")

    def ensure_running(self, lock_file: Path) -> bool:
        """Start the daemon unless it answers; safe when many processes race (a file lock).
        Returns True when this call started it."""
        with file_lock(lock_file):
            if self.running():
                return False
            return self.start()

    def server_list(self) -> list[int]:
        return _pids(self.command("get_server_list"))

    def client_list(self, server: int) -> list[int]:
        """Client pids of a server; empty when that server is gone."""
        answer = self.command(f"get_client_list {server}")
        return [] if answer.endswith("not found") else _pids(answer)

    def clients(self) -> dict[int, list[int]]:
        """Every server and its clients."""
        return {server: self.client_list(server) for server in self.server_list()}

    def default_active_thread_percentage(self) -> float:
        return float(self.command("get_default_active_thread_percentage"))

    def set_default_active_thread_percentage(self, percentage: float) -> float:
        return float(self.command(f"set_default_active_thread_percentage {percentage:g}"))

    def set_default_device_pinned_mem_limit(self, device: int, limit_mb: int) -> None:
        self.command(f"set_default_device_pinned_mem_limit {device} {limit_mb}M")

    def daemon_pid(self) -> int | None:
        """The daemon's pid from its pid file, if that process is alive."""
        try:
            pid = int((self.pipe_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def quit(self) -> None:
        """Stop the daemon (its server ends with it) and wait until it has gone."""
        pid = self.daemon_pid()
        with contextlib.suppress(DaemonNotRunning):
            self.command("quit")
        deadline = time.monotonic() + self.timeout_s
        while pid is not None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def alive(pid: int) -> bool:
    """A running process; a zombie (dead, not yet reaped by its parent) is not."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _pids(answer: str) -> list[int]:
    return [int(token) for token in answer.split() if token.isdigit()]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one node (flock; released if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
