"""A real Redis Cluster on loopback for tests: ``redis-server`` processes started here.

The binary is ``$MPSSERVE_REDIS_BIN`` (the Makefile puts Debian's build in the venv), else
``redis-server`` beside the test's Python or on PATH; without one the tests that need it skip.
Each node gets two free loopback ports (clients, cluster bus) and its own directory; the
slots are split evenly over the masters with CLUSTER ADDSLOTSRANGE and the nodes meet with
CLUSTER MEET, all from Python, and the cluster is up once every node says ``cluster_state:ok``.
Every wait is bounded; processes are stopped by their PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

BIN_ENV = "MPSSERVE_REDIS_BIN"
SLOTS = 16384
#: Short, so that a killed master marks the cluster down within seconds.
NODE_TIMEOUT_MS = 2000


def redis_binary() -> str | None:
    """The redis-server to run: $MPSSERVE_REDIS_BIN, the venv's, or one on PATH."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    beside = Path(sys.executable).parent / "redis-server"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL, as a crashed shard: no goodbye to the others."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Cluster:
    binary: str
    directory: Path
    masters: int = 3
    password: str | None = None
    #: Replicas per master (CLUSTER REPLICATE), for failover tests; the first ``masters``
    #: nodes are the masters, then each master's replicas in turn.
    replicas: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the masters and form the cluster; on any failure stop what was started."""
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        for i in range(self.masters * (1 + self.replicas)):
            node = Node(free_port(), free_port(), self.directory / f"node-{i}")
            self.nodes.append(node)
            self._launch(node)
        deadline = time.monotonic() + timeout_s
        clients = [self._client(n, deadline) for n in self.nodes]
        try:
            self._assign_slots(clients[: self.masters])
            for client in clients[1:]:
                first = self.nodes[0]  # its bus port too: it is not port + 10000
                client.execute_command("CLUSTER MEET", "127.0.0.1", first.port, first.bus_port)
            self._wait_ok(clients, deadline)
            self._replicate(clients, deadline)
        finally:
            for client in clients:
                client.close()

    def _replicate(self, clients: list[redis.Redis], deadline: float) -> None:
        """Each replica follows its master once it knows it; up when every link is."""
        ids = [c.execute_command("CLUSTER MYID") for c in clients[: self.masters]]
        for i, client in enumerate(clients[self.masters :]):
            master = ids[i % self.masters]
            master_id = master.decode() if isinstance(master, bytes) else str(master)
            client.execute_command("CLUSTER REPLICATE", master_id)
        while not all(
            c.info("replication").get("master_link_status") == "up" for c in clients[self.masters :]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("replicas did not link to their masters in time")
            time.sleep(0.1)

    def wait_replicated(self, timeout_s: float = 30.0) -> None:
        """Until every replica has every write its master has (replication is async)."""
        deadline = time.monotonic() + timeout_s
        for i, replica in enumerate(self.nodes[self.masters :]):
            master = self.nodes[i % self.masters]
            with self._client(master, deadline) as m, self._client(replica, deadline) as r:
                while r.info("replication").get("slave_repl_offset") != m.info("replication").get(
                    "master_repl_offset"
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {replica.port} behind in time")
                    time.sleep(0.1)

    def _launch(self, node: Node) -> None:
        node.directory.mkdir(parents=True)
        args = [
            self.binary,
            "--port", str(node.port),
            "--cluster-port", str(node.bus_port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.directory / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--dir", str(node.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(node.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        with open(node.directory / "stderr.log", "wb") as stderr:  # startup errors land here
            node.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)

    def _client(self, node: Node, deadline: float) -> redis.Redis:
        while True:
            client = redis.Redis(port=node.port, password=self.password, socket_timeout=2)
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                client.close()
                assert node.process is not None
                if node.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log(node)
                    raise RuntimeError(f"redis-server {node.port} did not start: {log}") from None
                time.sleep(0.05)

    def _assign_slots(self, clients: list[redis.Redis]) -> None:
        share = SLOTS // len(clients)
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)

    def _wait_ok(self, clients: list[redis.Redis], deadline: float) -> None:
        while True:
            infos = [c.execute_command("CLUSTER INFO") for c in clients]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(clients)
                for i in infos
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok in time: {infos}")
            time.sleep(0.1)

    def log(self, node: Node) -> str:
        paths = [node.directory / name for name in ("stderr.log", "redis.log")]
        return "".join(p.read_text()[-2000:] for p in paths if p.exists()) or "(no log)"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def running_cluster(directory: Path, **options: Any) -> Iterator[Cluster]:
    """A started cluster (``Cluster``'s options), stopped after; skips without redis-server."""
    binary = redis_binary()
    if binary is None:
        pytest.skip(f"no redis-server: set {BIN_ENV} or run `make` (installs it into the venv)")
    cluster = Cluster(binary, directory, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh 3-master cluster for one test (a test may kill its nodes)."""
    with running_cluster(tmp_path / "redis") as cluster:
        yield cluster
