"""Which cluster an ops command talks to (mpsserve/ops/cluster.py): the record ``serve`` keeps,
the resolution order, a dead address failing in seconds, and the watchdog. No Ray: where a
command would join, ``join`` is replaced; the dead-address tests fail before Ray is asked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from mpsserve.errors import ClusterError
from mpsserve.ops import cli, status
from mpsserve.ops.cluster import (
    ClusterRecord,
    Target,
    discovery_path,
    endpoint,
    probe,
    read_record,
    record_path,
    remove_record,
    resolve,
    write_record,
)
from mpsserve.ops.deploy import Cluster
from mpsserve.ops.localray import LocalHead
from mpsserve.settings import settings


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Records under the test's own directory, and no RAY_ADDRESS from the caller."""
    monkeypatch.setenv("MPSSERVE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings.cache_clear()
    yield tmp_path / "state"
    settings.cache_clear()


@pytest.fixture
def listener() -> Iterator[str]:
    """A loopback port that accepts connections, standing in for a live GCS."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"  # bound, never listened, now closed: nothing there


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def record(app: str, address: str, pid: int | None = None) -> ClusterRecord:
    return ClusterRecord(
        app_name=app,
        address=address,
        session_dir="/tmp/ray/session_2026-01-01_00-00-00_000000_1",
        dashboard_url="http://127.0.0.1:8265",
        config_path="/srv/service.yaml",
        pid=os.getpid() if pid is None else pid,
        started=time.time(),
    )


# The record file.


def test_record_is_written_read_and_removed_by_its_writer_only(state: Path) -> None:
    mine = record("shop", "10.0.0.5:6379")
    path = write_record(mine)
    assert path == state / "clusters" / "shop.json" == record_path("shop")
    assert read_record("shop") == mine
    assert mine.session_name == "session_2026-01-01_00-00-00_000000_1"
    assert not remove_record("shop", pid=os.getpid() + 1)  # a later serve's record stays
    assert path.exists()
    assert remove_record("shop", pid=os.getpid())
    assert not path.exists() and read_record("shop") is None
    assert not remove_record("shop", pid=os.getpid())  # nothing left: no error


def test_a_record_from_before_the_metrics_port_still_reads(state: Path) -> None:
    old = {k: v for k, v in vars(record("shop", "10.0.0.5:6379")).items() if k != "metrics_url"}
    record_path("shop").parent.mkdir(parents=True)
    record_path("shop").write_text(json.dumps(old))
    found = read_record("shop")
    assert found is not None and found.metrics_url == ""


def test_unreadable_record_is_ignored_and_odd_app_names_refused(state: Path) -> None:
    (state / "clusters").mkdir(parents=True)
    (state / "clusters" / "shop.json").write_text("{not json")
    assert read_record("shop") is None
    with pytest.raises(ClusterError, match="app name"):
        record_path("../etc/passwd")


def test_state_dir_defaults_to_the_home_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPSSERVE_STATE_DIR")
    settings.cache_clear()
    assert record_path("mpsserve") == Path.home() / ".mpsserve" / "clusters" / "mpsserve.json"


# The resolution order: --address, RAY_ADDRESS, the app's live record, ray.address, an error.


def test_explicit_address_wins_over_everything(
    listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_record(record("mpsserve", listener))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    target = resolve("mpsserve", "10.0.0.1:6379", "10.0.0.2:6379", "a.yaml")
    assert target == Target("10.0.0.1:6379", "--address", "mpsserve")


def test_ray_address_env_comes_before_the_record(
    listener: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_record(record("mpsserve", listener))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # what `ray job submit` sets
    assert resolve("mpsserve", None, "10.0.0.2:6379").source == "RAY_ADDRESS"


def test_the_apps_live_record_comes_before_the_config(listener: str) -> None:
    write_record(record("shop", listener))
    write_record(record("other", "10.0.0.7:6379"))
    target = resolve("shop", None, "10.0.0.2:6379", "a.yaml")
    assert target.address == listener and target.app_name == "shop"
    assert str(record_path("shop")) in target.source


@pytest.mark.parametrize("gone", ["pid", "gcs"])
def test_a_stale_record_falls_back_to_the_config(
    gone: str, listener: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = record("shop", closed_port()) if gone == "gcs" else record("shop", listener, dead_pid())
    write_record(stale)
    target = resolve("shop", None, "10.0.0.2:6379", "a.yaml")
    assert target == Target("10.0.0.2:6379", "ray.address of a.yaml", "shop")
    assert "ignoring" in capsys.readouterr().err


def test_nothing_known_fails_naming_what_to_pass(listener: str) -> None:
    write_record(record("other", listener))  # another app's cluster is never taken
    with pytest.raises(ClusterError, match="--address HOST:PORT") as caught:
        resolve("shop", None, None, "a.yaml")
    assert "'shop'" in caught.value.message and "a.yaml sets no ray.address" in caught.value.message


# A dead address fails in seconds.


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:6379", ("10.0.0.1", 6379)),
        ("ray://head:10001", ("head", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
    ],
)
def test_endpoint(address: str, expected: tuple[str, int] | None) -> None:
    assert endpoint(address) == expected


def test_an_address_without_a_port_is_refused() -> None:
    with pytest.raises(ClusterError, match="HOST:PORT"):
        endpoint("head-node")


def test_probe_of_a_closed_port_fails_at_once() -> None:
    address = closed_port()
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"no Ray cluster at {address}"):
        probe(address)
    assert time.monotonic() - started < 2


def test_status_at_a_dead_address_exits_nonzero_in_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = closed_port()
    started = time.monotonic()
    assert cli.main(["status", "--address", address]) == 2
    assert time.monotonic() - started < 5
    assert f"mpsserve status: no Ray cluster at {address}" in capsys.readouterr().err


def test_deploy_at_a_dead_address_exits_nonzero_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deploy gives a refused address HEAD_STARTING_S (a head `ray start` is bringing up)."""
    monkeypatch.setattr("mpsserve.ops.deploy.use_cluster_token", lambda: None)
    monkeypatch.setattr("mpsserve.ops.deploy.HEAD_STARTING_S", 1.0)
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "rec", "store": str(tmp_path)}]}))
    started = time.monotonic()
    assert cli.main(["deploy", "--config", str(config), "--address", closed_port()]) == 2
    assert 1.0 <= time.monotonic() - started < 5
    assert "no Ray cluster at" in capsys.readouterr().err


def test_a_head_that_starts_listening_late_is_waited_for() -> None:
    """A port that refuses at first and listens a second later passes the probe."""
    import threading

    port = int(closed_port().rsplit(":", 1)[1])
    listener = socket.socket()

    def listen_later() -> None:
        time.sleep(1.0)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        probe(f"127.0.0.1:{port}", starting_s=5.0)
    finally:
        thread.join()
        listener.close()


# status needs no config file; it says which cluster and app it reads.


class FakeContext:
    address_info: ClassVar[dict[str, str]] = {
        "gcs_address": "10.0.0.5:6379",
        "session_dir": "/tmp/ray/session_x_1",
    }


@pytest.fixture
def joined(monkeypatch: pytest.MonkeyPatch) -> list[Target]:
    """Replace the Ray-facing part of ``status``: the join and the report."""
    targets: list[Target] = []

    def join(target: Target, **_: Any) -> FakeContext:
        targets.append(target)
        return FakeContext()

    monkeypatch.setattr(cli, "join", join)
    monkeypatch.setattr(cli, "use_cluster_token", lambda: None)
    monkeypatch.setattr("mpsserve.ops.status.gather", lambda app: {"ok": True, "app": app})
    return targets


def test_status_without_a_config_reads_the_recorded_cluster(
    joined: list[Target],
    listener: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no deployments/local.yaml here
    write_record(record("mpsserve", listener))
    assert cli.main(["status", "--json"]) == 0
    [target] = joined
    assert target.address == listener and target.app_name == "mpsserve"
    out, err = capsys.readouterr()
    assert "cluster 10.0.0.5:6379 (session session_x_1), app 'mpsserve'" in err
    assert '"app": "mpsserve"' in out  # stdout stays JSON


def test_status_app_from_the_flag_or_the_config(
    joined: list[Target],
    listener: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_record(record("shop", listener))
    assert cli.main(["status", "--app", "shop", "--json"]) == 0
    config = tmp_path / "shop.yaml"
    body = {"models": [{"name": "rec", "store": str(tmp_path)}], "ray": {"app_name": "shop"}}
    config.write_text(yaml.safe_dump(body))
    assert cli.main(["status", "--config", str(config), "--json"]) == 0
    assert [t.app_name for t in joined] == ["shop", "shop"]
    assert all(t.address == listener for t in joined)


def test_status_with_nothing_known_says_what_to_pass(
    joined: list[Target], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status"]) == 2
    assert not joined
    assert "pass --address HOST:PORT" in capsys.readouterr().err


# serve keeps the record while it serves.


def test_serve_records_its_cluster_until_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "service.yaml"
    body = {"models": [{"name": "rec", "store": str(tmp_path)}], "ray": {"app_name": "shop"}}
    config.write_text(yaml.safe_dump(body))
    cluster = Cluster(0, 2.0, "10.0.0.5:6379", "/tmp/ray/session_y_2", "http://10.0.0.5:8265")
    seen: list[ClusterRecord | None] = []
    ports = {"gcs_port": 6379, "dashboard_port": 8266, "dashboard_agent_listen_port": 40001}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    head = LocalHead(sleeper, "10.0.0.5", ports, "127.0.0.1", True, tmp_path / "log", "token")
    joined: list[Target] = []
    monkeypatch.setattr(cli, "_start_local", lambda config, path: head)

    def start_ray(config: object, target: Target) -> Cluster:
        joined.append(target)
        return cluster

    monkeypatch.setattr(cli, "start_ray", start_ray)
    monkeypatch.setattr(cli, "_ray_lines", lambda *_: "")
    monkeypatch.setattr(cli, "deploy_to", lambda config, cluster: None)
    monkeypatch.setattr(cli, "_write_request", lambda *_: tmp_path / "request.json")
    monkeypatch.setattr(cli, "_print_endpoints", lambda *_: None)
    entries = [{"metrics_address": "10.0.0.5:8002"}, {"metrics_address": "10.0.0.6:8002"}]
    monkeypatch.setattr(status, "ingress_entries", lambda app: entries)
    targets: list[Any] = []

    def serving() -> None:
        seen.append(read_record("shop"))
        targets.append(json.loads(discovery_path("shop").read_text()))

    monkeypatch.setattr(cli, "_wait_for_signal", serving)
    monkeypatch.setattr(cli, "_stop_mps", lambda config: None)
    assert cli.main(["serve", "--config", str(config)]) == 0
    [written] = seen
    # Prometheus's targets: every node's metrics port, labelled with the app; the URL recorded
    want = [{"targets": ["10.0.0.5:8002", "10.0.0.6:8002"], "labels": {"app": "shop"}}]
    assert targets == [want]
    assert written is not None and written.metrics_url == "http://10.0.0.5:8002/metrics"
    assert not discovery_path("shop").exists()  # removed with the record
    assert written is not None and written.pid == os.getpid()
    assert (written.address, written.session_name) == ("10.0.0.5:6379", "session_y_2")
    assert written.config_path == str(config.resolve())
    assert written.dashboard_url == "http://127.0.0.1:8266"  # the local head's
    assert (written.ray_ports, written.ray_auth_mode) == (ports, "token")
    assert [t.address for t in joined] == ["10.0.0.5:6379"]
    assert read_record("shop") is None  # removed when serve stopped
    assert sleeper.wait(timeout=10) == -signal.SIGTERM  # the local head stopped with it


# The watchdog ends a command whose main thread does not come back to Python.

WATCHED = """
import signal, sys, time
from mpsserve.ops.cluster import Watchdog
signal.signal(signal.SIGTERM, lambda *_: None)  # a handler that does nothing, as if stuck
with Watchdog("status", grace_s=0.5) as watchdog:
    if sys.argv[1] == "deadline":
        watchdog.arm(1.0, "no Ray answered at 127.0.0.1:1 within 1 s")
    print("waiting", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize(
    ("case", "code", "said"),
    [
        ("deadline", 2, "no Ray answered at 127.0.0.1:1 within 1 s"),
        ("sigterm", 143, "stopped by SIGTERM"),
    ],
)
def test_watchdog_ends_the_command_promptly(case: str, code: int, said: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WATCHED), case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert child.stdout is not None and child.stdout.readline() == "waiting\n"
    started = time.monotonic()
    if case == "sigterm":
        child.terminate()
    _, err = child.communicate(timeout=20)
    assert child.returncode == code
    assert f"mpsserve status: {said}" in err
    assert time.monotonic() - started < 5
