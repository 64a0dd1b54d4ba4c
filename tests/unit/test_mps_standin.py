"""The CPU stand-in for ``nvidia-cuda-mps-control`` (tests/mps_standin) behaves like the real one.

Every daemon started here runs in ``tmp_path`` and is stopped (``quit``, then SIGKILL for any
leftover) by the ``mps`` fixture's finalizer.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "mps_standin" / "nvidia-cuda-mps-control"
NO_DAEMON = "Cannot find MPS control daemon process\n"
ALREADY = "An instance of this daemon is already running\n"
TIMEOUT_S = 10


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (nobody reaped it yet) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(0.05)


class StandIn:
    """One stand-in daemon's directories, and helpers to drive it through its command line."""

    def __init__(self, root: Path) -> None:
        self.pipe_dir, self.log_dir = root / "pipe", root / "log"
        self.env = {k: v for k, v in os.environ.items() if k != "MPSSERVE_STANDIN_CLIENT"}
        self.env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        self.env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        self.pids: set[int] = set()  # daemons and servers seen, killed at teardown if left
        self.children: list[subprocess.Popen[bytes]] = []

    @property
    def socket(self) -> Path:
        return self.pipe_dir / "control"

    @property
    def pid_file(self) -> Path:
        return self.pipe_dir / "nvidia-cuda-mps-control.pid"

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args],
            input=stdin,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )

    def ask(self, *commands: str) -> str:
        """Send ``commands`` (one stdin line each) in one invocation; its stdout."""
        result = self.run(stdin="".join(c + "\n" for c in commands))
        assert result.returncode == 0, result
        return result.stdout

    def start(self) -> int:
        """``-d``; the daemon's pid from its pid file."""
        result = self.run("-d")
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        pid = int(self.pid_file.read_text())
        self.pids.add(pid)
        return pid

    def server(self, timeout: float = 5.0) -> int:
        """Wait for a server to be listed; its pid."""
        wait_until(lambda: self.ask("get_server_list").strip(), timeout)
        pid = int(self.ask("get_server_list"))
        self.pids.add(pid)
        return pid

    def spawn(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """A sleeping python child with this daemon's env plus ``extra_env``."""
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], env={**self.env, **extra_env}
        )
        self.children.append(child)
        return child

    def client(self) -> subprocess.Popen[bytes]:
        return self.spawn(MPSSERVE_STANDIN_CLIENT="1")

    def clients_of(self, server: int) -> list[int]:
        return [int(line) for line in self.ask(f"get_client_list {server}").split()]

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.run(stdin="quit\n")
        for pid in self.pids:
            cmdline = Path(f"/proc/{pid}/cmdline")
            with contextlib.suppress(OSError):
                if alive(pid) and b"nvidia-cuda-mps" in cmdline.read_bytes():
                    os.kill(pid, signal.SIGKILL)
        for child in self.children:
            child.kill()
            child.wait()


@pytest.fixture
def mps(tmp_path: Path) -> Iterator[StandIn]:
    standin = StandIn(tmp_path)
    try:
        yield standin
    finally:
        standin.cleanup()


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


def test_no_daemon(mps: StandIn) -> None:
    result = mps.run(stdin="get_server_list\n")
    assert (result.returncode, result.stdout) == (1, NO_DAEMON)


def test_start_writes_pid_file_and_socket_and_refuses_a_second(mps: StandIn) -> None:
    pid = mps.start()
    assert alive(pid)
    assert "nvidia-cuda-mps-control" in Path(f"/proc/{pid}/cmdline").read_text()
    assert Path(f"/proc/{pid}/comm").read_text() == "nvidia-cuda-mps\n"  # as the real one's
    assert stat.S_ISSOCK(mps.socket.stat().st_mode)
    second = mps.run("-d")
    assert (second.returncode, second.stdout) == (1, ALREADY)
    assert int(mps.pid_file.read_text()) == pid
    mps.ask("get_server_list")
    log = (mps.log_dir / "control.log").read_text()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.search(rf"^\[{stamp} Control  {pid}\] Cmd:get_server_list$", log, re.MULTILINE)


def test_commands(mps: StandIn) -> None:
    mps.start()
    assert mps.ask("get_server_list") == ""
    assert mps.ask("get_client_list 12345") == "Server 12345 not found\n"
    assert mps.ask("get_server_status 12345") == "Server 12345 not found\n"
    assert mps.ask("get_default_active_thread_percentage") == "100.0\n"
    assert mps.ask("set_default_active_thread_percentage 50") == "50.0\n"
    assert mps.ask("get_default_active_thread_percentage") == "50.0\n"
    for bad in ("abc", "0", "101", "nan"):
        answer = mps.ask(f"set_default_active_thread_percentage {bad}")
        assert answer.count("\n") == 1 and bad in answer, answer
    assert mps.ask("get_default_active_thread_percentage") == "50.0\n"
    assert mps.ask("get_default_device_pinned_mem_limit 0") == ""  # unset: nothing
    assert mps.ask("set_default_device_pinned_mem_limit 0 2G") == ""
    assert mps.ask("get_default_device_pinned_mem_limit 0") == "2G\n"
    assert mps.ask("get_default_device_pinned_mem_limit 1") == ""
    assert mps.ask("no_such_command 1 2") == 'Unknown command "no_such_command 1 2"\n'


def test_several_commands_in_one_invocation_answer_in_order(mps: StandIn) -> None:
    mps.start()
    answers = mps.ask(
        "set_default_active_thread_percentage 25",
        "get_server_list",
        "bogus",
        "",
        "get_default_active_thread_percentage",
    )
    assert answers == '25.0\nUnknown command "bogus"\n25.0\n'


def test_a_marked_child_becomes_a_client_of_a_new_server(mps: StandIn) -> None:
    mps.start()
    mps.spawn()  # exports the pipe dir but lacks the marker: not a client
    mps.spawn(MPSSERVE_STANDIN_CLIENT="1", CUDA_MPS_PIPE_DIRECTORY=str(mps.pipe_dir.parent / "x"))
    time.sleep(1.0)  # two scans
    assert mps.ask("get_server_list") == ""
    client = mps.client()
    server = mps.server()
    assert alive(server)
    assert "nvidia-cuda-mps-server" in Path(f"/proc/{server}/cmdline").read_text()
    assert Path(f"/proc/{server}/comm").read_text() == "nvidia-cuda-mps\n"
    wait_until(lambda: mps.clients_of(server) == [client.pid])
    assert mps.ask(f"get_server_status {server}") == "ACTIVE\n"
    assert f"Starting new server {server}" in (mps.log_dir / "control.log").read_text()


def test_sigkill_of_the_daemon_kills_its_server_and_leaves_stale_files(mps: StandIn) -> None:
    daemon = mps.start()
    client = mps.client()
    server = mps.server()
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not alive(server), timeout=2.0)
    assert mps.socket.exists() and mps.pid_file.exists()
    result = mps.run(stdin="get_server_list\n")
    assert (result.returncode, result.stdout) == (1, NO_DAEMON)
    # A new daemon starts over the stale socket and serves the still-running client.
    new_daemon = mps.start()
    assert new_daemon != daemon and alive(new_daemon)
    new_server = mps.server()
    assert new_server != server
    wait_until(lambda: mps.clients_of(new_server) == [client.pid])


def test_standin_kill_server_then_a_new_server(mps: StandIn) -> None:
    mps.start()
    client = mps.client()
    server = mps.server()
    assert mps.ask("standin_kill_server") == ""
    wait_until(lambda: not alive(server), timeout=2.0)
    wait_until(lambda: mps.ask("get_server_list") not in ("", f"{server}\n"))
    new_server = mps.server()
    assert alive(new_server)
    wait_until(lambda: mps.clients_of(new_server) == [client.pid])


def test_quit_stops_daemon_and_server_and_removes_its_files(mps: StandIn) -> None:
    daemon = mps.start()
    mps.client()
    server = mps.server()
    assert mps.ask("quit") == ""
    wait_until(lambda: not alive(daemon) and not alive(server), timeout=2.0)
    assert not mps.socket.exists() and not mps.pid_file.exists()
    result = mps.run(stdin="get_server_list\n")
    assert (result.returncode, result.stdout) == (1, NO_DAEMON)
    mps.start()  # and it starts again


def test_unusable_pipe_dir_fails(mps: StandIn, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    mps.env["CUDA_MPS_PIPE_DIRECTORY"] = str(tmp_path / "file" / "pipe")
    result = mps.run("-d")
    assert result.returncode == 1
    assert "Failed to create pipe directory" in result.stderr


BUSY = "Cannot send command to MPS control daemon process\n"


def test_standin_refuse_refuses_the_next_n_commands_as_a_busy_daemon(mps: StandIn) -> None:
    mps.start()
    refused = mps.run(stdin="standin_refuse 2\nset_default_active_thread_percentage 50\n")
    assert (refused.returncode, refused.stdout) == (1, BUSY)
    refused = mps.run(stdin="get_server_list\nget_default_active_thread_percentage\n")
    assert (refused.returncode, refused.stdout) == (1, BUSY)  # later lines are skipped
    assert mps.ask("get_default_active_thread_percentage") == "100.0\n"  # refused: no effect
    log = (mps.log_dir / "control.log").read_text()
    assert "Refused (busy):set_default_active_thread_percentage 50" in log
    assert "Refused (busy):get_server_list" in log
    mps.ask("standin_refuse 5")
    assert mps.ask("standin_refuse 0") == ""  # never refused itself; ends the refusals
    assert mps.ask("get_server_list") == ""


def test_standin_delay_and_exclusive_make_a_slow_one_client_daemon(mps: StandIn) -> None:
    mps.start()
    assert mps.ask("standin_delay 0.5", "standin_exclusive 1") == ""
    started = time.monotonic()
    with subprocess.Popen(
        [str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=mps.env, text=True
    ) as first:
        assert first.stdin is not None and first.stdout is not None
        first.stdin.write("get_server_list\n")
        first.stdin.close()
        wait_until(lambda: "Cmd:get_server_list" in (mps.log_dir / "control.log").read_text())
        second = mps.run(stdin="get_default_active_thread_percentage\n")  # while first waits
        assert (second.returncode, second.stdout) == (1, BUSY)
        assert first.stdout.read() == ""  # answered, late
    assert first.returncode == 0 and time.monotonic() - started >= 0.5
    mps.ask("standin_delay 0", "standin_exclusive 0")
    assert mps.ask("get_default_active_thread_percentage") == "100.0\n"
