"""The README's service command path: ``mpsserve serve`` prints a request that works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from mpsserve.ops.demo import make_request
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.integration.conftest import PORT_OFFSET
from tests.processes import read_until

PORT = 28100 + PORT_OFFSET  # outside Ray's worker port range (10002-19999)
METRICS_PORT = 27110 + PORT_OFFSET


def test_serve_prints_a_working_request_and_stops_on_ctrl_c(tf_store: Path, tmp_path: Path) -> None:
    config = {
        "models": [{"name": "rec", "store": str(tf_store), "placement": {"cpus_per_replica": 0.5}}],
        "ingress": {"http_port": PORT, "metrics_port": METRICS_PORT, "cpus_per_replica": 0.5},
        "ray": {"num_cpus": 2, "dashboard_port": PORT + 50},
    }
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(config))
    state = tmp_path / "state"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": "",
        "MPSSERVE_STATE_DIR": str(state),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpsserve.ops.cli", "serve", "--config", "service.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        try:
            output = read_until(proc, "Ctrl-C stops", timeout_s=300)
        except TimeoutError as exc:
            pytest.fail(str(exc))
        command = re.search(r"Try it.*?:\n(.*?)\n\n", output, re.S)
        assert command, output
        curl = command.group(1).replace("\\\n", " ")
        result = subprocess.run(
            ["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.stdout.startswith("score [2000]"), result.stdout + result.stderr
        _status_finds_the_recorded_cluster(output, env, state)
        _metrics_port_is_printed_recorded_and_listed(output, state)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest
        assert "stopped." in rest
        assert not (state / "clusters" / "mpsserve.json").exists()  # removed at stop
        assert not (state / "clusters" / "mpsserve.prometheus.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def _status_finds_the_recorded_cluster(banner: str, env: dict[str, str], state: Path) -> None:
    """From elsewhere, with no config and no address: the cluster serve recorded, said."""
    address = re.search(r"Ray address:\s+(\S+)", banner)
    assert address, banner
    assert json.loads((state / "clusters" / "mpsserve.json").read_text())["address"] == address[1]
    status = subprocess.run(
        [sys.executable, "-m", "mpsserve.ops.cli", "status", "--json"],
        cwd=state.parent.parent,  # no deployments/local.yaml there
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"cluster {address[1]} (session session_" in status.stderr, status.stderr
    report = json.loads(status.stdout)
    assert report["app"] == "mpsserve", status.stdout + status.stderr
    # every node's metrics port, as its ingresses say (one node here)
    assert [url.rsplit(":", 1)[1] for url in report["metrics"]] == [f"{METRICS_PORT}/metrics"]


def _metrics_port_is_printed_recorded_and_listed(banner: str, state: Path) -> None:
    """The banner's metrics URL answers with the service's series; the record holds it and
    Prometheus's targets file lists its port, labelled with the app."""
    url = re.search(r"metrics:\s+(http://\S+/metrics)", banner)
    assert url and url[1].endswith(f":{METRICS_PORT}/metrics"), banner
    assert json.loads((state / "clusters" / "mpsserve.json").read_text())["metrics_url"] == url[1]
    groups = json.loads((state / "clusters" / "mpsserve.prometheus.json").read_text())
    assert groups == [{"targets": [url[1].split("/")[2]], "labels": {"app": "mpsserve"}}]
    assert str(state / "clusters" / "mpsserve.prometheus.json") in banner
    deadline, text = time.monotonic() + 60, ""
    while "ray_mpsserve_served_version" not in text and time.monotonic() < deadline:
        answer = requests.get(url[1], timeout=30)  # 503 while the agent is not read yet
        text = answer.text if answer.status_code == 200 else ""
        time.sleep(0 if text else 1)
    assert "ray_mpsserve_served_version" in text


def test_deploy_to_a_running_cluster(tf_store: Path, tmp_path: Path) -> None:
    """`ray start --head` then `mpsserve deploy`: the app serves and outlives the command."""
    ray_port, http_port = 26390 + PORT_OFFSET, 28200 + PORT_OFFSET
    config = {
        "models": [{"name": "rec", "store": str(tf_store), "placement": {"cpus_per_replica": 0.5}}],
        "ingress": {
            "http_port": http_port,
            "metrics_port": 27120 + PORT_OFFSET,
            "cpus_per_replica": 0.5,
        },
    }
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(config))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={ray_port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deploy = subprocess.run(
            [
                sys.executable,
                "-m",
                "mpsserve.ops.cli",
                "deploy",
                "--config",
                "service.yaml",
                "--address",
                f"127.0.0.1:{ray_port}",
            ],
            cwd=tmp_path,
            # a loaded 2-core box takes ~30 s from `ray start` to a raylet a driver can join
            env={**os.environ, "MPSSERVE_CONNECT_TIMEOUT_S": "120"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "deployed application 'mpsserve'" in deploy.stdout
        body = encode_json_request(make_request(SMALL, rows=2000, seed=4))
        url = f"http://127.0.0.1:{http_port}/v2/models/rec/infer"
        response = requests.post(url, data=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [2000]
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes this head started
        head.wait(timeout=120)
