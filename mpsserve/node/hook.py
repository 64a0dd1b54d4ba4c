"""What puts the MPS control daemon and a replica's limits in place before any replica touches
CUDA.

* ``worker_setup`` runs first in each GPU replica's constructor, before its first CUDA call
  (the model load): it starts the node's daemon unless one answers (under a file lock: many
  replicas race at start-up) and sets the replica's derived pinned-memory limit. Not a Ray
  ``worker_process_setup_hook``: Ray 2.60 runs that field only from a job's runtime
  environment (``ray.init``); in an actor's (a Serve replica's) it is recorded and never run
  (ray/_private/runtime_env/setup_hook.py: "This field is no-op"), which left the daemon to the
  guardian and the limit unset until 2026-12-01. An explicit limit also travels in the
  replica's environment, so CUDA sees it from the process's start.
* ``ray_start_hook`` is for ``RAY_START_HOOK=mpsserve.node.hook.ray_start_hook`` on a
  ``ray start`` GPU node: the daemon is up before the raylet starts.

Replicas get their MPS config (``ReplicaMpsConfig``: the service's ``mps`` section and their
share of a GPU) as one validated JSON value in their runtime environment
(``replica_runtime_env``, ``MPSSERVE_MPS_CONFIG``), never from whatever the node happens to
have. A ``ray start`` node's hook reads the service YAML named by ``MPSSERVE_SERVICE_CONFIG``
(or the same ``MPSSERVE_MPS_CONFIG`` JSON).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mpsserve.config import MpsConfig, Placement, ReplicaMpsConfig, load_config
from mpsserve.errors import ConfigError, MpsError
from mpsserve.node.control import MpsControl
from mpsserve.node.faults import CLIENTS_DIR, FAULTS_DIR
from mpsserve.node.gpu import inventory
from mpsserve.node.state import STATE_FILE  # forgotten with the daemon it describes
from mpsserve.settings import settings, to_env

logger = logging.getLogger(__name__)

#: A pipe directory no daemon listens on: a CUDA client that sees it runs without MPS,
#: even when the node has a daemon on the default /tmp/nvidia-mps (the no-MPS baseline).
NO_MPS_PIPE_DIR = "/nonexistent/mpsserve-mps-off"
LOCK_FILE = "daemon.lock"
#: The node's turn to talk to the daemon: one ``nvidia-cuda-mps-control`` client at a time.
CONTROL_LOCK_FILE = "control.lock"
STARTED_FILE = "daemon.started"
PINNED_LIMIT_VAR = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
#: Why this process could not set MPS up (read by the replica to report it), if it could not.
setup_error: str | None = None


def control_for(mps: MpsConfig) -> MpsControl:
    """The control daemon a service config names."""
    return MpsControl(
        pipe_dir=Path(mps.pipe_dir),
        log_dir=Path(mps.log_dir),
        binary=mps.control_binary,
        timeout_s=mps.command_timeout_s,
        retry_s=mps.command_retry_s,
        lock_file=Path(mps.state_dir) / CONTROL_LOCK_FILE,
    )


def replica_runtime_env(mps: MpsConfig, placement: Placement) -> dict[str, Any]:
    """The Ray runtime environment of a GPU replica for this MPS config."""
    replica = ReplicaMpsConfig(
        mps=mps, replicas_per_gpu=placement.replicas_per_gpu, gpu_share=placement.gpu_share
    )
    config = to_env(mps_config=replica.model_dump_json())
    if mps.mode == "off":
        return {"env_vars": {"CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE_DIR, **config}}
    percentage = mps.limits.thread_percentage(placement.replicas_per_gpu)
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": mps.pipe_dir,
        "CUDA_MPS_LOG_DIRECTORY": mps.log_dir,
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": f"{percentage:g}",
        **config,
    }
    if mps.limits.pinned_mem_limit_mb:  # each replica sees one GPU, its device 0
        env[PINNED_LIMIT_VAR] = f"0={mps.limits.pinned_mem_limit_mb}M"
    return {"env_vars": env}


def replica_config() -> ReplicaMpsConfig:
    """This replica's MPS config, validated (``replica_runtime_env`` wrote it)."""
    return ReplicaMpsConfig.from_json(settings().mps_config)


def ensure_daemon(control: MpsControl, state_dir: Path) -> bool:
    """Start the node's daemon unless it answers (under the node's lock) and note that
    mpsserve started it; True when this call did."""
    started = control.ensure_running(state_dir / LOCK_FILE)
    if started:
        record_started(control, state_dir)
    return started


def record_started(control: MpsControl, state_dir: Path) -> None:
    """Note the daemon mpsserve started, so ``serve`` stops it (and only it) at exit."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STARTED_FILE).write_text(f"{control.daemon_pid() or ''}\n")


def pinned_limit_mb(replica: ReplicaMpsConfig) -> int | None:
    """The explicit limit, or this replica's share of the smallest GPU on the node."""
    if replica.mps.limits.pinned_mem_limit_mb:
        return replica.mps.limits.pinned_mem_limit_mb
    gpus = inventory().gpus
    if not gpus:
        return None
    smallest = min(gpu.memory_total_mb for gpu in gpus)
    return int(smallest * replica.gpu_share / replica.replicas_per_gpu)


def pinned_limit_set() -> str | None:
    """The pinned device memory limit this process runs under (``worker_setup`` set it)."""
    return os.environ.get(PINNED_LIMIT_VAR)


def require_external(control: MpsControl) -> None:
    """An external daemon must already answer; mpsserve never starts one."""
    if not control.running():
        raise MpsError(
            f"no MPS control daemon answers on {control.pipe_dir} and mps.daemon is "
            "'external': start it there (the host's DaemonSet or device plugin), or use "
            "mps.daemon 'managed'"
        )


def worker_setup() -> None:
    """A GPU replica's setup before its first CUDA call; never raises (the replica reports)."""
    global setup_error
    try:
        replica = replica_config()
    except ConfigError as exc:  # this replica's environment is not what the app wrote
        setup_error = exc.message
        logger.warning("MPS is not available to this replica: %s", exc.message)
        return
    mps = replica.mps
    if mps.mode == "off":
        return
    try:
        if mps.daemon == "external":
            require_external(control_for(mps))
        elif ensure_daemon(control_for(mps), Path(mps.state_dir)):
            # Whether a daemon ran here before is the guardian's to say (a new pid: a restart).
            logger.info("started the MPS control daemon on %s", mps.pipe_dir)
    except MpsError as exc:
        setup_error = exc.message
        logger.warning("MPS is not available to this replica: %s", exc.message)
    limit = pinned_limit_mb(replica)
    if limit and PINNED_LIMIT_VAR not in os.environ:
        # Each replica sees exactly one GPU (fractional num_gpus), its device 0.
        os.environ[PINNED_LIMIT_VAR] = f"0={limit}M"


def node_config() -> MpsConfig:
    """The MPS config of a ``ray start`` node: the ``mps`` section of the service YAML named
    by ``MPSSERVE_SERVICE_CONFIG`` (the one deployed, so the directories agree), else that of
    ``MPSSERVE_MPS_CONFIG``; neither: MPS off. A bad file or value raises ConfigError."""
    path = settings().service_config
    if path:
        return load_config(path, check_files=False).mps
    return replica_config().mps


def ray_start_hook(ray_params: object, head: bool) -> None:
    """``RAY_START_HOOK`` for a GPU node: the daemon first, then the raylet."""
    mps = node_config()
    if mps.mode == "off":
        return
    gpus = inventory()
    if not gpus.gpus:
        logger.info("no GPU on this node (%s); no MPS daemon started", gpus.error)
        return
    if mps.daemon == "external":
        logger.info("MPS daemon is external (mps.daemon); not starting one")
        return
    started = ensure_daemon(control_for(mps), Path(mps.state_dir))
    logger.info("MPS control daemon %s on %s", "started" if started else "found", mps.pipe_dir)


def stop_daemon_if_ours(mps: MpsConfig) -> bool:
    """Quit the node's daemon if an mpsserve hook started it (the pid it recorded)."""
    control = control_for(mps)
    recorded = Path(mps.state_dir) / STARTED_FILE
    try:
        ours = int(recorded.read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if ours and ours == control.daemon_pid():
        control.quit()
        recorded.unlink(missing_ok=True)
        # A deliberate stop: the next service's first start is not a restart of this daemon,
        # and the faults of this one's servers are history.
        (Path(mps.state_dir) / STATE_FILE).unlink(missing_ok=True)
        for folder in (FAULTS_DIR, CLIENTS_DIR):
            shutil.rmtree(Path(mps.state_dir) / folder, ignore_errors=True)
        return True
    return False
