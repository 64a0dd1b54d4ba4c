"""Deploying to a `ray start` cluster with its dashboard and job server, as docs/deployment.md
does: ``serve deploy FILE``, ``mpsserve deploy --config FILE`` with a Serve config file, and a
redeploy submitted with ``ray job submit`` while a client keeps sending requests.

The cluster is this module's own (its own ports, temp dir and process group, token auth off
for it and its clients) and is always torn down, by the pid of the process that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from mpsserve.ops.demo import make_request, write_demo_model
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SEED, SMALL
from tests.integration.conftest import PORT_OFFSET

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Every port above 19999 (Ray's worker ports are 10002-19999), below the kernel's ephemeral
# range (32768-60999) and apart from the other tests', shifted by MPSSERVE_TEST_PORT_OFFSET
# like theirs.
GCS_PORT, DASHBOARD_PORT = 25450 + PORT_OFFSET, 25460 + PORT_OFFSET
HTTP_PORT, GRPC_PORT = 30800 + PORT_OFFSET, 30900 + PORT_OFFSET
RAY_PORTS = {
    "--ray-client-server-port": 25461 + PORT_OFFSET,
    "--dashboard-agent-listen-port": 25462 + PORT_OFFSET,
    "--dashboard-agent-grpc-port": 25463 + PORT_OFFSET,
    "--metrics-export-port": 25464 + PORT_OFFSET,
    "--runtime-env-agent-port": 25465 + PORT_OFFSET,
    "--node-manager-port": 25466 + PORT_OFFSET,
    "--object-manager-port": 25467 + PORT_OFFSET,
}
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
INFER = f"http://127.0.0.1:{HTTP_PORT}/v2/models/rec/infer"
#: After the job ends, an ingress may route to a replica of the old config that is still
#: draining until Serve's long poll tells it the replica left (well under a second).
SETTLE_S = 2.0


@dataclass
class Cluster:
    env: dict[str, str]
    temp_dir: Path
    log: Path


def _get_json(url: str, timeout_s: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def _wait_for(what: str, check: Callable[[], T], timeout_s: float) -> T:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"{what} not within {timeout_s}s (last: {last!r})")


def _our_leftovers(marker: str) -> list[int]:
    """Processes whose command line names this cluster's temp dir: started by us."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="mpsrj", dir="/tmp"))  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",  # the same for the cluster, its jobs and every client here
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # jobs find this venv's python
        PYTHONUNBUFFERED="1",
    )
    log = temp_dir / "ray-start.log"
    ports = [f"{flag}={port}" for flag, port in RAY_PORTS.items()]
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={GCS_PORT}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=4",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *ports,
    ]
    with log.open("w") as out:
        head = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for("the job server", lambda: _get_json(f"{DASHBOARD}/api/jobs/") is not None, 180)
        yield Cluster(env, temp_dir, log)
    finally:
        head.send_signal(signal.SIGTERM)  # --block: `ray start` stops what it started
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        for pid in _our_leftovers(str(temp_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1 and 2 of the small demo model (different seeds, so different scores)."""
    path = tmp_path_factory.mktemp("redeploy-store")
    write_demo_model(path, "tensorflow", version=1, seed=SEED, spec=SMALL)
    write_demo_model(path, "tensorflow", version=2, seed=SEED + 1, spec=SMALL)
    return path


def service(store: Path, replicas: int, policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "version_policy": policy,
                "max_rows": 4000,
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": replicas, "cpus_per_replica": 0.5},
            }
        ],
        "ingress": {
            "host": "127.0.0.1",
            "http_port": HTTP_PORT,
            "grpc_port": GRPC_PORT,
            "metrics_port": HTTP_PORT + 1,
            "replicas": 2,  # a rolling update restarts them one at a time
            "cpus_per_replica": 0.5,
        },
        "mps": {"mode": "off"},
    }


def run(cluster: Cluster, args: list[str], timeout_s: float, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        args, env=cluster.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{output[-6000:]}"
    return output


def serve_config_file(cluster: Cluster, body: dict[str, Any], out: Path) -> Path:
    """`mpsserve serve-config` of a service YAML: the Serve config file a user deploys."""
    source = out.with_suffix(".service.yaml")
    source.write_text(yaml.safe_dump(body))
    cli = [sys.executable, "-m", "mpsserve.ops.cli", "serve-config", "--config", str(source)]
    out.write_text(run(cluster, cli, 120))
    return out


def application() -> dict[str, Any]:
    return dict(_get_json(f"{DASHBOARD}/api/serve/applications/")["applications"]["mpsserve"])


def running_replicas(app: dict[str, Any], deployment: str) -> int:
    replicas = app["deployments"][deployment]["replicas"]
    return sum(1 for r in replicas if r["state"] == "RUNNING")


def infer(body: bytes, timeout_s: float = 60) -> tuple[int, str | None]:
    request = urllib.request.Request(INFER, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, str(json.loads(response.read())["model_version"])
    except urllib.error.HTTPError as exc:
        return exc.code, None


class Client(threading.Thread):
    """Sends one small request after another until stopped; keeps every outcome as
    (time.monotonic(), the served version or what went wrong)."""

    def __init__(self, body: bytes) -> None:
        super().__init__(daemon=True)
        self.body = body
        self.outcomes: list[tuple[float, str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                status, version = infer(self.body, timeout_s=30)
                outcome = version if status == 200 and version else f"HTTP {status}"
            except Exception as exc:
                outcome = f"error {type(exc).__name__}: {exc}"
            self.outcomes.append((time.monotonic(), outcome))
            time.sleep(0.02)

    def failures(self) -> list[tuple[float, str]]:
        return [o for o in self.outcomes if not o[1].isdigit()]

    def timeline(self, start: float) -> list[str]:
        """Each change of outcome: "+12.3s 2" (seconds after ``start``)."""
        changes, last = [], None
        for at, outcome in self.outcomes:
            if outcome != last:
                changes.append(f"{at - start:+.1f}s {outcome}")
                last = outcome
        return changes


BODY = encode_json_request(make_request(SMALL, rows=20, seed=3))


def test_serve_deploy_of_a_generated_serve_config(
    cluster: Cluster, store: Path, tmp_path: Path
) -> None:
    """deployments/local-cpu.yaml with this machine's store and ports, through
    `mpsserve serve-config` and Ray Serve's own `serve deploy FILE`."""
    body = yaml.safe_load((ROOT / "deployments" / "local-cpu.yaml").read_text())
    body["models"][0].update(store=str(store), intra_op_threads=1)
    body["models"][0]["placement"].update(cpu_replicas=1, cpus_per_replica=0.5)
    body["ingress"].update(host="127.0.0.1", http_port=HTTP_PORT, grpc_port=GRPC_PORT)
    body["ingress"]["cpus_per_replica"] = 0.5
    path = serve_config_file(cluster, body, tmp_path / "local-cpu.yaml")
    run(cluster, [str(BIN / "serve"), "deploy", str(path), "--address", DASHBOARD], 120)
    _wait_for("RUNNING", lambda: application()["status"] == "RUNNING", 300)
    assert _wait_for("a first answer", lambda: infer(BODY)[0] == 200, 60)
    assert infer(BODY) == (200, "2")  # latest 1 of versions 1, 2


def test_redeploy_by_ray_job_submit_loses_no_request(
    cluster: Cluster, store: Path, tmp_path: Path
) -> None:
    v1 = serve_config_file(cluster, service(store, 1, {"latest": 1}), tmp_path / "v1.yaml")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    serve_config_file(cluster, service(store, 2, {"specific": [1]}), job_dir / "v2.yaml")
    for leftover in job_dir.glob("*.service.yaml"):
        leftover.unlink()

    # v1 through `mpsserve deploy --config <Serve config file>`, as a user would from a laptop.
    deploy = [sys.executable, "-m", "mpsserve.ops.cli", "deploy", "--config", str(v1)]
    output = run(cluster, [*deploy, "--address", f"127.0.0.1:{GCS_PORT}"], 300)
    assert "deployed application 'mpsserve'" in output
    assert running_replicas(application(), "model-rec") == 1
    assert _wait_for("a first answer", lambda: infer(BODY)[0] == 200, 60)

    client = Client(BODY)
    client.start()
    try:
        _wait_for("load", lambda: len(client.outcomes) >= 10, 60)
        submitted = time.monotonic()
        submit = [str(BIN / "ray"), "job", "submit", "--address", DASHBOARD]
        submit += ["--working-dir", str(job_dir), "--"]
        submit += ["python", "-m", "mpsserve.ops.redeploy", "--config", "v2.yaml"]
        logs = run(cluster, submit, 480)
        ended = time.monotonic()
        _wait_for("answers after the job", lambda: client.outcomes[-1][0] > ended + 5, 60)
    finally:
        client.halt.set()
        client.join(timeout=60)

    during = [o for o in client.outcomes if submitted <= o[0] <= ended]
    said = logs[logs.find("changes to application") : logs.find("now live:") + 200]
    print(said)
    print(f"job ran {ended - submitted:.1f}s, {len(during)} requests meanwhile, ", end="")
    print(f"{len(client.outcomes)} in all; outcomes:", client.timeline(submitted))
    assert "succeeded" in logs
    assert "changes to application 'mpsserve':" in logs
    assert "model rec: replicas 1 -> 2; version_policy latest 1 -> specific [1]" in logs
    assert "what restarts:" in logs and "  ingress: unchanged" in logs
    assert "  model-rec: rolling replace of 1 replica(s)" in logs and "now live:" in logs
    assert len(during) >= 10, "the client was not sending while the job ran"
    assert client.failures() == [], f"{len(client.failures())} of {len(client.outcomes)} failed"
    # The new config is live when the job ends: two replicas, and version 1 pinned.
    app = application()
    assert app["status"] == "RUNNING"
    assert running_replicas(app, "model-rec") == 2
    (rec,) = [d for d in app["deployed_app_config"]["deployments"] if d["name"] == "model-rec"]
    policy = rec["user_config"]["version_policy"]
    assert policy["specific"] == [1]
    after = [o[1] for o in client.outcomes if o[0] > ended + SETTLE_S]
    assert after and set(after) == {"1"}, client.timeline(submitted)
