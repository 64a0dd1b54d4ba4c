"""GPU faults under MPS: a node-wide record, so one client's fault ends every client it hit.

NVIDIA's MPS on Volta and later: a fatal GPU exception in one client (an illegal address, a
device-side assert) is reported to every client of that GPU's server, and the server accepts
no new client on that GPU until all of them have exited; then it recreates its context and
serves again. Affected clients must notice and exit themselves, but a replica finds out only
when it next touches the GPU, and an idle one may not do so for a long time, holding the whole
GPU's recovery back. So the replica that finds a fault writes a record here (one small JSON
file per report under ``<state_dir>/faults``), every replica on the node looks for records
naming its own server and GPU (its guardian thread, twice a second), and each one that started
before the fault exits; Ray Serve replaces them all, and the node's guardian follows the
server's clients until they are gone (``Follow``), saying so in its state and logs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAULTS_DIR = "faults"
#: One file per attached replica, named by its pid, holding its GPU: a server serves every GPU
#: of the node, and a fault on one GPU hits only that GPU's clients.
CLIENTS_DIR = "clients"
#: Records older than this are deleted by the node's guardian.
KEEP_S = 3600.0
#: Fault records the guardian's state keeps (newest last).
KEEP_IN_STATE = 10


@dataclass(frozen=True)
class GpuFault:
    """One replica's report of a fatal device error on an MPS server's GPU."""

    server: int  # the MPS server's pid
    gpu: str  # the GPU as Ray names it on the node ("0", "1", ...)
    reporter: int  # the pid that hit the error
    at: float  # time.time()
    message: str

    def key(self) -> str:
        return f"{self.server}-{self.gpu}-{self.reporter}-{int(self.at * 1000)}"


def report(state_dir: Path, fault: GpuFault) -> Path:
    """Write the record atomically (rename), for every replica on the node to read."""
    folder = state_dir / FAULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fault.key()}.json"
    partial = folder / f".{fault.key()}.partial"
    partial.write_text(json.dumps(asdict(fault)))
    partial.replace(path)
    return path


def recorded(state_dir: Path, since: float = 0.0) -> list[GpuFault]:
    """Every record written after ``since`` (time.time()), oldest first."""
    found = []
    try:
        entries = list(os.scandir(state_dir / FAULTS_DIR))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            fault = GpuFault(**json.loads(Path(entry.path).read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being deleted, or not ours
        if fault.at > since:
            found.append(fault)
    return sorted(found, key=lambda f: f.at)


def hitting(state_dir: Path, server: int, gpu: str, since: float, me: int) -> GpuFault | None:
    """The first fault another process reported on this server and GPU after ``since``."""
    for fault in recorded(state_dir, since):
        if fault.server == server and fault.gpu == gpu and fault.reporter != me:
            return fault
    return None


def prune(state_dir: Path, now: float | None = None) -> None:
    cutoff = (now or time.time()) - KEEP_S
    for fault in recorded(state_dir):
        if fault.at < cutoff:
            (state_dir / FAULTS_DIR / f"{fault.key()}.json").unlink(missing_ok=True)


def note_client(state_dir: Path, pid: int, gpu: str) -> None:
    folder = state_dir / CLIENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(pid)).write_text(gpu)


def client_gpu(state_dir: Path, pid: int) -> str | None:
    """The GPU a replica noted for itself; None for a client that noted nothing (not ours)."""
    try:
        return (state_dir / CLIENTS_DIR / str(pid)).read_text()
    except OSError:
        return None


def forget_gone_clients(state_dir: Path) -> None:
    try:
        names = os.listdir(state_dir / CLIENTS_DIR)
    except OSError:
        return
    for name in names:
        if name.isdigit() and not Path(f"/proc/{name}").exists():
            (state_dir / CLIENTS_DIR / name).unlink(missing_ok=True)


def started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after ``when`` (time.time()); False when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, IndexError, StopIteration, ValueError):
        return False
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK") > when


@dataclass
class Follow:
    """The guardian's account of one fault: which of the server's clients it hit, which of
    them are still there, when the last one left (the server takes new clients again)."""

    server: int
    gpu: str
    reporter: int
    at: float
    message: str
    clients: list[int]  # mpsserve's replicas on the faulted GPU when the guardian last looked
    remaining: list[int]
    cleared_at: float | None = None
    #: Clients of the server that are not mpsserve replicas (an external daemon's other users):
    #: hit too when on that GPU, which mpsserve cannot tell, and not waited for.
    others: list[int] = field(default_factory=list)
    #: The records of this fault: the first, and those of clients that saw it too.
    reports: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, state_dir: Path, fault: GpuFault, clients: list[int]) -> Follow:
        """Hit: mpsserve's replicas on the fault's GPU; others: clients that noted no GPU.
        A process started after the fault was not hit (a replacement already attached)."""
        clients = [c for c in clients if not started_after(c, fault.at)]
        gpus = {c: client_gpu(state_dir, c) for c in clients}
        hit = sorted(c for c, gpu in gpus.items() if gpu == fault.gpu)
        others = sorted(c for c, gpu in gpus.items() if gpu is None)
        follow = cls(**asdict(fault), clients=hit, remaining=hit, others=others)
        follow.reports.append(fault.key())
        return follow

    def covers(self, fault: GpuFault) -> bool:
        """The same fault told by another client: same server and GPU, before the last hit
        client left (clients report when they next touch the GPU, moments apart)."""
        same_gpu = (fault.server, fault.gpu) == (self.server, self.gpu)
        return same_gpu and (self.cleared_at is None or fault.at <= self.cleared_at)

    def update(self, clients_now: list[int], now: float) -> bool:
        """Note who is left; True when this call saw the last one go."""
        self.remaining = sorted(set(self.remaining) & set(clients_now))
        if self.remaining or self.cleared_at is not None:
            return False
        self.cleared_at = now
        return True
