"""What one CUDA context costs on the GPU, with and without MPS, and whether an MPS client's
pinned device memory limit holds (issue 20, item 4). GPU host only; needs torch and nvml.

    python3 tests/gpu/context_cost.py --processes 8 --out /tmp/context-cost.json

For each mode (no MPS; MPS with a control daemon this script starts on a private pipe dir and
quits at the end): start ``--processes`` Python processes that each create a PyTorch CUDA
context and allocate one small tensor, wait until all hold their context, read the GPU's used
memory (NVML), and divide the increase by the process count. Then, under MPS, one client with
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=<limit>M`` allocates below and above its limit while a
neighbour client keeps computing: the first must succeed, the second fail with out-of-memory,
the neighbour must not notice. The same with the limit set by the process itself
(``os.environ``) before its first CUDA call, as a replica does for a derived limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pynvml

HOLD = """
import sys, time, torch
x = torch.ones(16, device="cuda"); torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.read()
"""
LIMITED = """
import json, os, sys, torch
if sys.argv[1].startswith("set="):  # the limit set in-process, before the first CUDA call
    os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = sys.argv.pop(1)[4:]
torch.ones(1, device="cuda")
out = {}
for mb in (int(a) for a in sys.argv[1:]):
    try:
        t = torch.empty(mb << 20, dtype=torch.uint8, device="cuda"); t.fill_(1)
        torch.cuda.synchronize(); del t; torch.cuda.empty_cache(); out[mb] = "ok"
    except RuntimeError as exc:
        out[mb] = str(exc).splitlines()[0][:200]
print(json.dumps(out), flush=True)
"""
NEIGHBOUR = """
import sys, time, torch
a = torch.randn(2048, 2048, device="cuda"); n = 0; end = time.time() + float(sys.argv[1])
while time.time() < end:
    b = a @ a; torch.cuda.synchronize(); n += 1
print(n, flush=True)
"""


def used_mb() -> float:
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def hold(env: dict[str, str], count: int) -> tuple[float, float]:
    """Used memory (MB) before and with ``count`` processes holding a context each."""
    before = used_mb()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a client could not create its context")
        time.sleep(1)
        return before, used_mb()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def mps(pipe: Path, command: str | None = None) -> str:
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe / "pipe")}
    env["CUDA_MPS_LOG_DIRECTORY"] = str(pipe / "log")
    if command is None:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=10)
        time.sleep(1)
        return ""
    done = subprocess.run(
        ["nvidia-cuda-mps-control"], input=command, env=env, text=True, capture_output=True
    )
    return done.stdout


def limit_check(env: dict[str, str], limit_mb: int, seconds: float) -> dict[str, Any]:
    neighbour = subprocess.Popen(
        [sys.executable, "-c", NEIGHBOUR, str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )
    limited_env = {**env, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={limit_mb}M"}
    sizes = [limit_mb // 2, limit_mb * 2, limit_mb // 2]
    limited = subprocess.run(
        [sys.executable, "-c", LIMITED, *map(str, sizes)],
        env=limited_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    in_process = subprocess.run(
        [sys.executable, "-c", LIMITED, f"set=0={limit_mb}M", *map(str, sizes[:2])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rounds, _ = neighbour.communicate(timeout=seconds + 60)
    return {
        "limit_mb": limit_mb,
        "allocations": json.loads(limited.stdout or "{}") or limited.stderr[-500:],
        "allocations_limit_set_in_process": json.loads(in_process.stdout or "{}")
        or in_process.stderr[-500:],
        "neighbour_matmuls": int(rounds.strip() or 0),
        "neighbour_exit": neighbour.returncode,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--limit-mb", type=int, default=2048)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    pynvml.nvmlInit()
    result: dict[str, Any] = {"processes": args.processes}
    base = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS")}
    before, held = hold({**base, "CUDA_MPS_PIPE_DIRECTORY": "/nonexistent"}, args.processes)
    result["no_mps"] = {"used_before_mb": before, "used_with_mb": held}
    result["no_mps"]["per_context_mb"] = round((held - before) / args.processes, 1)
    work = Path(tempfile.mkdtemp(prefix="ctx", dir="/tmp"))
    mps(work)
    try:
        env = {**base, "CUDA_MPS_PIPE_DIRECTORY": str(work / "pipe")}
        hold(env, 1)  # the server starts with the first client: its own memory is not a client's
        server_up = used_mb()
        before, held = hold(env, args.processes)
        result["mps"] = {"used_server_up_mb": server_up, "used_before_mb": before}
        result["mps"]["used_with_mb"] = held
        result["mps"]["per_context_mb"] = round((held - before) / args.processes, 1)
        result["mps"]["server_list"] = mps(work, "get_server_list\n").split()
        result["pinned_limit"] = limit_check(env, args.limit_mb, 15.0)
    finally:
        print(mps(work, "quit\n"), end="")
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
