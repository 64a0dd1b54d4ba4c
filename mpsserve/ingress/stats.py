"""Inference statistics as Triton reports them, counted where they are known: in each model
replica, per served version, and summed over the replicas when a client asks.

A replica times each ``infer`` frame in four parts (``Timing``): queue (the frame received
until an inference thread takes it), compute_input (the tensors decoded from the frame),
compute_infer (validation and the model's predict), compute_output (the answer encoded); a
success adds all four and its total, a failure adds its total to ``fail``. Recording is a
few integer additions under a lock (measured: ~1 us per request, ``record``), so it stays on
for every request. The ingress gathers each replica's ``snapshot`` through Ray Serve (a
control-plane call, only when a client asks) and sums them with ``merge``. Counts live in the
replica processes: a replaced replica's counts are gone, as Triton's are after a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from mpsserve.protocol.triton import DURATIONS


class Timing(NamedTuple):
    """One successful request's parts, in nanoseconds (a tuple: cheap to make)."""

    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int

    @property
    def total_ns(self) -> int:
        return (
            self.queue_ns + self.compute_input_ns + self.compute_infer_ns + self.compute_output_ns
        )


def empty() -> dict[str, Any]:
    """A version's counters before its first request."""
    return {
        "last_inference": 0,  # ms since the epoch, as Triton reports it
        "inference_count": 0,
        "execution_count": 0,
        **{name: [0, 0] for name in DURATIONS},  # [count, ns]
    }


class ReplicaStats:
    """One replica's counters, per version; safe to record from the inference threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, Any]] = {}

    def _version(self, version: str) -> dict[str, Any]:
        entry = self._versions.get(version)
        if entry is None:
            entry = self._versions[version] = empty()
        return entry

    def record(self, version: str, timing: Timing) -> None:
        """A successful inference: one execution of one request (max_batch_size 0: Triton
        counts a request as one inference, whatever its rows). Unrolled: it runs for every
        request."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            entry = self._versions.get(version) or self._version(version)
            entry["last_inference"] = now_ms
            entry["inference_count"] += 1
            entry["execution_count"] += 1
            _add(entry["success"], timing.total_ns)
            _add(entry["queue"], timing.queue_ns)
            _add(entry["compute_input"], timing.compute_input_ns)
            _add(entry["compute_infer"], timing.compute_infer_ns)
            _add(entry["compute_output"], timing.compute_output_ns)

    def failed(self, version: str, ns: int) -> None:
        """A request that reached the replica and failed (bad input, a runtime error)."""
        with self._lock:
            _add(self._version(version)["fail"], ns)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Version -> counters (plain data: it crosses Ray)."""
        with self._lock:
            return {v: _copy(entry) for v, entry in self._versions.items()}


def _add(pair: list[int], ns: int) -> None:
    pair[0] += 1
    pair[1] += ns if ns > 0 else 0


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in entry.items()}


def merge(snapshots: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Several replicas' snapshots summed per version (the latest ``last_inference``)."""
    total: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        for version, entry in snapshot.items():
            into = total.setdefault(version, empty())
            into["last_inference"] = max(into["last_inference"], int(entry["last_inference"]))
            for key in ("inference_count", "execution_count"):
                into[key] += int(entry[key])
            for name in DURATIONS:
                count, ns = entry.get(name, (0, 0))
                into[name][0] += int(count)
                into[name][1] += int(ns)
    return total
