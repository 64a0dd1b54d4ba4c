"""Smoke test of the fault matrix (benchmarks/fault_matrix) as an operator runs it: `mpsserve
serve` of a small service, then the tool's publish-new-version, kill-ingress and (simulated on
the CPU) gpu-client-fault cases with short windows. Checks that the report carries every
figure, that the new version was served, the ingress kill cost nothing beyond its own
connections and the fault replaced its replica, never how fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.fault_matrix.report import HEADER
from tests.processes import Service, service_config

REPO = Path(__file__).resolve().parents[2]
HTTP = 28700
SHORT = [
    "--cases", "publish-new-version,kill-ingress,gpu-client-fault",
    "--rows", "200", "--concurrency", "2",
    "--warmup-s", "2", "--baseline-s", "2", "--window-s", "4", "--quiet-s", "1", "--poll-s", "0.5",
    "--max-extra-s", "30", "--settle-timeout-s", "60",
]  # fmt: skip
FIGURES = {
    "requests", "failed", "failed_by_status", "failed_in_flight_at_fault", "failed_after_window",
    "time_to_recover_s", "p99_steady_ms", "p99_window_ms", "versions_served", "version_flips",
    "versions_at_end", "split_at_end", "model_pids_before", "model_pids_after",
    "model_pids_replaced", "graphs_after", "status_timeline", "per_second", "verdict",
}  # fmt: skip


def run_matrix(
    config: Path, address: str, out: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    tool = [sys.executable, "-m", "benchmarks.fault_matrix", "--config", str(config)]
    files = ["--out", str(out / "fm.json"), "--markdown", str(out / "fm.md")]
    return subprocess.run(
        [*tool, "--address", address, *SHORT, *files],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_publish_ingress_kill_and_device_fault_cases(tf_store: Path, tmp_path: Path) -> None:
    """A version published, an ingress killed and a replica's device faulted under load: all
    PASS (two ingresses by default, so the kill costs only the requests on the killed one's
    connections; the faulted replica's requests are answered by the other)."""
    store = tmp_path / "store"
    shutil.copytree(tf_store / "1", store / "1")
    config = service_config(store, HTTP, "faultsmoke", poll_interval_s=0.5)
    env = {"MPSSERVE_INJECT_FAULT_FILE": str(tmp_path / "inject")}
    with Service(tmp_path, config, env=env) as svc:
        proc = run_matrix(tmp_path / "service.yaml", svc.address, tmp_path, env)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads((tmp_path / "fm.json").read_text())
    assert "benchmarks.fault_matrix" in doc["meta"]["command"]
    cases = {c["case"]: c for c in doc["cases"]}
    assert set(cases) == {"publish-new-version", "kill-ingress", "gpu-client-fault"}
    for case in cases.values():
        assert set(case) >= FIGURES, FIGURES - set(case)
        assert case["verdict"] == "PASS", (case["case"], case["reasons"])
        assert case["requests"] > 0 and case["time_to_recover_s"] is not None
    published = cases["publish-new-version"]
    assert published["failed"] == 0 and published["model_pids_replaced"] == []
    assert published["versions_served"].get("2", 0) > 0 and published["versions_at_end"] == ["2"]
    assert (store / "2" / "saved_model.pb").exists()
    killed = cases["kill-ingress"]
    assert killed["failed"] == killed["failed_in_flight_at_fault"]
    assert len(killed["ingress_pids_after"]) == 2
    faulted = cases["gpu-client-fault"]  # no MPS: the one replica hit exits and is replaced
    assert len(faulted["model_pids_replaced"]) == 1, faulted["model_pids_replaced"]
    assert faulted["failed"] == 0, faulted["failed_by_status"]
    lines = (tmp_path / "fm.md").read_text().splitlines()
    assert HEADER in lines and any(line.startswith("| kill-ingress |") for line in lines)
