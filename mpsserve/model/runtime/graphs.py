"""CUDA-graph replay for the PyTorch runtime: one launch per request instead of hundreds.

Eager PyTorch spends more CPU launching this model's kernels (27 embedding bags and an MLP)
than the GPU spends running them; with several replica processes per GPU that CPU, not the
GPU, caps throughput. A captured graph replays every kernel with one call.

Graphs need fixed shapes, so a request is padded up to a bucket: its rows to the next size
in a geometric series (ratio ``GROWTH``, multiples of ``ALIGN``), and each ragged feature's
values likewise. Padded rows are zeros; a ragged feature's padded values all go to one spare
padded row (its length), so every real row sees exactly its own values, and the spare rows'
outputs are dropped. This assumes what a ranking model does: each row is scored on its own.
A graph is captured on the first request of its bucket (or, for a new version, while it
warms up with the shapes the old version served), checked once against the eager result, and
kept (the ``MAX_GRAPHS`` most recently used).

Capturing while other threads of the process run CUDA work (the old version serving during a
hot swap, another bucket replaying) is what broke swaps under load: PyTorch captures in
"global" mode by default, where any other thread's synchronising call (a device-to-host copy,
a cudaMalloc) invalidates the capture and fails that thread's work. Captures here use
"thread_local" mode (only the capturing thread is restricted; the capture runs on a
non-blocking side stream, so other threads' legacy-stream work does not join it), and one
capture runs at a time per process. ``MPSSERVE_GRAPH_CAPTURE=exclusive`` also pauses every
replay and eager run of the process while a capture runs (the fallback if a driver or
PyTorch version mishandles concurrent work; measured in tests/gpu/results/).
A capture that fails leaves that bucket eager (the model keeps its other graphs); a mismatch
against eager, a replay error or outputs that are not per row turn graphs off for the model,
with a warning, and requests run eagerly.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mpsserve.model.runtime.base import Signature
from mpsserve.settings import settings
from mpsserve.types import LENGTHS_SUFFIX, VALUES_SUFFIX

logger = logging.getLogger(__name__)
GROWTH = 1.125  # at most ~12% padding; 2000 rows -> 2176 (1.25 gave 2432, 9% less throughput)
ALIGN = 64
MAX_GRAPHS = 32
TOLERANCE = 1e-3  # TF32 and kernel choice differ between capture and eager: loose on purpose
MAX_CAPTURE_FAILURES = 3  # then graphs go off for the model


class CaptureGate:
    """One capture at a time per process; in exclusive mode a capture also waits for the
    process's other CUDA work to finish and holds new work back until it ends."""

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self._cond = threading.Condition()
        self._working = 0
        self._capturing = False

    @contextmanager
    def work(self) -> Iterator[None]:
        """Around a replay or an eager run."""
        if not self.exclusive:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._working += 1
        try:
            yield
        finally:
            with self._cond:
                self._working -= 1
                self._cond.notify_all()

    @contextmanager
    def capture(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._capturing = True
            if self.exclusive:
                self._cond.wait_for(lambda: self._working == 0)
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


#: Made at import, before any thread can ask: two gates would let two captures overlap.
_GATE = CaptureGate(exclusive=settings().graph_capture == "exclusive")


def gate() -> CaptureGate:
    """The process's gate (``MPSSERVE_GRAPH_CAPTURE``: concurrent or exclusive)."""
    return _GATE


def bucket(n: int) -> int:
    """The smallest size >= n in the series ALIGN, then x GROWTH rounded up to ALIGN."""
    size = ALIGN
    while size < n:
        size = math.ceil(size * GROWTH / ALIGN) * ALIGN
    return size


class Padding:
    """How one request maps onto a bucket's shapes."""

    def __init__(self, signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
        self.signature = signature
        values = {f + VALUES_SUFFIX for f in signature.ragged_features}
        lengths = {f + LENGTHS_SUFFIX for f in signature.ragged_features}
        row_inputs = [s.name for s in signature.inputs if s.name not in values]
        self.rows = int(inputs[row_inputs[0]].shape[0]) if row_inputs else 1
        # With ragged features one spare row takes the padded values.
        self.padded_rows = bucket(self.rows + (1 if signature.ragged_features else 0))
        self.values = {name: int(inputs[name].shape[0]) for name in sorted(values)}
        self.padded_values = {name: bucket(n) for name, n in self.values.items()}
        self._values, self._lengths = values, lengths

    @property
    def key(self) -> tuple[int, ...]:
        return (self.padded_rows, *self.padded_values.values())

    def padded_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        lead = self.padded_values[name] if name in self._values else self.padded_rows
        return (lead, *shape[1:])

    def stage(self, name: str, array: np.ndarray, host: np.ndarray) -> None:
        """Write ``array`` and its padding into ``host`` (a pinned buffer of the padded
        shape): the GPU then takes the whole buffer in one copy, no kernel for the padding."""
        n = array.shape[0]
        host[:n] = array
        host[n:] = 0
        if name in self._lengths:
            feature = name.removesuffix(LENGTHS_SUFFIX) + VALUES_SUFFIX
            host[-1] = self.padded_values[feature] - self.values[feature]  # the spare row's


class _Graph:
    """A captured graph, its static GPU inputs and outputs, and pinned host mirrors of both:
    a request is staged into the input mirrors, copied to the GPU asynchronously, replayed,
    and its rows copied back into the output mirrors (one replay at a time per runner)."""

    def __init__(
        self,
        graph: torch.cuda.CUDAGraph,
        inputs: list[torch.Tensor],
        outputs: Any,
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.graph, self.inputs = graph, inputs
        self.outputs = list(outputs) if isinstance(outputs, tuple | list) else [outputs]
        self.shapes = shapes  # the request it was captured for, to warm a next version
        self.checked = False
        self.staging = [_pinned_like(t) for t in inputs]
        self.results = [_pinned_like(t) for t in self.outputs]


def _pinned_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)


class GraphRunner:
    """Replays captured graphs of ``module``; ``predict`` returns None when it cannot."""

    def __init__(self, module: Any, signature: Signature, device: torch.device) -> None:
        self.module, self.signature, self.device = module, signature, device
        self.enabled = device.type == "cuda"
        self._graphs: OrderedDict[tuple[int, ...], _Graph] = OrderedDict()
        self._lock = threading.Lock()  # one replay at a time: the graphs share buffers
        self._pool: Any = None
        self._done: torch.cuda.Event | None = None  # a replay's results are on the host
        self._eager_keys: dict[tuple[int, ...], str] = {}  # buckets whose capture failed
        self.captures = 0

    def predict(self, inputs: Mapping[str, np.ndarray], eager: Any) -> dict[str, np.ndarray] | None:
        """Outputs for ``inputs`` from a graph, or None (then the caller runs eagerly).
        ``eager(inputs)`` gives the eager result, used once per graph as a check."""
        if not self.enabled:
            return None
        padding = Padding(self.signature, inputs)
        names = [spec.name for spec in self.signature.outputs]
        try:
            with self._lock:
                entry = self._graph_for(padding, inputs)
                if entry is None:
                    return None
                with gate().work():
                    result = self._replay(entry, padding, inputs, names)
        except Exception as exc:  # never fail a request because of a graph
            self._disable(f"replay failed: {exc}")
            return None
        if not entry.checked:
            self._check(entry, result, eager(inputs))
            if not self.enabled:
                return None
        return result

    def _replay(
        self,
        entry: _Graph,
        padding: Padding,
        inputs: Mapping[str, np.ndarray],
        names: list[str],
    ) -> dict[str, np.ndarray]:
        """Stage, copy in, replay, copy out, then wait for the copy in the driver.

        The wait is a blocking event (the thread sleeps until the GPU signals), not
        PyTorch's default synchronising copy, which spins a core for the whole GPU time: with
        several replicas per GPU those cores are what serve the next requests."""
        for spec, static, host in zip(
            self.signature.inputs, entry.inputs, entry.staging, strict=True
        ):
            padding.stage(spec.name, inputs[spec.name], host.numpy())
            static.copy_(host, non_blocking=True)
        entry.graph.replay()
        rows = padding.rows
        for output, result in zip(entry.outputs, entry.results, strict=True):
            result[:rows].copy_(output[:rows], non_blocking=True)
        if self._done is None:
            self._done = torch.cuda.Event(blocking=True)
        self._done.record()
        self._done.synchronize()
        return {
            name: result[:rows].numpy().copy()
            for name, result in zip(names, entry.results, strict=True)
        }

    def _graph_for(self, padding: Padding, inputs: Mapping[str, np.ndarray]) -> _Graph | None:
        entry = self._graphs.get(padding.key)
        if entry is not None:
            self._graphs.move_to_end(padding.key)
            return entry
        if padding.key in self._eager_keys:
            return None
        with gate().capture():
            entry = self._capture(padding, inputs)
        if entry is None:
            return None
        self._graphs[padding.key] = entry
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return entry

    def _capture(self, padding: Padding, inputs: Mapping[str, np.ndarray]) -> _Graph | None:
        try:
            statics = [
                torch.zeros(
                    padding.padded_shape(s.name, inputs[s.name].shape),
                    dtype=torch.from_numpy(np.empty(0, dtype=inputs[s.name].dtype)).dtype,
                    device=self.device,
                )
                for s in self.signature.inputs
            ]
            for spec, static in zip(self.signature.inputs, statics, strict=True):
                host = _pinned_like(static)
                padding.stage(spec.name, inputs[spec.name], host.numpy())
                static.copy_(host)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation must not be captured
                    self.module(*statics)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with (
                torch.inference_mode(),
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"),
            ):
                outputs = self.module(*statics)
        except Exception as exc:
            self._capture_failed(padding.key, exc)
            return None
        tensors = outputs if isinstance(outputs, tuple | list) else (outputs,)
        if any(t.ndim == 0 or t.shape[0] != padding.padded_rows for t in tensors):
            self._disable("an output does not have one entry per row")
            return None
        self.captures += 1
        logger.info("captured a CUDA graph for padded shape %s", padding.key)
        shapes = {name: tuple(int(d) for d in array.shape) for name, array in inputs.items()}
        return _Graph(graph, statics, outputs, shapes)

    def _capture_failed(self, key: tuple[int, ...], exc: Exception) -> None:
        """That bucket runs eagerly from now on; several failures turn graphs off."""
        self._eager_keys[key] = str(exc)
        logger.warning(
            "CUDA-graph capture for padded shape %s failed: %s; it runs eagerly", key, exc
        )
        if len(self._eager_keys) >= MAX_CAPTURE_FAILURES:
            self._disable(f"{len(self._eager_keys)} captures failed, the last: {exc}")

    def shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """One request's shapes per checked graph, most recently used last."""
        return [dict(g.shapes) for g in list(self._graphs.values()) if g.checked]

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "graphs": len(self._graphs),
            "captures": self.captures,
            "eager_buckets": len(self._eager_keys),
        }

    def _check(self, entry: _Graph, got: dict[str, np.ndarray], want: dict[str, Any]) -> None:
        for name, array in got.items():
            reference = np.asarray(want[name])
            scale = max(float(np.abs(reference).max(initial=0.0)), 1.0)
            if array.shape != reference.shape or not np.allclose(
                array, reference, rtol=TOLERANCE, atol=TOLERANCE * scale
            ):
                self._disable(f"output {name!r} differs from the eager result")
                return
        entry.checked = True

    def _disable(self, why: str) -> None:
        if self.enabled:
            logger.warning("CUDA graphs off for this model (%s); running eagerly", why)
        self.enabled = False
        self._graphs.clear()
