"""The node's metrics sampler: MPS daemon state and GPU load, read every few seconds.

One per node: the MPS guardian's leader starts it (mpsserve/node/guardian.py), so it runs in
the one replica process holding the node's guardian lock and moves with the lock. It reads
what the guardian last wrote (the state file) rather than asking the control daemon again,
and NVML for each GPU. On a node without a driver it stops asking NVML after the first try, quietly.

MPS clients are counted per node (label ``gpu="all"``): the control daemon runs one server
per user that serves every GPU, and lists clients per server, not per device.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mpsserve import metrics
from mpsserve.node import gpu
from mpsserve.node.state import NodeState, read_state
from mpsserve.periodic import Periodic

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """What one round set (for tests and logs)."""

    mps: NodeState | None = None
    new_restarts: int = 0
    gpus: list[gpu.GpuUsage] = field(default_factory=list)


class NodeSampler(Periodic):
    """Sets the node's MPS and GPU gauges every ``interval_s`` until stopped."""

    def __init__(
        self, state_dir: Path | None, interval_s: float = 5.0, node: str | None = None
    ) -> None:
        super().__init__("mpsserve-node-sampler", interval_s, self.sample)
        self.state_dir = state_dir
        self.node = node or socket.gethostname()
        self._restarts_seen: int | None = None
        self._nvml = True  # False once NVML proved unavailable here
        self._gpus_seen = False
        self._failed = False

    def sample(self) -> Sample:
        """One round; never raises (a failure is logged once)."""
        try:
            return Sample(*self._sample_mps(), gpus=self._sample_gpus())
        except Exception:
            if not self._failed:
                self._failed = True
                logger.warning("node metrics sampler failed; going on", exc_info=True)
            return Sample()

    def _sample_mps(self) -> tuple[NodeState | None, int]:
        if self.state_dir is None:
            return None, 0
        state = read_state(self.state_dir)
        up = state is not None and state.up
        clients = {pid for pids in state.servers.values() for pid in pids} if state else set()
        metrics.set_mps_daemon(self.node, up, len(clients))
        new = self._new_restarts(state.restarts if state else 0)
        metrics.count_mps_restarts(self.node, new)
        return state, new

    def _new_restarts(self, total: int) -> int:
        """Restarts since the last round. The first round counts the guardian's whole total,
        so the counter's value is the node's total; a smaller total (state file removed) is a
        reset, whose restarts are all new."""
        seen, self._restarts_seen = self._restarts_seen, total
        if seen is None or total < seen:
            return total
        return total - seen

    def _sample_gpus(self) -> list[gpu.GpuUsage]:
        if not self._nvml:
            return []
        found = gpu.usage()
        if found.error is not None:
            self._nvml = self._gpus_seen  # never worked here: no driver, stop asking
            logger.debug("no GPU metrics this round: %s", found.error)
        self._gpus_seen = self._gpus_seen or bool(found.gpus)
        for one in found.gpus:
            metrics.set_gpu(
                self.node,
                str(one.index),
                one.utilization_ratio,
                one.memory_used_bytes,
                one.memory_total_bytes,
                one.power_watts,
            )
        return found.gpus
