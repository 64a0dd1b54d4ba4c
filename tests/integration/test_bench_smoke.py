"""Smoke test of the benchmark tools against the session's real service: the load generator
(as a subprocess, HTTP then gRPC into one results file) and the plot. Checks that the report is
well-formed, never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.loadgen import MARKDOWN_HEADER, STEP_KEYS, merge_steps

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = [
    "--rows", "64", "--table-rows", "1000", "--concurrency", "2", "--duration-s", "2",
    "--warmup-s", "1", "--processes", "2", "--requests", "2", "--label", "smoke",
]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class BenchRun:
    results: Path
    markdown: Path
    png: Path
    outputs: list[str]


def run_module(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{module} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def bench(base_url: str, grpc_address: str, tmp_path_factory: pytest.TempPathFactory) -> BenchRun:
    out = tmp_path_factory.mktemp("bench")
    run = BenchRun(out / "results.json", out / "table.md", out / "plot.png", [])
    files = ["--out", str(run.results), "--markdown", str(run.markdown)]
    for target in (["--url", base_url], ["--grpc", grpc_address]):
        run.outputs.append(run_module("benchmarks.loadgen", *target, *SMALL_RUN, *files))
    run.outputs.append(run_module("benchmarks.plot", str(run.results), str(run.png)))
    return run


def steps_of(run: BenchRun) -> list[dict[str, Any]]:
    return list(json.loads(run.results.read_text())["steps"])


def test_steps_are_well_formed(bench: BenchRun) -> None:
    steps = steps_of(bench)
    assert sorted(s["protocol"] for s in steps) == ["grpc", "http"], bench.outputs
    for step in steps:
        assert set(STEP_KEYS) <= set(step), set(STEP_KEYS) - set(step)
        assert step["label"] == "smoke" and step["rows"] == 64 and step["concurrency"] == 2
        assert step["processes"] == 2 and step["duration_s"] == 2
        assert step["requests"] > 0 and step["errors"] == 0, step
        assert step["qps"] > 0
        assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
        assert step["mean_ms"] > 0
        assert step["client_cpu_s_per_req"] is not None and step["client_cpu_s_per_req"] > 0
        assert step["server_cpu_s_per_req"] is None or step["server_cpu_s_per_req"] >= 0
        assert step["gpu_util_pct"] is None or 0 <= step["gpu_util_pct"] <= 100
        assert {"hostname", "cpu_count", "gpu"} <= set(step["machine"])
        assert isinstance(step["started_at"], str) and step["started_at"]


def test_meta_records_the_run(bench: BenchRun) -> None:
    meta = json.loads(bench.results.read_text())["meta"]
    assert "benchmarks.loadgen" in meta["command"] and "--grpc" in meta["command"]
    assert meta["python"] and meta["versions"]["numpy"]
    assert set(meta["labels"]) == {"smoke"}


def test_markdown_has_a_row_per_step(bench: BenchRun) -> None:
    lines = bench.markdown.read_text().splitlines()
    assert lines[0] == MARKDOWN_HEADER
    assert lines[1].startswith("|---|")
    rows = lines[2:]
    assert len(rows) == len(steps_of(bench))
    assert sorted(r.split("|")[1].strip() for r in rows) == ["smoke (grpc)", "smoke (http)"]
    assert all(r.count("|") == MARKDOWN_HEADER.count("|") for r in rows)


def test_plot_writes_a_png(bench: BenchRun) -> None:
    assert bench.png.read_bytes().startswith(PNG_SIGNATURE)


def test_merge_replaces_same_step_and_appends_new() -> None:
    def step(label: str, concurrency: int, qps: float) -> dict[str, Any]:
        return {
            "label": label,
            "protocol": "http",
            "rows": 64,
            "concurrency": concurrency,
            "qps": qps,
        }

    old = [step("a", 2, 1.0), step("b", 2, 2.0)]
    merged = merge_steps(old, [step("a", 2, 3.0), step("a", 4, 4.0)])
    assert [(s["label"], s["concurrency"], s["qps"]) for s in merged] == [
        ("a", 2, 3.0),
        ("b", 2, 2.0),
        ("a", 4, 4.0),
    ]
