"""A CPU model load prints no CUDA-probe noise; other stderr lines, errors above all, pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpsserve.model.runtime.stderr_filter import dropping_lines

LOAD = """
import sys
from pathlib import Path
from mpsserve.model.runtime import RuntimeOptions, load_runtime
runtime = load_runtime("tensorflow", Path(sys.argv[1]) / "1", RuntimeOptions(device="cpu"))
print("loaded on", runtime.device)
"""


def test_a_cpu_model_load_prints_no_cuda_probe_lines(tf_store: Path) -> None:
    # No GPU for the process, on any host: CUDA_VISIBLE_DEVICES empty (as a CPU replica).
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": root}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(tf_store)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded on cpu"
    for noise in ("cuInit", "Could not find cuda drivers", "absl::InitializeLog"):
        assert noise not in done.stderr, done.stderr


def test_the_filter_drops_only_what_it_names(capfd: pytest.CaptureFixture[str]) -> None:
    with dropping_lines(lambda line: "noise" in line):
        os.write(2, b"E0000 00:00:1.0 x.cc:1] a real error\n")
        os.write(2, b"I0000 00:00:1.0 x.cc:2] noise\nno newline at the end")
    os.write(2, b"\nafter: noise shows again\n")
    err = capfd.readouterr().err
    assert err == (
        "E0000 00:00:1.0 x.cc:1] a real error\nno newline at the end\nafter: noise shows again\n"
    )


def test_probe_lines_go_and_errors_stay() -> None:
    from mpsserve.model.runtime.tf_kernels import _quiet_cuda_probe

    dropped = [
        "E0000 00:00:1.2 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
        "I0000 00:00:1.2 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU\n",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    ]
    kept = [
        "E0000 00:00:1.2 1 loader.cc:9] Could not load the SavedModel: file is corrupt\n",
        "Traceback (most recent call last):\n",
    ]
    assert all(_quiet_cuda_probe(line) for line in dropped)
    assert not any(_quiet_cuda_probe(line) for line in kept)
