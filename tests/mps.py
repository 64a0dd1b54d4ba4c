"""Helpers for tests that drive an MPS control daemon: the real one on a GPU host, or the
stand-in (tests/mps_standin) on a CPU machine, through the same ``MpsControl``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mpsserve.config import MpsConfig, ReplicaMpsConfig
from mpsserve.node.control import MpsControl
from mpsserve.node.hook import CONTROL_LOCK_FILE
from mpsserve.settings import settings, to_env

STANDIN = Path(__file__).parent / "mps_standin" / "nvidia-cuda-mps-control"


def standin_control(
    tmp: Path,
    binary: str = str(STANDIN),
    timeout_s: float = 5.0,
    retry_s: float = 5.0,
    turns: bool = True,
) -> MpsControl:
    """The stand-in's daemon under ``tmp``; with ``turns``, commands take the node's turns
    on the lock file a replica with state dir ``tmp/state`` uses."""
    return MpsControl(
        tmp / "pipe",
        tmp / "log",
        binary=binary,
        timeout_s=timeout_s,
        retry_s=retry_s,
        lock_file=tmp / "state" / CONTROL_LOCK_FILE if turns else None,
    )


@contextmanager
def daemon(control: MpsControl) -> Iterator[MpsControl]:
    """A started daemon, always stopped afterwards."""
    control.start()
    try:
        yield control
    finally:
        control.quit()


@contextmanager
def standin_client(control: MpsControl) -> Iterator[subprocess.Popen[bytes]]:
    """A process the stand-in counts as an MPS client (see tests/mps_standin/README.md)."""
    env = {
        **os.environ,
        "CUDA_MPS_PIPE_DIRECTORY": str(control.pipe_dir),
        "MPSSERVE_STANDIN_CLIENT": "1",
    }
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def replica_mps(
    control: MpsControl, tmp: Path, mode: str, gpu_share: float = 1.0, **fields: object
) -> MpsConfig:
    """Make this process a replica of a service whose ``mps`` section names ``control``
    (``fields`` override the rest): ``MPSSERVE_MPS_CONFIG`` set as the app builder sets it.
    Returns that section."""
    mps = MpsConfig.model_validate(
        {
            "mode": mode,
            "pipe_dir": str(control.pipe_dir),
            "log_dir": str(control.log_dir),
            "state_dir": str(tmp / "state"),
            "control_binary": str(STANDIN),
            **fields,
        }
    )
    replica = ReplicaMpsConfig(mps=mps, gpu_share=gpu_share)
    os.environ.update(to_env(mps_config=replica.model_dump_json()))
    settings.cache_clear()
    return mps


def mps_service_config(
    tmp: Path,
    store: Path,
    runtime: str,
    replicas: int,
    port: int,
    control_binary: str,
    num_gpus: int | None = None,
    num_cpus: int | None = None,
) -> dict[str, object]:
    """A service with ``replicas`` replicas on one GPU under a required MPS daemon."""
    cpus = 0.5 if num_gpus is not None else 1
    return {
        "models": [
            {
                "name": "rec",
                "store": str(store),
                "runtime": runtime,
                "placement": {
                    "replicas_per_gpu": replicas,
                    "cpus_per_replica": cpus,
                    "health_check_period_s": 1,
                },
            }
        ],
        "ingress": {"http_port": port, "metrics_port": port + 1, "cpus_per_replica": cpus},
        "mps": {
            "mode": "on",
            "pipe_dir": str(tmp / "pipe"),
            "log_dir": str(tmp / "log"),
            "state_dir": str(tmp / "state"),
            "control_binary": control_binary,
            "guardian_interval_s": 0.5,
        },
        # Its own app name: replicas are found by process title, and another test's
        # cluster may be running beside this one.
        "ray": {
            "num_gpus": num_gpus,
            "num_cpus": num_cpus,
            "dashboard": False,
            "app_name": "mps-scenario",
        },
    }
