"""The faults: each picks its target from a status report, strikes, and says what healthy
looks like afterwards (or why it cannot run here)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fault_matrix.health import Expect, model_rows, served
from mpsserve.config import ModelConfig, ServiceConfig
from mpsserve.settings import settings

SLOW_FIRST = {"tensorflow": "saved_model.pb", "torch": "signature.json"}  # the graph first
SLOW_LAST = {"tensorflow": "variables", "torch": "model.pt2"}  # the weights last
MPS_DAEMON = "nvidia-cuda-mps-control"


@dataclass
class Fault:
    target: str
    expect: Expect
    at: float  # t0
    busy_s: float = 0.0  # how long the fault itself lasts
    finish: Callable[[], None] = lambda: None  # undo or clean up at the window's end
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    args: argparse.Namespace
    config: ServiceConfig
    model: ModelConfig
    reference: dict[str, Any]  # the first healthy status report
    used_versions: set[int] = field(default_factory=set)
    stopped: set[int] = field(default_factory=set)

    def expect(self, before: dict[str, Any], **kw: Any) -> Expect:
        serving = served(before, self.model.name)
        kw.setdefault("version", next(iter(serving)) if len(serving) == 1 else None)
        rows, ingresses = model_rows(self.reference, self.model.name), self.reference["ingresses"]
        return Expect(self.model.name, len(rows), len(ingresses), **kw)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def local_pid(ctx: Context, row: dict[str, Any], deployment: str) -> int | None:
    """The row's pid when it is this application's ``deployment`` replica on this host."""
    pid = row.get("pid")
    mark = f"ServeReplica:{ctx.config.ray.app_name}:{deployment}"
    return pid if isinstance(pid, int) and mark in cmdline(pid) else None


def signal_pid(pid: int, sig: signal.Signals, mark: str) -> bool:
    if mark not in cmdline(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    return True


def model_replica(ctx: Context, before: dict[str, Any]) -> int | str:
    deployment = f"model-{ctx.model.name}"
    pids = sorted(
        p for r in model_rows(before, ctx.model.name) if (p := local_pid(ctx, r, deployment))
    )
    return pids[0] if pids else f"no {deployment} replica of this application on this host"


def kill_model_replica(ctx: Context, before: dict[str, Any]) -> Fault | str:
    pid = model_replica(ctx, before)
    if isinstance(pid, str):
        return pid
    at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return Fault(f"model replica pid {pid}", ctx.expect(before, gone=frozenset({pid})), at)


def stop_model_replica(ctx: Context, before: dict[str, Any]) -> Fault | str:
    pid = model_replica(ctx, before)
    if isinstance(pid, str):
        return pid
    mark = f"ServeReplica:{ctx.config.ray.app_name}:"
    ctx.stopped.add(pid)
    timer = threading.Timer(ctx.args.stop_s, signal_pid, (pid, signal.SIGCONT, mark))
    at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    timer.start()

    def finish() -> None:
        timer.cancel()
        signal_pid(pid, signal.SIGCONT, mark)
        ctx.stopped.discard(pid)

    target = f"model replica pid {pid} stopped {ctx.args.stop_s:g}s"
    return Fault(target, ctx.expect(before), at, ctx.args.stop_s, finish)


def connections(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to local ``port`` held by each of ``pids``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    counts = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            counts[pid] = sum(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds)
    return counts


def kill_ingress(ctx: Context, before: dict[str, Any]) -> Fault | str:
    pids = [p for row in before.get("ingresses") or [] if (p := local_pid(ctx, row, "ingress"))]
    if not pids:
        return "no ingress replica of this application on this host"
    held = connections(pids, ctx.config.ingress.http_port)
    pid = max(pids, key=lambda p: held.get(p, 0))
    at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    info = {"load_connections_by_ingress_pid": held}
    return Fault(f"ingress pid {pid}", ctx.expect(before, gone=frozenset({pid})), at, info=info)


def kill_mps_daemon(ctx: Context, before: dict[str, Any]) -> Fault | str:
    pids = [n.get("daemon_pid") for n in (before.get("mps_nodes") or {}).values()]
    pids = [p for p in pids if isinstance(p, int)]
    if not pids:
        return "status shows no MPS control daemon (mps_nodes is empty: MPS off or no GPU)"
    local = [p for p in pids if MPS_DAEMON in cmdline(p)]
    if not local:
        return f"MPS daemon pid(s) {pids} are not {MPS_DAEMON} processes on this host"
    at = time.monotonic()
    os.kill(local[0], signal.SIGKILL)
    return Fault(f"MPS daemon pid {local[0]}", ctx.expect(before, gone=frozenset(local[:1])), at)


def inject(action: str) -> float | str:
    """Write the replicas' fault trigger (mpsserve/model/runtime/injected.py); t0, or why not."""
    trigger = settings().inject_fault_file
    if not trigger:
        return (
            "MPSSERVE_INJECT_FAULT_FILE is not set here: start the service and the matrix with "
            "it set to the same path (tests only)"
        )
    partial = Path(f"{trigger}.partial")
    partial.write_text(f"{action}\n")
    at = time.monotonic()
    partial.rename(trigger)  # whole, at once: a replica never reads half an action
    return at


def untaken(trigger: str) -> Callable[[], None]:
    """At the window's end: no replica took the trigger (no request reached one): remove it."""
    return lambda: Path(trigger).unlink(missing_ok=True)


def gpu_client_fault(ctx: Context, before: dict[str, Any]) -> Fault | str:
    """One replica's next request faults its GPU: under MPS every model replica on the node's
    GPU is hit and must be replaced (this host's replicas: the matrix runs on one node)."""
    deployment = f"model-{ctx.model.name}"
    pids = {p for r in model_rows(before, ctx.model.name) if (p := local_pid(ctx, r, deployment))}
    if not pids:
        return f"no {deployment} replica of this application on this host"
    mps = bool(before.get("mps_nodes"))
    at = inject(f"fault {ctx.args.fault_kind}")
    if isinstance(at, str):
        return at
    # Without MPS the fault stays in the one process that took the trigger, unknown here.
    gone = frozenset(pids) if mps else frozenset()
    info = {"action": f"fault {ctx.args.fault_kind}", "mps": mps, "replicas_hit": len(gone)}
    target = f"device fault ({ctx.args.fault_kind}) in one of {len(pids)} replicas"
    finish = untaken(settings().inject_fault_file)
    return Fault(target, ctx.expect(before, gone=gone), at, finish=finish, info=info)


def memory_over_limit(ctx: Context, before: dict[str, Any]) -> Fault | str:
    """One replica's next request allocates twice its MPS device memory limit: that request
    fails with out-of-memory (allowed: 1 failure), every replica keeps serving."""
    limit = ctx.config.mps.limits.pinned_mem_limit_mb
    if ctx.config.mps.mode == "off" or not limit:
        return "needs mps.mode on/auto and mps.limits.pinned_mem_limit_mb in the service config"
    at = inject(f"alloc {2 * limit}")
    if isinstance(at, str):
        return at
    info = {"action": f"alloc {2 * limit}", "limit_mb": limit, "allowed_failures": 1}
    finish = untaken(settings().inject_fault_file)
    target = f"one request allocating {2 * limit} MB (limit {limit} MB)"
    return Fault(target, ctx.expect(before), at, finish=finish, info=info)


def local_store(ctx: Context, before: dict[str, Any]) -> tuple[Path, Path, int] | str:
    """(store, the serving version's directory, the next version number) or why not."""
    uri = ctx.model.store
    if "://" in uri and not uri.startswith("file://"):
        return f"store {uri} is not a local directory"
    store = Path(uri.removeprefix("file://"))
    serving = served(before, ctx.model.name)
    if len(serving) != 1 or not (store / next(iter(serving))).is_dir():
        return f"no single serving version to copy in {store} (serving {sorted(serving)})"
    numbers = {int(p.name) for p in store.iterdir() if p.name.isdigit()} | ctx.used_versions
    number = max(numbers) + 1
    ctx.used_versions.add(number)
    return store, store / next(iter(serving)), number


def publish_atomically(store: Path, number: int, write: Callable[[Path], None]) -> float:
    partial = store / f".fault-matrix-{number}.partial"  # not a number: the store skips it
    try:
        write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    at = time.monotonic()
    partial.rename(store / str(number))
    return at


def garbage_copy(source: Path, target: Path, keep: set[str]) -> None:
    """The same tree; the model files (graph, weights) random bytes, at most 1 MiB each; JSON
    metadata (a torch signature) and ``keep`` (a done marker) copied, so loading gets as far
    as the model itself."""
    rng = np.random.default_rng(13)
    for path in sorted(source.rglob("*")):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            out.mkdir(exist_ok=True)
        elif path.suffix == ".json" or path.name in keep:
            shutil.copy2(path, out)
        else:
            out.write_bytes(rng.bytes(max(16, min(path.stat().st_size, 1 << 20))))


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target)


def publish_new(ctx: Context, before: dict[str, Any]) -> Fault | str:
    found = local_store(ctx, before)
    if isinstance(found, str):
        return found
    store, source, n = found
    at = publish_atomically(store, n, lambda tmp: copy_tree(source, tmp))
    return Fault(f"version {n} (copy of {source.name})", ctx.expect(before, version=str(n)), at)


def publish_corrupt(ctx: Context, before: dict[str, Any]) -> Fault | str:
    found = local_store(ctx, before)
    if isinstance(found, str):
        return found
    store, source, n = found
    keep = {ctx.model.done_marker} if ctx.model.done_marker else set()
    at = publish_atomically(store, n, lambda tmp: garbage_copy(source, tmp, keep))

    def finish() -> None:
        shutil.rmtree(store / str(n), ignore_errors=True)

    target = f"corrupt version {n} (removed after the window)"
    return Fault(target, ctx.expect(before, rejected=str(n)), at, finish=finish)


def slow_steps(source: Path, runtime: str, marker: str | None) -> list[list[Path]]:
    """The runtime's first file alone, then the rest: the weights, then a done marker, last."""
    first = [p for p in source.iterdir() if p.name == SLOW_FIRST[runtime]]

    def order(p: Path) -> tuple[int, str]:
        return (2 if p.name == marker else 1 if p.name == SLOW_LAST[runtime] else 0, p.name)

    rest = sorted((p for p in source.iterdir() if p not in first), key=order)
    return [first, rest]


def copy_entry(path: Path, target: Path) -> None:
    if path.is_dir():
        shutil.copytree(path, target / path.name)
    else:
        shutil.copy2(path, target / path.name)


def publish_slow(ctx: Context, before: dict[str, Any]) -> Fault | str:
    found = local_store(ctx, before)
    if isinstance(found, str):
        return found
    store, source, n = found
    target, gap = store / str(n), ctx.args.slow_gap_s
    steps = slow_steps(source, ctx.model.runtime, ctx.model.done_marker)
    cancel, complete = threading.Event(), threading.Event()

    def write() -> None:
        for i, step in enumerate(steps):
            if i and cancel.wait(gap):
                return
            for path in step:
                copy_entry(path, target)
        complete.set()

    target.mkdir()
    at = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()

    def finish() -> None:
        cancel.set()
        writer.join()
        if not complete.is_set():  # interrupted: leave no half version behind
            shutil.rmtree(target, ignore_errors=True)

    names = [[p.name for p in step] for step in steps]
    info = {"steps": names, "gap_s": gap}
    busy = gap * (len(steps) - 1)
    expect = ctx.expect(before, version=str(n))
    return Fault(f"version {n}, {len(steps)} steps {gap:g}s apart", expect, at, busy, finish, info)


INJECT: dict[str, Callable[[Context, dict[str, Any]], Fault | str]] = {
    "kill-model-replica": kill_model_replica,
    "kill-ingress": kill_ingress,
    "stop-model-replica-45s": stop_model_replica,
    "kill-mps-daemon": kill_mps_daemon,
    "publish-new-version": publish_new,
    "publish-corrupt-version": publish_corrupt,
    "publish-slow-version": publish_slow,
    "gpu-client-fault": gpu_client_fault,
    "device-memory-over-limit": memory_over_limit,
}
CASES = tuple(INJECT)
