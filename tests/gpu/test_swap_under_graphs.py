"""A hot swap and first-time graph captures while the process serves on its other threads:
no request fails, the process is not marked faulty, graphs stay on (tests/gpu/swap_under_load.py
does the measured run; this is its short form)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("swap_under_load.py")


def test_swap_and_new_buckets_under_load_keep_graphs_and_fail_nothing() -> None:
    command = [sys.executable, str(SCRIPT), "--modes", "concurrent", "--table-rows", "1000"]
    command += ["--swaps", "1", "--steady-s", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["errors"] == 0, result["error_samples"]
    assert result["fault"] is None and result["problem"] is None
    assert result["served_version"] == 2
    assert result["graphs"]["enabled"] and result["graphs"]["captures"] >= 2
    assert result["graphs"]["eager_buckets"] == 0
