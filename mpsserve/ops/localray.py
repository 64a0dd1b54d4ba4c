"""The local Ray cluster of ``mpsserve serve``: ``ray start --head --block`` as a child process.

Why a child and not ``ray.init(address="local")``: ``ray.init`` cannot set the dashboard
agent's ports, so its agent takes Ray's fixed 52365 and, where another Ray cluster on the
machine holds it, the agent never listens and every ``ray job submit`` fails ("No available
agent") while the service looks healthy. ``ray start`` takes every port (the ``ray:``
section's ``*_port`` settings, a free one where null); each is checked free before it starts,
and the job server is checked after. The child runs in its own session (Ctrl-C reaches
``mpsserve serve``, which stops things in order) and gets SIGTERM if ``mpsserve serve`` dies;
``ray start --block`` ends exactly the processes it started when it gets SIGTERM.

Token auth: as ``ray.init`` does for a new local cluster, on unless ``RAY_AUTH_MODE`` says
otherwise, with the token of ``~/.ray/auth_token`` (generated there if missing). The mode is
put in this process's environment before Ray is imported, and the child's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mpsserve.config import RAY_PORT_FIELDS, RayConfig
from mpsserve.errors import ClusterError

#: How long ``ray start`` may take to bring the head up (a loaded 2-core box: ~10-20 s).
START_TIMEOUT_S = 180.0
#: How long the job server may take to answer once the head is up.
JOB_SERVER_TIMEOUT_S = 60.0
#: The ``ray start --head`` flag of each port setting.
FLAGS = {
    name: "--port" if name == "gcs_port" else "--" + name.replace("_", "-")
    for name in RAY_PORT_FIELDS
}
_PR_SET_PDEATHSIG = 1
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


# --- ports -------------------------------------------------------------------------------


def bind_problem(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound on ``host`` now (None: it can). SO_REUSEADDR as servers
    set it, so a port left in TIME_WAIT counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is in use" + _by(port)
            return f"cannot be bound on {host}: {exc.strerror or exc}"
    return None


def _by(port: int) -> str:
    pid = listener_pid(port)
    if pid is None:
        return ""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    return f" (by pid {pid}, {name})"


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port``, where /proc shows it (Linux, our own user's
    processes or all as root); None where it does not."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if (
                    len(cols) > 9
                    and cols[3] == _LISTEN
                    and int(cols[1].rsplit(":", 1)[1], 16) == port
                ):
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def free_port(host: str = "") -> int:
    """A port nothing listens on now (the kernel's choice, outside Ray's worker range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def plan_ports(config: RayConfig, source: str) -> dict[str, int]:
    """Every port of the local head: the configured ones, checked free on the address each
    needs (ClusterError naming the setting if one is not), the others chosen free."""
    chosen: dict[str, int] = {}
    problems = []
    for name, port in config.ports().items():
        if name == "dashboard_port" and not config.dashboard:
            continue
        if port is None:
            continue
        host = config.dashboard_host if name == "dashboard_port" else "0.0.0.0"
        problem = bind_problem(host, port)
        if problem is not None:
            problems.append(f"ray.{name} {port} {problem}")
        chosen[name] = port
    if problems:
        raise ClusterError(
            f"cannot start the local Ray of {source}: "
            + "; ".join(problems)
            + ". Set free ports in its ray: section (null: a free one chosen at start); "
            "another Ray cluster on this machine keeps its own"
        )
    for name, port in config.ports().items():
        if port is None and (name != "dashboard_port" or config.dashboard):
            chosen[name] = _unused(set(chosen.values()))
    return chosen


def _unused(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    return port


# --- token auth ---------------------------------------------------------------------------


def auth_mode() -> str:
    """``token`` or ``disabled``: Ray's RAY_AUTH_MODE, else token (Ray's default for a new
    local cluster)."""
    return "disabled" if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" else "token"


def token_source() -> str:
    """Where the token clients need is: the variable or the file Ray reads it from."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    try:
        return Path(token_source()).read_text().strip() or None
    except OSError:
        return None


def prepare_auth(ray_bin: str) -> str:
    """Put the mode in the environment (before Ray is imported: it reads it once) and make
    sure a token exists where it is on; returns the mode."""
    mode = auth_mode()
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token" and read_token() is None:
        done = subprocess.run(
            [ray_bin, "get-auth-token", "--generate"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0 or read_token() is None:
            raise ClusterError(
                f"RAY_AUTH_MODE=token and no token in {token_source()}; `ray get-auth-token "
                f"--generate` failed: {done.stderr.strip()[-500:]}"
            )
    return mode


def ray_binary() -> str:
    """The ``ray`` of this Python's environment (so the cluster runs this mpsserve)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise ClusterError("no `ray` command beside this Python or on PATH")
    return found


# --- the head -----------------------------------------------------------------------------


@dataclass
class LocalHead:
    """A running ``ray start --head --block`` child of this process."""

    process: subprocess.Popen[bytes]
    node_ip: str
    ports: dict[str, int]
    dashboard_host: str
    dashboard: bool
    log: Path
    auth: str

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.ports['gcs_port']}"

    @property
    def dashboard_url(self) -> str:
        host = "127.0.0.1" if self.dashboard_host in ("0.0.0.0", "::") else self.dashboard_host
        return f"http://{host}:{self.ports['dashboard_port']}" if self.dashboard else "(off)"

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGTERM: ``ray start --block`` stops the processes it started, and only those."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_head(config: RayConfig, source: str, log: Path, node_ip: str) -> LocalHead:
    """Check the ports, launch ``ray start --head --block`` and wait until its GCS answers."""
    ports = plan_ports(config, source)
    ray_bin = ray_binary()
    print(f"starting a local Ray (ray start --head; its output: {log}) ...", flush=True)
    command = [
        ray_bin,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={node_ip}",
        f"--include-dashboard={'true' if config.dashboard else 'false'}",
        f"--dashboard-host={config.dashboard_host}",
        "--disable-usage-stats",
        *(f"{FLAGS[name]}={port}" for name, port in ports.items()),
    ]
    if config.num_cpus is not None:
        command.append(f"--num-cpus={config.num_cpus}")
    if config.num_gpus is not None:
        command.append(f"--num-gpus={config.num_gpus}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a job's `python` (ray job submit -- python -m ...) is this environment's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C is ours to handle, in order
            preexec_fn=_die_with_parent,
        )
    head = LocalHead(
        process, node_ip, ports, config.dashboard_host, config.dashboard, log, auth_mode()
    )
    try:
        _wait_started(head)
    except BaseException:
        head.stop()
        raise
    return head


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_started(head: LocalHead, timeout_s: float = START_TIMEOUT_S) -> None:
    """Until ``ray start`` says the runtime started (its raylet registered): only then can
    a driver join."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise ClusterError(
                f"`ray start --head` exited {head.process.returncode}; its output "
                f"({head.log}):\n{head.log_tail()}"
            )
        if "Ray runtime started" in head.log_tail(200_000):
            return
        time.sleep(0.25)
    raise ClusterError(
        f"`ray start --head` did not start within {timeout_s:g} s; its output ({head.log}):\n"
        f"{head.log_tail()}"
    )


def job_server_problem(head: LocalHead, timeout_s: float = JOB_SERVER_TIMEOUT_S) -> str | None:
    """None once the job server answers (the dashboard's /api/jobs/, with the token where
    auth is on) and the dashboard agent that runs jobs listens on its port; else why not."""
    if not head.dashboard:
        return "the dashboard is off (ray.dashboard: false): no job server"
    agent = f"http://127.0.0.1:{head.ports['dashboard_agent_listen_port']}/api/healthz"
    checks: list[tuple[str, Callable[[], str | None]]] = [
        ("the job server", lambda: _get(f"{head.dashboard_url}/api/jobs/", head.auth)),
        ("the dashboard agent", lambda: _get(agent, head.auth)),
    ]
    deadline = time.monotonic() + timeout_s
    for what, check in checks:
        while (problem := check()) is not None:
            if time.monotonic() >= deadline:
                return f"{what} does not answer: {problem} (Ray's logs: {head.log})"
            time.sleep(1.0)
    return None


def _get(url: str, auth: str) -> str | None:
    request = urllib.request.Request(url)
    token = read_token() if auth == "token" else None
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {url}"
    except OSError as exc:
        return f"{url}: {exc}"


def start_local(config: RayConfig, source: str, log: Path) -> LocalHead:
    """Token auth settled (before Ray is imported), then the head on this node's address."""
    prepare_auth(ray_binary())
    import ray

    return start_head(config, source, log, ray.util.get_node_ip_address())
