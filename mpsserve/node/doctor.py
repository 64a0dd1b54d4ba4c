"""``mpsserve doctor``: can MPS work on this node, and if not, why, in one line.

Read-only: it reports the compute mode and the daemon's state and never changes either. MPS
is judged only where the config needs it (``mps.mode`` on, or auto on a node with GPUs); with
mode off, or auto on a node without GPUs (CPU replicas), the same facts are listed, a failed
check is only information, and the verdict says MPS is not used. A config with an
``embeddings`` section also has its store checked (reachable, cluster state, versions); a
store that does not answer fails the node in any mode.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mpsserve.config import MPS_MAX_CLIENTS_PER_GPU, ServiceConfig
from mpsserve.errors import MpsError
from mpsserve.node.control import DaemonBusy, DaemonNotRunning, MpsControl
from mpsserve.node.gpu import MPS_MIN_COMPUTE_CAPABILITY, Inventory, inventory
from mpsserve.node.hook import control_for
from mpsserve.node.state import read_state

Status = Literal["ok", "fail", "info"]
#: The check of the config's embedding store, judged whatever MPS needs.
STORE_CHECK = "embedding store"
#: The node cache's directory: room for the store's largest version (information only:
#: without it, replicas serve from the store).
NODE_CACHE_CHECK = "embedding node cache"


@dataclass
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    #: Why MPS is not judged on this node (mode off; auto without GPUs); None: it is.
    not_needed: str | None = None

    def add(self, name: str, status: Status, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def not_judged(self, why: str) -> None:
        """MPS is not needed here: what would fail it is only information."""
        self.not_needed = why
        self.checks = [
            Check(c.name, "info", c.detail) if c.status == "fail" else c for c in self.checks
        ]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def verdict(self) -> str:
        """MPS's verdict, then any failed check beyond MPS (the embedding store)."""
        failed = [c for c in self.checks if c.status == "fail"]
        beyond = "".join(f"; {c.name}: {c.detail}" for c in failed if c.name == STORE_CHECK)
        mps_failed = [c for c in failed if c.name != STORE_CHECK]
        if self.not_needed is not None:
            return self.not_needed + beyond
        if mps_failed:
            return f"MPS cannot work here: {mps_failed[0].name}: {mps_failed[0].detail}" + beyond
        daemon = next(c.detail for c in self.checks if c.name == "daemon")
        return "MPS can work here: " + daemon + beyond

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mps_needed": self.not_needed is None,
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
        }


def _check_gpus(report: Report, inv: Inventory) -> None:
    if not inv.gpus:
        report.add("GPUs", "fail", f"no NVIDIA GPU visible ({inv.error}); replicas run on the CPU")
        return
    names = ", ".join(
        f"{g.index}: {g.name} (cc {g.compute_capability[0]}.{g.compute_capability[1]},"
        f" {g.memory_total_mb} MiB)"
        for g in inv.gpus
    )
    report.add("GPUs", "ok", names)
    report.add("driver", "info", inv.driver_version or "unknown")
    old = [g for g in inv.gpus if not g.supports_mps]
    if old:
        need = ".".join(map(str, MPS_MIN_COMPUTE_CAPABILITY))
        report.add(
            "compute capability",
            "fail",
            f"GPU {old[0].index} ({old[0].name}) is below {need} (Volta); MPS is refused",
        )
    modes = {g.index: g.compute_mode for g in inv.gpus}
    prohibited = [i for i, m in modes.items() if m == "Prohibited"]
    status: Status = "fail" if prohibited else "info"
    report.add("compute mode", status, f"{modes} (reported, never changed; Prohibited blocks CUDA)")


def _check_binaries(report: Report, control: MpsControl) -> None:
    found = shutil.which(control.binary)
    report.add(
        "control binary",
        "ok" if found else "fail",
        found or f"{control.binary} not on PATH (install the driver's MPS tools)",
    )
    server = shutil.which("nvidia-cuda-mps-server")
    report.add("server binary", "info", server or "nvidia-cuda-mps-server not on PATH")


def _check_pipe_dir(report: Report, control: MpsControl) -> None:
    path = control.pipe_dir
    base = path if path.exists() else next(p for p in path.parents if p.exists())
    if not base.is_dir():
        report.add("pipe directory", "fail", f"{path} cannot be created: {base} is not a directory")
        return
    writable = os.access(base, os.W_OK | os.X_OK)
    where = "exists" if base == path else f"will be created under {base}"
    report.add(
        "pipe directory",
        "ok" if writable else "fail",
        f"{path} {where}, {'writable' if writable else 'NOT writable'} by uid {os.getuid()}",
    )


def _check_daemon(report: Report, control: MpsControl) -> None:
    try:
        servers = control.clients()
    except DaemonNotRunning:
        report.add("daemon", "ok", f"no daemon on {control.pipe_dir} yet; replicas start it")
        return
    except DaemonBusy as exc:  # it runs; many clients asking at once is no fault
        report.add("daemon", "info", f"{exc.message}; its clients are not listed this time")
        return
    except MpsError as exc:
        report.add("daemon", "fail", exc.message)
        return
    clients = sum(len(c) for c in servers.values())
    report.add(
        "daemon",
        "ok",
        f"daemon pid {control.daemon_pid()} answering on "
        f"{control.pipe_dir}, {len(servers)} server(s), {clients} client(s) attached",
    )
    for server, pids in servers.items():
        status: Status = "fail" if len(pids) > MPS_MAX_CLIENTS_PER_GPU else "ok"
        report.add(
            f"server {server}",
            status,
            f"{len(pids)} of {MPS_MAX_CLIENTS_PER_GPU} clients: {sorted(pids)}",
        )


def _check_config(report: Report, config: ServiceConfig) -> None:
    per_gpu = sum(m.placement.replicas_per_gpu for m in config.models)
    report.add(
        "replicas per GPU",
        "ok",
        f"{per_gpu} configured (MPS allows {MPS_MAX_CLIENTS_PER_GPU}); mode {config.mps.mode}",
    )
    state = read_state(Path(config.mps.state_dir))
    if state is not None:
        age = time.time() - state.checked_at
        report.add(
            "guardian",
            "info",
            f"pid {state.guardian_pid} checked {age:.0f}s ago: "
            f"daemon {'up' if state.up else 'DOWN'}, {state.restarts} restart(s)"
            + (f", last error: {state.last_error}" if state.last_error else ""),
        )


def _why_not_needed(mode: str, inv: Inventory) -> str | None:
    if mode == "off":
        return "MPS is not used: mps.mode is off (replicas share no MPS daemon)"
    if mode == "auto" and not inv.gpus:
        return "MPS is skipped: mps.mode is auto and this node has no GPU (CPU replicas)"
    return None


def _check_embeddings(report: Report, config: ServiceConfig) -> None:
    """The embedding store, when the config has one: a store that cannot serve fails the
    node whatever MPS needs, since split models cannot load without it."""
    if config.embeddings is None:
        return
    from mpsserve.embeddings.probe import node_cache_room, probe

    found = probe(config.embeddings)
    report.add(STORE_CHECK, "ok" if found.ok else "fail", found.detail)
    room, detail = node_cache_room(config.embeddings, found.versions)
    report.add(NODE_CACHE_CHECK, "ok" if room else "info", detail)


def diagnose(config: ServiceConfig, gpus: Inventory | None = None) -> Report:
    """The checks, judged against ``mps.mode``: ``ok`` is False where MPS is needed and
    cannot work, or where the config's embedding store does not answer."""
    control = control_for(config.mps)
    report = Report()
    inv = gpus if gpus is not None else inventory()
    _check_gpus(report, inv)
    _check_binaries(report, control)
    _check_pipe_dir(report, control)
    if shutil.which(control.binary):
        _check_daemon(report, control)
    else:
        report.add("daemon", "fail", "cannot be asked: no control binary")
    _check_config(report, config)
    why = _why_not_needed(config.mps.mode, inv)
    if why is not None:
        report.not_judged(why)
    _check_embeddings(report, config)
    return report
