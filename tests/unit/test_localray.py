"""The local Ray's ports (mpsserve/ops/localray.py, the ray: section of mpsserve/config.py):
validated at load, checked free before ``ray start``, a busy one named with its setting and
the process holding it. Real sockets on loopback; no Ray."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpsserve.config import RAY_PORT_FIELDS, RayConfig, parse_config
from mpsserve.errors import ClusterError, ConfigError
from mpsserve.ops import localray
from mpsserve.ops.localray import (
    FLAGS,
    auth_mode,
    bind_problem,
    listener_pid,
    plan_ports,
    read_token,
    token_source,
)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port this process listens on (on every address, as a Ray server would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def free() -> int:
    return localray.free_port()


# Config: validated where it is loaded.


def test_defaults_fix_only_the_dashboard_away_from_rays_own() -> None:
    ports = RayConfig().ports()
    assert set(ports) == set(RAY_PORT_FIELDS) == set(FLAGS)
    assert ports.pop("dashboard_port") == 8266  # not 8265, which a `ray start` cluster keeps
    assert set(ports.values()) == {None}  # free ones, chosen at start
    assert FLAGS["gcs_port"] == "--port"
    assert FLAGS["dashboard_agent_listen_port"] == "--dashboard-agent-listen-port"


@pytest.mark.parametrize(
    ("ray", "said"),
    [
        ({"gcs_port": 12000}, "gcs_port 12000 is in Ray's worker port range 10002-19999"),
        (
            {"gcs_port": 30001, "metrics_export_port": 30001},
            "metrics_export_port and gcs_port are both 30001",
        ),
        ({"dashboard_port": 80}, "ray.dashboard_port: Input should be greater than or equal"),
        (
            {"address": "10.0.0.5:6379", "dashboard_agent_listen_port": 30002},
            "dashboard_agent_listen_port: ports of the local Ray",
        ),
        ({"dashboard_agent_port": 30003}, "ray.dashboard_agent_port: Extra inputs"),
    ],
)
def test_bad_port_settings_fail_at_load_naming_the_setting(
    ray: dict[str, object], said: str, tmp_path: Path
) -> None:
    body = {"models": [{"name": "rec", "store": str(tmp_path)}], "ray": ray}
    with pytest.raises(ConfigError) as caught:
        parse_config(body, "service.yaml")
    assert said in str(caught.value), caught.value


def test_a_ray_port_may_not_be_an_ingress_port(tmp_path: Path) -> None:
    body = {
        "models": [{"name": "rec", "store": str(tmp_path)}],
        "ingress": {"http_port": 30100},
        "ray": {"dashboard_port": 30100},
    }
    with pytest.raises(ConfigError, match=r"ray\.dashboard_port and ingress\.http_port are both"):
        parse_config(body, "service.yaml")


def test_a_joined_cluster_keeps_the_default_ports_without_complaint() -> None:
    joined = RayConfig(address="10.0.0.5:6379")
    assert joined.dashboard_port == 8266
    # a Serve config file carries every field, defaults included: it loads again
    assert RayConfig.model_validate(joined.model_dump()) == joined


# The check before start.


def test_a_busy_port_is_named_with_the_process_holding_it(listening: int) -> None:
    assert listener_pid(listening) == os.getpid()
    problem = bind_problem("0.0.0.0", listening)
    assert (
        problem
        == f"is in use (by pid {os.getpid()}, {Path('/proc/self/comm').read_text().strip()})"
    )
    assert bind_problem("127.0.0.1", listening) is not None  # the wildcard holds it there too
    assert bind_problem("0.0.0.0", free()) is None


def test_plan_ports_reports_every_busy_setting_and_starts_nothing(listening: int) -> None:
    config = RayConfig(dashboard_agent_listen_port=listening, gcs_port=free())
    with pytest.raises(ClusterError) as caught:
        plan_ports(config, "service.yaml")
    message = str(caught.value)
    assert f"ray.dashboard_agent_listen_port {listening} is in use (by pid {os.getpid()}" in message
    assert "ray.gcs_port" not in message  # the free one is not blamed
    assert "service.yaml" in message and "ray: section" in message


def test_plan_ports_fills_the_free_ones_all_different() -> None:
    gcs = free()
    planned = plan_ports(RayConfig(gcs_port=gcs, dashboard_port=free()), "s.yaml")
    assert set(planned) == set(RAY_PORT_FIELDS)
    assert planned["gcs_port"] == gcs
    assert len(set(planned.values())) == len(planned)
    assert all(not 10002 <= p <= 19999 for p in planned.values())


def test_the_dashboard_port_is_checked_on_its_host_and_skipped_when_off(listening: int) -> None:
    with pytest.raises(ClusterError, match=f"ray.dashboard_port {listening} is in use"):
        plan_ports(RayConfig(dashboard_port=listening, dashboard_host="127.0.0.1"), "s.yaml")
    planned = plan_ports(RayConfig(dashboard_port=listening, dashboard=False), "s.yaml")
    assert "dashboard_port" not in planned  # no dashboard: nothing binds it


# Token auth: Ray's own knob, said accurately.


def test_token_auth_follows_ray_auth_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert auth_mode() == "token"  # Ray's default for a new local cluster
    monkeypatch.setenv("RAY_AUTH_MODE", "DISABLED")
    assert auth_mode() == "disabled"
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert (token_source(), read_token()) == (str(token), "s3cret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "inline")
    assert (token_source(), read_token()) == ("$RAY_AUTH_TOKEN", "inline")


# The banner: how to reach this Ray, with what Ray's CLI needs.


@pytest.mark.parametrize("auth", ["token", "disabled"])
def test_the_banner_prints_ray_commands_that_carry_the_auth_mode(
    auth: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpsserve.ops import cli
    from mpsserve.ops.deploy import Cluster
    from mpsserve.ops.localray import LocalHead

    monkeypatch.setattr(cli, "job_server_problem", lambda head: None)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    ports = {"gcs_port": 30010, "dashboard_port": 30011}
    head = LocalHead(None, "10.0.0.5", ports, "0.0.0.0", True, tmp_path / "log", auth)  # type: ignore[arg-type]
    cluster = Cluster(0, 2.0, "10.0.0.5:30010", "/tmp/ray/session_x_1", "http://0.0.0.0:30011")
    lines = cli._ray_lines(cluster, head, "service.yaml")
    url = "http://127.0.0.1:30011"  # where the dashboard listens on every address
    assert f"Ray dashboard:    {url}\n" in lines
    assert "Ray address:      10.0.0.5:30010  (session session_x_1)" in lines
    assert "Ray job server:   ready" in lines
    env = "RAY_AUTH_MODE=token " if auth == "token" else ""
    assert f"{env}{cli._command('serve')} status --address {url}\n" in lines
    assert f"{env}{cli._command('ray')} job submit --address {url} \\\n" in lines
    assert f"-- python -m mpsserve.ops.redeploy --config {Path('service.yaml').resolve()}" in lines
    if auth == "token":
        assert f"token auth on: paste the token of {tmp_path / 'auth_token'} when it asks" in lines
    else:
        assert "token auth off (RAY_AUTH_MODE=disabled)" in lines


def test_the_banner_says_when_the_dashboard_is_off(tmp_path: Path) -> None:
    from mpsserve.ops import cli
    from mpsserve.ops.deploy import Cluster
    from mpsserve.ops.localray import LocalHead

    head = LocalHead(None, "10.0.0.5", {"gcs_port": 30010}, "127.0.0.1", False, tmp_path, "token")  # type: ignore[arg-type]
    cluster = Cluster(0, 2.0, "10.0.0.5:30010", "/tmp/ray/session_x_1")
    lines = cli._ray_lines(cluster, head, "service.yaml")
    assert "Ray dashboard:    off (ray.dashboard: false)" in lines
    assert "job submit" not in lines
