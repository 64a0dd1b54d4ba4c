"""One model served by one process: store -> version -> runtime -> validated predict.

Lifecycle: load -> warm up -> ready -> (watch) -> swap -> unload. A watcher thread polls the
store; a new target version is fetched, loaded and warmed up beside the serving one, then
swapped in with one assignment, and the old one is unloaded once its in-flight requests have
finished, so no request fails because of a swap. A version that fails to load or warm up is
recorded with its reason and not tried again by this process; the current one keeps serving.
This module knows nothing of Ray or HTTP.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve import metrics
from mpsserve.config import ModelConfig, VersionPolicy
from mpsserve.errors import (
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    MpsServeError,
)
from mpsserve.features import prepare_inputs, synthetic_inputs
from mpsserve.runtime import REQUIRED_FILES, ModelRuntime, RuntimeOptions, load_runtime
from mpsserve.settings import settings
from mpsserve.store import ModelStore

logger = logging.getLogger(__name__)
#: Error text that means the CUDA context is gone (an MPS server died, a device fault).
DEVICE_FAULTS = ("CUDA error", "cudaError", "MPS", "CUDA_ERROR")
UNLOAD_GRACE_S = 60.0  # longest an old version waits for its in-flight requests
KEEP_NEWEST = 3  # cached versions kept besides the served and pinned ones


class Loaded:
    """One loaded version and the requests running on it (so it is unloaded only when idle)."""

    def __init__(self, runtime: ModelRuntime, version: int) -> None:
        self.runtime, self.version = runtime, version
        self._inflight = 0
        self._idle = threading.Condition()

    @contextmanager
    def use(self) -> Iterator[ModelRuntime]:
        with self._idle:
            self._inflight += 1
        try:
            yield self.runtime
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def close_when_idle(self, timeout_s: float = UNLOAD_GRACE_S) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout_s)
        self.runtime.close()
        logger.info("unloaded version %d", self.version)


class Servable:
    """Holds the served version of one model, answers requests, and follows the store."""

    def __init__(self, config: ModelConfig, device: str = "auto") -> None:
        self.config = config
        self.policy = config.version_policy
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # the label in metrics
        self.options = RuntimeOptions(
            signature_name=config.signature,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            device=device,
            cpu_fallback=config.cpu_fallback,
            custom_op_libraries=tuple(config.custom_op_libraries),
            cuda_graphs=config.cuda_graphs,
            tf32=config.tf32,
        )
        cache = Path(settings().cache_dir or tempfile.gettempdir()) / "mpsserve-cache"
        self.store = ModelStore(
            config.store,
            cache / config.name,
            required_files=REQUIRED_FILES[config.runtime],
            marker=config.done_marker,
        )
        self._current: Loaded | None = None
        self.fault: str | None = None  # a device error that leaves this process unusable
        self.failed: dict[int, str] = {}  # versions that would not load here, and why
        self.skipped: dict[int, str] = {}  # incomplete versions in the store, and why
        self.store_error: str | None = None
        self.swaps = 0
        self.last_poll: float | None = None
        self._poll_lock = threading.Lock()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def version(self) -> int | None:
        current = self._current
        return current.version if current is not None else None

    @property
    def runtime(self) -> ModelRuntime | None:
        current = self._current
        return current.runtime if current is not None else None

    @property
    def ready(self) -> bool:
        return self._current is not None and self.fault is None

    def problem(self) -> str | None:
        """Why this process cannot serve (for health checks), or None."""
        if self.fault is not None:
            return f"device fault: {self.fault}"
        return None if self._current is not None else f"no loaded version ({self._why_empty()})"

    def _why_empty(self) -> str:
        if self.store_error:
            return self.store_error
        if self.failed:
            return "; ".join(f"version {v}: {r}" for v, r in sorted(self.failed.items()))
        return f"no complete version in {self.config.store} matches {self._policy_text()}"

    def _policy_text(self) -> str:
        if self.policy.specific:
            return f"specific {self.policy.specific}"
        return f"latest {self.policy.latest or 1}"

    # -- loading and swapping ---------------------------------------------------------------

    def load(self) -> None:
        """The first load, in the caller's thread; ModelNotReady (with why) if none loads."""
        self.poll()
        if self._current is None:
            raise ModelNotReady(
                f"model {self.config.name!r} has no version to serve: {self._why_empty()}"
            )

    def poll(self) -> None:
        """Look at the store once; load and swap to the target version if it changed."""
        with self._poll_lock:
            self.last_poll = time.time()
            try:
                scan = self.store.scan()
            except MpsServeError as exc:
                self.store_error = exc.message
                logger.error("model %s: cannot read the store: %s", self.config.name, exc.message)
                return
            self.store_error, self.skipped = None, dict(scan.skipped)
            for version in self._candidates(scan.complete):
                if version == self.version or self._try_swap(version):
                    break
            self._prune(scan.complete)

    def _candidates(self, complete: list[int]) -> list[int]:
        """Versions to try, best first. The policy's versions come first; a process serving
        nothing yet also falls back to older complete ones, so it never starts empty while
        an older version would load."""
        if self.policy.specific:
            wanted = [v for v in complete if v in self.policy.specific]
        else:
            wanted = complete[-(self.policy.latest or 1) :]
        ordered = sorted(wanted, reverse=True)
        if self._current is None and not self.policy.specific:
            ordered += [v for v in sorted(complete, reverse=True) if v not in ordered]
        return [v for v in ordered if v not in self.failed or v == self.version]

    def _try_swap(self, version: int) -> bool:
        started = time.monotonic()
        try:
            runtime = self._load_version(version)
        except Exception as exc:  # whatever a framework raises: report it, never retry it
            message = (
                exc.message if isinstance(exc, MpsServeError) else f"{type(exc).__name__}: {exc}"
            )
            self.failed[version] = message
            logger.error("model %s version %d not served: %s", self.config.name, version, message)
            metrics.count_load_failure(self.config.name, str(version))
            return False
        old, self._current = self._current, Loaded(runtime, version)
        self.swaps += 1 if old is not None else 0
        name = self.config.name
        if old is not None:
            metrics.count_swap(name, str(version))
        metrics.set_served_versions(name, self.replica, [str(version)])
        metrics.set_cpu_ops(name, str(version), len(runtime.cpu_ops))
        logger.info(
            "model %s now serves version %d on %s (loaded and warmed in %.1fs)%s",
            self.config.name,
            version,
            runtime.device,
            time.monotonic() - started,
            f"; version {old.version} unloads when idle" if old else "",
        )
        if old is not None:
            threading.Thread(target=old.close_when_idle, name="unload", daemon=True).start()
        return True

    def _load_version(self, version: int) -> ModelRuntime:
        path = self.store.fetch(version)
        runtime = load_runtime(self.config.runtime, path, self.options)
        if self.config.warmup_rows:
            try:
                runtime.predict(synthetic_inputs(runtime.signature, self.config.warmup_rows))
            except Exception as exc:
                runtime.close()
                raise ModelLoadError(f"version {version} failed its warm-up: {exc}") from exc
        return runtime

    def _prune(self, complete: list[int]) -> None:
        """Drop old cached copies. Kept: the served version, pinned ones and the newest few,
        since another replica of this node may be loading one of those right now."""
        keep = {*complete[-KEEP_NEWEST:], *(self.policy.specific or ())}
        if self.version is not None:
            keep.add(self.version)
        try:
            self.store.prune_cache(keep)
        except OSError as exc:
            logger.warning("could not prune the model cache: %s", exc)

    # -- watching -------------------------------------------------------------------------

    def set_policy(self, policy: VersionPolicy) -> None:
        """A new version policy (from Serve's reconfigure); takes effect at the next poll,
        which it triggers at once."""
        if policy != self.policy:
            logger.info("model %s: version policy %s", self.config.name, policy.model_dump())
            self.policy = policy
            for version in policy.specific or ():  # pinning is an operator's call: try again
                self.failed.pop(version, None)
            self._wake.set()

    def start_watching(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="store-watch", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.config.poll_interval_s)
            self._wake.clear()
            if not self._stopping.is_set():
                try:
                    self.poll()
                except Exception:  # keep watching whatever one poll hit
                    logger.exception("model %s: store poll failed", self.config.name)

    # -- requests -------------------------------------------------------------------------

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: list[str] | None = None,
        version: str | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Validate, predict and select outputs; returns (served version, outputs)."""
        current = self._current_for(version)  # one read: a swap may happen meanwhile
        with current.use() as runtime:
            prepared = prepare_inputs(runtime.signature, inputs, self.config.max_rows)
            wanted = self._check_outputs(runtime, outputs)
            try:
                result = runtime.predict(prepared)
            except InferenceError as exc:
                if any(mark in exc.message for mark in DEVICE_FAULTS):
                    self.fault = exc.message  # CUDA errors are sticky: replace the process
                raise
        missing = [name for name in wanted if name not in result]
        if missing:
            raise InferenceError(f"the model did not return output {missing[0]!r}")
        return str(current.version), {name: result[name] for name in wanted}

    def _current_for(self, version: str | None) -> Loaded:
        current = self._current
        if current is None:
            raise ModelNotReady(f"model {self.config.name!r} is not loaded yet")
        if version is not None and version != str(current.version):
            raise ModelNotFound(
                f"model {self.config.name!r} version {version} is not served; "
                f"serving version {current.version}"
            )
        return current

    @staticmethod
    def _check_outputs(runtime: ModelRuntime, outputs: list[str] | None) -> list[str]:
        names = [spec.name for spec in runtime.signature.outputs]
        for name in outputs or ():
            if name not in names:
                raise InvalidInput(f"unknown output {name!r}; the model returns {names}")
        return list(outputs) if outputs else names

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata (datatypes are numpy names; the codecs map them), plus
        what the store watcher knows."""
        current = self._current
        if current is None:
            raise ModelNotReady(
                f"model {self.config.name!r} is not loaded yet: {self._why_empty()}"
            )
        signature = current.runtime.signature
        return {
            "name": self.config.name,
            "versions": [str(current.version)],
            "platform": current.runtime.platform,
            "inputs": [s.to_dict() for s in signature.inputs],
            "outputs": [s.to_dict() for s in signature.outputs],
            "ragged_features": list(signature.ragged_features),
            "device": current.runtime.device,
            "cpu_ops": current.runtime.cpu_ops,
            "store": self.store_status(),
        }

    def store_status(self) -> dict[str, Any]:
        return {
            "uri": self.config.store,
            "policy": self._policy_text(),
            "serving": self.version,
            "swaps": self.swaps,
            "failed": {str(v): r for v, r in sorted(self.failed.items())},
            "skipped": {str(v): r for v, r in sorted(self.skipped.items())},
            "error": self.store_error,
            "last_poll": self.last_poll,
        }
