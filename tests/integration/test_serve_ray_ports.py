"""``mpsserve serve``'s own Ray, as an operator meets it on a machine where another Ray runs:
its ports from the ``ray:`` section (a busy one refused at start, named), token auth on, and
the Ray CLI commands its banner prints working as printed: ``serve status`` and a redeploy by
``ray job submit`` against it. Every port honours MPSSERVE_TEST_PORT_OFFSET."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mpsserve.ops.demo import make_request
from mpsserve.ops.localray import bind_problem
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import PORT_OFFSET
from tests.processes import read_until

# Apart from the other tests' ports, outside Ray's worker range (10002-19999) and below the
# kernel's ephemeral range (32768-60999), where any outgoing connection may hold a port.
HTTP_PORT, GRPC_PORT = 28500 + PORT_OFFSET, 29500 + PORT_OFFSET
GCS_PORT, DASHBOARD_PORT, AGENT_PORT = 25400 + PORT_OFFSET, 25410 + PORT_OFFSET, 25411 + PORT_OFFSET
RAY_DEFAULT_AGENT_PORT = 52365  # what ray.init's local cluster always took
BODY = encode_json_request(make_request(SMALL, rows=50, seed=5))


def service(store: Path, policy: dict[str, Any], ray: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "version_policy": policy,
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": 1, "cpus_per_replica": 0.5},
            }
        ],
        "ingress": {
            "host": "127.0.0.1",
            "http_port": HTTP_PORT,
            "grpc_port": GRPC_PORT,
            "metrics_port": HTTP_PORT + 1,
            "cpus_per_replica": 0.5,
        },
        "mps": {"mode": "off"},
        "ray": {"num_cpus": 4, **ray},
    }


@contextlib.contextmanager
def held(port: int) -> Iterator[bool]:
    """Listen on ``port`` on every address, as another cluster's server would; False where
    something else holds it already (then it is busy all the same)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", port))
        sock.listen()
        yield True
    except OSError:
        yield False
    finally:
        sock.close()


def serve(config: Path, state: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(PYTHONUNBUFFERED="1", MPSSERVE_STATE_DIR=str(state))
    return subprocess.Popen(
        [sys.executable, "-m", "mpsserve.ops.cli", "serve", "--config", str(config)],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def printed_commands(banner: str) -> tuple[str, str]:
    """The banner's `serve status` and `ray job submit` lines, as a user copies them."""
    block = re.search(r"  Ray CLI: +(.*?)\n  recorded in:", banner, re.S)
    assert block, banner
    lines = [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines()]
    status = next(line for line in lines if " status --address " in line)
    submit = next(line for line in lines if " job submit " in line)
    return status, submit


def shell(command: str, timeout_s: float) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{output[-6000:]}"
    return output


def infer() -> int:
    url = f"http://127.0.0.1:{HTTP_PORT}/v2/models/rec/infer"
    return requests.post(url, data=BODY, timeout=60).status_code


def gone(session: str) -> bool:
    """No process's command line names the session any more."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and session in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                return False
    return True


def test_job_submit_redeploys_against_serves_cluster_with_its_ports(
    tf_store: Path, tmp_path: Path
) -> None:
    ray = {"gcs_port": GCS_PORT, "dashboard_port": DASHBOARD_PORT}
    ray["dashboard_agent_listen_port"] = AGENT_PORT
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(service(tf_store, {"latest": 1}, ray)))
    state = tmp_path / "state"
    # Ray's default agent port held, as another cluster on the machine holds it
    with held(RAY_DEFAULT_AGENT_PORT):
        proc = serve(config, state)
        try:
            banner = read_until(proc, "Ctrl-C stops", timeout_s=400)
        except TimeoutError as exc:
            proc.kill()
            pytest.fail(str(exc))
    try:
        dashboard = f"http://127.0.0.1:{DASHBOARD_PORT}"
        assert f"Ray dashboard:    {dashboard}\n" in banner, banner
        assert "token auth on: paste the token of" in banner
        assert "Ray address:      " in banner and f":{GCS_PORT}  (session " in banner
        assert "Ray job server:   ready" in banner, banner
        record = json.loads((state / "clusters" / "mpsserve.json").read_text())
        assert record["dashboard_url"] == dashboard and record["ray_auth_mode"] == "token"
        assert record["ray_ports"]["dashboard_agent_listen_port"] == AGENT_PORT
        assert len(set(record["ray_ports"].values())) == 9  # every port, all different

        status, submit = printed_commands(banner)
        assert status.startswith("RAY_AUTH_MODE=token ") and f"--address {dashboard}" in status
        assert "status: RUNNING" in shell(status, 120)
        # the printed redeploy, onto a changed config: the policy pinned
        pinned = tmp_path / "pinned.yaml"
        pinned.write_text(yaml.safe_dump(service(tf_store, {"specific": [1]}, ray)))
        started = time.monotonic()
        logs = shell(submit.replace(str(config), str(pinned)), 400)
        print(f"job ran {time.monotonic() - started:.1f}s")
        assert "succeeded" in logs, logs[-4000:]
        assert "version_policy latest 1 -> specific [1]" in logs, logs[-4000:]
        assert "now live:" in logs
        assert infer() == 200

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, rest
        session = re.search(r"\(session (session_\S+)\)", banner)
        assert session, banner
        assert gone(session[1]), f"processes of {session[1]} outlived serve"
        assert bind_problem("0.0.0.0", GCS_PORT) is None  # its ports are free again
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_busy_port_stops_serve_before_ray_starts_naming_the_setting(
    tf_store: Path, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: the
        other.bind(("0.0.0.0", AGENT_PORT))  # port may be in TIME_WAIT from the test before
        other.listen()
        config = tmp_path / "service.yaml"
        body = service(tf_store, {"latest": 1}, {"dashboard_agent_listen_port": AGENT_PORT})
        config.write_text(yaml.safe_dump(body))
        proc = serve(config, tmp_path / "state")
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    said = f"ray.dashboard_agent_listen_port {AGENT_PORT} is in use (by pid {os.getpid()}"
    assert said in output, output
    assert "starting a local Ray" not in output  # refused before anything started
