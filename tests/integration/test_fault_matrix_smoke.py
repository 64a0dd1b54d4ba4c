"""Smoke test of the fault matrix (benchmarks/fault_matrix) as an operator runs it: `mpsserve
serve` of a small service, then the tool's publish-new-version case with short windows. Checks
that the report carries every figure and that the new version was served, never how fast."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.fault_matrix.report import HEADER
from tests.processes import read_until

REPO = Path(__file__).resolve().parents[2]
HTTP, GRPC = 28700, 29700
SHORT = [
    "--cases", "publish-new-version", "--rows", "200", "--concurrency", "2", "--warmup-s", "1",
    "--baseline-s", "2", "--window-s", "4", "--quiet-s", "1", "--poll-s", "0.5",
    "--max-extra-s", "20", "--settle-timeout-s", "30",
]  # fmt: skip
FIGURES = {
    "requests", "failed", "failed_by_status", "failed_in_flight_at_fault", "failed_after_window",
    "time_to_recover_s", "p99_steady_ms", "p99_window_ms", "versions_served", "version_flips",
    "versions_at_end", "split_at_end", "model_pids_before", "model_pids_after",
    "model_pids_replaced", "graphs_after", "status_timeline", "per_second", "verdict",
}  # fmt: skip


def service(store: Path) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "poll_interval_s": 0.5,
                "intra_op_threads": 1,
                "placement": {"cpu_replicas": 1, "cpus_per_replica": 0.5},
            }
        ],
        "ray": {"num_cpus": 2, "dashboard": False, "app_name": "faultsmoke"},
        "ingress": {
            "host": "127.0.0.1",
            "http_port": HTTP,
            "grpc_port": GRPC,
            "replicas": 1,
            "cpus_per_replica": 0.5,
        },
    }


def run_matrix(config: Path, address: str, out: Path) -> subprocess.CompletedProcess[str]:
    tool = [sys.executable, "-m", "benchmarks.fault_matrix", "--config", str(config)]
    files = ["--out", str(out / "fm.json"), "--markdown", str(out / "fm.md")]
    return subprocess.run(
        [*tool, "--address", address, *SHORT, *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_publish_new_version_case(tf_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tf_store / "1", store / "1")
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump(service(store)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    serve = subprocess.Popen(
        [sys.executable, "-m", "mpsserve.cli", "serve", "--config", str(config), "--rows", "8"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = read_until(serve, "Ctrl-C stops", 300)
        address = re.search(r"Ray address:\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        proc = run_matrix(config, address, tmp_path)
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=60)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads((tmp_path / "fm.json").read_text())
    assert "benchmarks.fault_matrix" in doc["meta"]["command"]
    [case] = doc["cases"]
    assert set(case) >= FIGURES, FIGURES - set(case)
    assert case["case"] == "publish-new-version" and case["verdict"] == "PASS", case["reasons"]
    assert case["requests"] > 0 and case["failed"] == 0
    assert case["versions_served"].get("2", 0) > 0 and case["versions_at_end"] == ["2"]
    assert case["time_to_recover_s"] is not None and case["time_to_recover_s"] >= 0
    assert case["p99_window_ms"] > 0 and case["model_pids_replaced"] == []
    assert (store / "2" / "saved_model.pb").exists()
    lines = (tmp_path / "fm.md").read_text().splitlines()
    assert HEADER in lines and any(line.startswith("| publish-new-version |") for line in lines)
