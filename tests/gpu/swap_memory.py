"""GPU memory across consecutive hot swaps (PyTorch runtime, no Ray): is it reclaimed?

Builds versions 1..N+1 of the demo model in a local store, then for each new version: publish,
poll (load + warm up + swap), wait for the old version to unload, and sample torch's allocator
and NVML's view of this process. Prints one JSON document; writes it to --out too.
    python3 tests/gpu/swap_memory.py --swaps 10 --table-rows 20000 --out $OUT/swap_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from mpsserve.config import ModelConfig
from mpsserve.model.servable import Servable
from mpsserve.ops.demo import DemoSpec, make_request, write_demo_model


def nvml_used_mb(pid: int) -> float | None:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return round(proc.usedGpuMemory / 2**20, 1)
        return None
    finally:
        pynvml.nvmlShutdown()


def sample(label: str, servable: Servable) -> dict[str, object]:
    torch.cuda.synchronize()
    return {
        "after": label,
        "serving": servable.version,
        "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
        "reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1),
        "nvml_process_mb": nvml_used_mb(os.getpid()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--table-rows", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    spec = DemoSpec(table_rows=args.table_rows)
    store = Path(tempfile.mkdtemp()) / "rec"
    write_demo_model(store, "torch", version=1, seed=1, spec=spec)
    servable = Servable(ModelConfig(name="rec", store=str(store), runtime="torch"))
    servable.load()
    request = make_request(spec, rows=2000, seed=0)
    servable.infer(request)
    samples = [sample("load v1 + one 2000-row request", servable)]
    for version in range(2, args.swaps + 2):
        write_demo_model(store, "torch", version=version, seed=version, spec=spec)
        servable.poll()
        servable.infer(request)
        for thread in threading.enumerate():  # the old version's unload thread
            if thread.name == "unload":
                thread.join(30)
        samples.append(sample(f"swap to v{version}", servable))
        print(json.dumps(samples[-1]), flush=True)
    table_mb = (spec.n_cat + 1) * spec.table_rows * spec.dim * 4 / 2**20
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "table_rows": args.table_rows,
        "weights_mb_per_version": round(table_mb, 1),
        "swaps": servable.swaps,
        "samples": samples,
        "at": time.strftime("%F %T"),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
