"""The node's MPS state file: what the guardian last saw, for replicas, the sampler, ``doctor``.

The guardian's leader writes it every round (mpsserve/node/guardian.py); readers never ask the
control daemon when this file answers their question. Its own module so that readers (the
metrics sampler, ``doctor``) need not import the guardian, which starts the sampler.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The file's name in the node's state directory (``MpsConfig.state_dir``).
STATE_FILE = "guardian.json"


@dataclass
class NodeState:
    """What the guardian last saw on this node."""

    node: str = field(default_factory=socket.gethostname)
    up: bool = False
    daemon_pid: int | None = None
    restarts: int = 0
    servers: dict[str, list[int]] = field(default_factory=dict)  # server pid -> client pids
    checked_at: float = 0.0
    guardian_pid: int = field(default_factory=os.getpid)
    last_error: str | None = None
    #: The last daemon seen answering (kept while it is down): a new pid is a restart.
    known_daemon_pid: int | None = None
    #: This round the daemon did not take commands in time (``servers`` is the last view).
    busy: bool = False
    busy_rounds: int = 0
    #: GPU faults reported on this node (mpsserve/node/faults.py), and the latest few followed.
    gpu_faults: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)


def read_state(state_dir: Path) -> NodeState | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return NodeState(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_state(state_dir: Path, state: NodeState) -> None:
    """Atomically (rename), so readers never see half a file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    partial = state_dir / f".{STATE_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(asdict(state), indent=2))
    partial.replace(state_dir / STATE_FILE)
