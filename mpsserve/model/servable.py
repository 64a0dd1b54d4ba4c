"""One model served by one process: store -> version -> runtime -> validated predict.

Lifecycle: load -> warm up -> ready -> (watch) -> swap -> unload. A watcher thread polls the
store; a new target version is fetched, loaded and warmed up beside the serving one (with the
requests of its TF Serving warm-up file when it ships one, ``warmup.py``, else a synthetic
one, and the request shapes the serving one has seen, so a PyTorch version captures its CUDA
graphs before it takes traffic), then swapped in with one assignment, and the old one is
unloaded once its in-flight requests have finished, so no request fails because of a swap.

Loading a version holds the process's GIL for most of a second (PyTorch deserialises the
program in Python; measured on an H200: requests beside it waited up to 0.9 s) and unloading
one runs a full garbage collection. So a swap happens off the request path: the process says
it is ``busy`` (the transport tells its callers, who send elsewhere), lets the requests it has
finish (``drain``), then loads, warms, swaps and unloads, and says it is free again. Replicas
of a model on one node take turns (a node-local swap slot), so only one of them is away at a
time; a process's first load needs no slot.

One version everywhere: the version a process serves depends only on the store and on which
versions failed to load, never on what the process happened to load before, so a replica
started today and one running for a week reach the same verdict. The target is the newest
complete version the policy allows (``specific``: the highest pinned one) that has not failed.
A failed version is tried again when its files change (a slow upload completing: size, mtime
or ETag) and, unchanged, after a backoff (a transient failure: memory, a store hiccup), so
replicas that disagreed converge. ``converge_within_s`` is the bound this gives.
This module knows nothing of Ray or HTTP.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve import metrics
from mpsserve.config import EmbeddingsConfig, ModelConfig, VersionPolicy
from mpsserve.embeddings.lookup import EmbeddingTier
from mpsserve.errors import (
    InferenceError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    MpsServeError,
    ReplicaUnavailable,
)
from mpsserve.locks import file_lock
from mpsserve.model.features import prepare_inputs, synthetic_inputs, synthetic_like
from mpsserve.model.runtime import (
    REQUIRED_FILES,
    ModelRuntime,
    RuntimeOptions,
    injected,
    load_runtime,
)
from mpsserve.model.split import SplitManifest, SplitRuntime
from mpsserve.model.store import ModelStore
from mpsserve.model.warmup import FileRequests, warmup_file
from mpsserve.periodic import Periodic
from mpsserve.settings import settings

logger = logging.getLogger(__name__)
#: Error text that means the CUDA context is gone (an MPS server died, a device fault)...
DEVICE_FAULTS = ("CUDA error", "cudaError", "MPS", "CUDA_ERROR")
#: ... unless it is one of these, which leave the context usable (the request failed alone).
RECOVERABLE = ("out of memory", "stream is capturing", "StreamCapture", "capture")
UNLOAD_GRACE_S = 60.0  # longest an old version waits for its in-flight requests
KEEP_NEWEST = 3  # cached versions kept besides the served and pinned ones
RETRY_BASE_S = 15.0  # first retry of a failed version whose files did not change ...
RETRY_MAX_S = 600.0  # ... doubling up to this
LOAD_ALLOWANCE_S = 60.0  # what the convergence bound allows for one load and warm-up


@dataclass
class Failure:
    """A version that would not load in this process: why, its files then, when to retry."""

    reason: str
    fingerprint: str | None  # None: its files could not even be listed
    attempts: int
    retry_at: float  # time.monotonic()

    def due(self, fingerprint: str | None, now: float) -> bool:
        """Try again: the files changed since it failed, or the backoff has passed."""
        return fingerprint != self.fingerprint or now >= self.retry_at


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

    def __init__(
        self,
        config: ModelConfig,
        device: str = "auto",
        embeddings: EmbeddingsConfig | None = None,
    ) -> None:
        self.config = config
        #: The embedding tier, for split versions (``model.split``); None: the service has no
        #: ``embeddings:`` section, and a split version fails to load saying so.
        self.embeddings = (  # leases are renewed at each poll: they outlive three of them
            EmbeddingTier(embeddings, min_lease_ttl_s=3 * config.poll_interval_s)
            if embeddings is not None
            else None
        )
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
        self._swap_lock = cache / f".{config.name}.swap.lock"
        self.store = ModelStore(
            config.store,
            cache / config.name,
            required_files=REQUIRED_FILES[config.runtime],
            marker=config.done_marker,
        )
        self._current: Loaded | None = None
        self.busy = False  # loading or unloading a version: callers should send elsewhere
        #: Set by the transport: returns once the requests it has in flight here are done
        #: (bounded), called after ``busy`` is set and before a swap starts its heavy work.
        self.drain: Callable[[], None] = lambda: None
        self.fault: str | None = None  # a device error that leaves this process unusable
        #: Set by the process's owner: told once, with the error, when a device fault is found
        #: (here, or by a peer on the same GPU), to report it and end the process.
        self.on_fault: Callable[[str], None] = lambda message: None
        #: Set by the process's owner: what bounds this process's device memory, added to
        #: out-of-memory errors (e.g. its MPS pinned-memory limit).
        self.memory_limit: str | None = None
        self.failed: dict[int, Failure] = {}  # versions that would not load here, and why
        self.skipped: dict[int, str] = {}  # incomplete versions in the store, and why
        self.store_error: str | None = None
        self.complete: list[int] = []  # the store's complete versions at the last poll
        self.loading: int | None = None  # the version being loaded and warmed now
        #: Unloaded through the repository API: serves nothing, loads nothing, stays healthy.
        self.unloaded = False
        self.swaps = 0
        #: The served version's warm-up (its file, requests and seconds by source).
        self.warmup: dict[str, Any] | None = None
        self.serving_since: float | None = None  # time.time() of the last swap
        self.last_poll: float | None = None
        self._poll_lock = threading.Lock()
        #: Polls the store every poll_interval_s once started; a new policy wakes it.
        self._watcher = Periodic(
            f"store-watch {config.name}", config.poll_interval_s, self.poll, immediately=False
        )

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
        if self.unloaded:
            return None  # on purpose: replacing the process would not load it
        return None if self._current is not None else f"no loaded version ({self._why_empty()})"

    def _why_empty(self) -> str:
        if self.unloaded:
            return "it was unloaded through the repository API; load it to serve it again"
        if self.store_error:
            return self.store_error
        if self.failed:
            return "; ".join(f"version {v}: {f.reason}" for v, f in sorted(self.failed.items()))
        return f"no complete version in {self.config.store} matches {self.policy.text()}"

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
            self.complete = list(scan.complete)
            if self.unloaded:
                return
            for version in self.policy.candidates(scan.complete):
                if version == self.version:
                    break
                fingerprint = self._fingerprint(version)
                failure = self.failed.get(version)
                if failure is not None and not failure.due(fingerprint, time.monotonic()):
                    continue
                if self._try_swap(version, fingerprint):
                    break
            for gone in set(self.failed) - set(scan.complete) - set(scan.skipped):
                del self.failed[gone]  # deleted from the store: forget it
            self._prune(scan.complete)
            self._follow_embeddings()

    def _follow_embeddings(self) -> None:
        """A split model moves to the newest embedding delta published for it (its
        ``follow_updates``); a store that cannot say is logged, and serving goes on."""
        current = self._current
        if current is None or not isinstance(current.runtime, SplitRuntime):
            return
        try:
            moved = current.runtime.refresh()
            if self.embeddings is not None:
                self.embeddings.renew()
        except MpsServeError as exc:
            logger.warning(
                "model %s: cannot check for embedding updates: %s", self.config.name, exc.message
            )
            return
        if moved is not None:
            logger.info("model %s: now serving embedding version %s", self.config.name, moved)

    def _fingerprint(self, version: int) -> str | None:
        try:
            return self.store.fingerprint(version)
        except MpsServeError:
            return None

    @contextmanager
    def _away(self) -> Iterator[None]:
        """Busy for the heavy part of a swap: wait for this node's swap slot, say busy, let
        the requests in flight finish. A first load serves nobody yet: no slot, no drain."""
        if self._current is None:
            yield
            return
        waited = time.monotonic()
        with file_lock(self._swap_lock):
            if time.monotonic() - waited > 1:
                logger.info("waited %.1fs for this node's swap slot", time.monotonic() - waited)
            self.busy = True
            try:
                self.drain()
                yield
            finally:
                self.busy = False

    def _try_swap(self, version: int, fingerprint: str | None) -> bool:
        with self._away():
            return self._swap_to(version, fingerprint)

    def _swap_to(self, version: int, fingerprint: str | None) -> bool:
        started = time.monotonic()
        self.loading = version
        try:
            runtime, warmup = self._load_version(version)
        except Exception as exc:  # whatever a framework raises: report it, retry it later
            self._record_failure(version, fingerprint, exc)
            return False
        finally:
            self.loading = None
        self.failed.pop(version, None)
        old, self._current = self._current, Loaded(runtime, version)
        self.warmup = warmup
        self.serving_since = time.time()
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
            old.close_when_idle()  # still busy: the collection it runs stalls this process
        return True

    def _record_failure(self, version: int, fingerprint: str | None, exc: Exception) -> None:
        message = exc.message if isinstance(exc, MpsServeError) else f"{type(exc).__name__}: {exc}"
        previous = self.failed.get(version)
        attempts = 1 if previous is None else previous.attempts + 1
        backoff = min(RETRY_BASE_S * 2 ** (attempts - 1), RETRY_MAX_S)
        self.failed[version] = Failure(message, fingerprint, attempts, time.monotonic() + backoff)
        logger.error(
            "model %s version %d not served (attempt %d): %s; tried again when its files "
            "change, or in %.0fs",
            self.config.name,
            version,
            attempts,
            message,
            backoff,
        )
        metrics.count_load_failure(self.config.name, str(version))

    def _load_version(self, version: int) -> tuple[ModelRuntime, dict[str, Any]]:
        """The version loaded and warmed up, and what its warm-up ran."""
        path = self.store.fetch(version)
        runtime = self._load_runtime(path, version)
        try:
            warmup = self._warm_up(runtime, path, version)
        except Exception as exc:
            runtime.close()
            message = exc.message if isinstance(exc, MpsServeError) else str(exc)
            raise ModelLoadError(f"version {version} failed its warm-up: {message}") from exc
        return runtime, warmup

    def _load_runtime(self, path: Path, version: int) -> ModelRuntime:
        """The version's runtime: its model, or for a split model (``embeddings.json``) its
        DNN with the lookup of the embedding version it names."""
        manifest = SplitManifest.read(path)
        if manifest is not None and self.embeddings is None:
            raise ModelLoadError(
                f"version {version} is a split model (it names embedding version "
                f"{manifest.embedding_version!r}) but the service has no embeddings: section"
            )
        runtime = load_runtime(self.config.runtime, path, self.options)
        if manifest is None or self.embeddings is None:
            return runtime
        try:
            return SplitRuntime.open(runtime, manifest, self.embeddings, self.config.name)
        except Exception:
            runtime.close()
            raise

    def _warm_up(self, runtime: ModelRuntime, path: Path, version: int) -> dict[str, Any]:
        """The requests of the version's TF Serving warm-up file when it ships one, else a
        synthetic request; then one of each shape the serving version has prepared for (its
        CUDA-graph buckets), so the first real requests find them ready. Counted, timed,
        logged and exported (``metrics.observe_warmup``)."""
        started = time.monotonic()
        file = warmup_file(path)
        from_file = self._warm_up_from_file(runtime, file) if file is not None else 0
        file_s = time.monotonic() - started
        synthetic = self._warm_up_synthetic(runtime, fallback=from_file == 0)
        synthetic_s = time.monotonic() - started - file_s
        name, label = self.config.name, str(version)
        metrics.observe_warmup(name, label, "file", from_file, file_s)
        metrics.observe_warmup(name, label, "synthetic", synthetic, synthetic_s)
        logger.info(
            "model %s version %d warmed up with %d requests from %s (%.2fs) and %d synthetic "
            "ones (%.2fs)",
            name,
            version,
            from_file,
            file if file is not None else "no warm-up file",
            file_s,
            synthetic,
            synthetic_s,
        )
        return {
            "file": str(file) if file is not None else None,
            "file_requests": from_file,
            "file_s": round(file_s, 3),
            "synthetic_requests": synthetic,
            "synthetic_s": round(synthetic_s, 3),
        }

    def _warm_up_from_file(self, runtime: ModelRuntime, file: Path) -> int:
        """Run every predict request of ``file``; an error names the file and the record."""
        requests = FileRequests(file)
        count = 0
        for index, inputs in requests:
            try:
                runtime.predict(prepare_inputs(runtime.signature, inputs, self.config.max_rows))
            except MpsServeError as exc:
                raise ModelLoadError(f"{file}: record {index}: {exc.message}") from exc
            count += 1
        if requests.skipped:
            logger.warning(
                "model %s: %d records of %s are not predict requests; skipped (this server "
                "serves Predict only)",
                self.config.name,
                requests.skipped,
                file,
            )
        return count

    def _warm_up_synthetic(self, runtime: ModelRuntime, fallback: bool) -> int:
        """The synthetic request (when no file request ran) and the serving version's shapes;
        ``warmup_rows: 0`` turns both off. Returns how many requests ran."""
        if not self.config.warmup_rows:
            return 0
        count = 0
        if fallback:
            runtime.predict(synthetic_inputs(runtime.signature, self.config.warmup_rows))
            count += 1
        current = self._current
        for shapes in current.runtime.warm_shapes() if current is not None else ():
            runtime.predict(synthetic_like(runtime.signature, shapes))
            count += 1
        return count

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
            self._watcher.wake()

    def unload(self) -> None:
        """Serve nothing until ``reload`` (the repository API's unload): requests get
        ModelNotReady, the version unloads once its requests finish, polls load nothing."""
        with self._poll_lock:
            self.unloaded = True
            old, self._current = self._current, None
        if old is None:
            return
        logger.info("model %s: unloaded through the repository API", self.config.name)
        metrics.set_served_versions(self.config.name, self.replica, [])
        self.busy = True  # the collection unloading runs stalls this process
        try:
            old.close_when_idle()
        finally:
            self.busy = False

    def reload(self) -> None:
        """Serve again after ``unload``: the next poll (now) loads the policy's version."""
        if self.unloaded:
            logger.info("model %s: loaded through the repository API", self.config.name)
            self.unloaded = False

    def start_watching(self) -> None:
        if not self._watcher.is_alive() and not self._watcher.stopping:
            self._watcher.start()

    def stop(self) -> None:
        self._watcher.stop()

    def shutdown(self) -> None:
        """The process ends: stop watching, and let go of what outlives the process (a split
        model's node cache files, removed by their last user, and its leases in the store)."""
        self.stop()
        current = self._current
        if current is not None and isinstance(current.runtime, SplitRuntime):
            current.runtime.lookup.retire()
        if self.embeddings is not None:
            self.embeddings.close()

    # -- requests -------------------------------------------------------------------------

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: list[str] | None = None,
        version: str | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Validate, predict and select outputs; returns (served version, outputs)."""
        if self.fault is not None:
            raise ReplicaUnavailable(f"this replica has a device fault ({self.fault[:200]})")
        current = self._current_for(version)  # one read: a swap may happen meanwhile
        with current.use() as runtime:
            prepared = prepare_inputs(runtime.signature, inputs, self.config.max_rows)
            wanted = self._check_outputs(runtime, outputs)
            try:
                if (action := injected.claim()) is not None:  # tests only (settings)
                    injected.strike(action, runtime)
                result = runtime.predict(prepared)
            except InferenceError as exc:
                if is_device_fault(exc.message):
                    self.device_fault(exc.message)
                    raise ReplicaUnavailable(
                        f"this replica hit a device fault ({exc.message[:200]})"
                    ) from exc
                raise self._explained(exc) from exc
        missing = [name for name in wanted if name not in result]
        if missing:
            raise InferenceError(f"the model did not return output {missing[0]!r}")
        return str(current.version), {name: result[name] for name in wanted}

    def device_fault(self, message: str) -> None:
        """CUDA errors are sticky: this process answers no more requests, and its owner is
        told (once) so it can report the fault and make way for a new process."""
        if self.fault is not None:
            return
        self.fault = message
        logger.error("device fault; this replica is done: %s", message)
        self.on_fault(message)

    def _explained(self, exc: InferenceError) -> InferenceError:
        """An out-of-memory error says what bounds this process's memory."""
        if self.memory_limit and "out of memory" in exc.message:
            return InferenceError(f"{exc.message} [{self.memory_limit}]")
        return exc

    def _current_for(self, version: str | None) -> Loaded:
        current = self._current
        if current is None and self.unloaded:
            raise ModelNotReady(f"model {self.config.name!r} is unloaded (repository API)")
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
            "graphs": current.runtime.graph_status(),
            "store": self.store_status(),
            "embeddings": (
                current.runtime.lookup.stats()
                if isinstance(current.runtime, SplitRuntime)
                else None
            ),
        }

    def repository_state(self) -> dict[str, Any]:
        """What the repository index, the model configuration and a load's wait read: the
        version served, the store's complete versions, the policy, failures (no paths)."""
        return {
            "serving": None if self.version is None else str(self.version),
            "versions": [str(v) for v in self.complete],
            "loading": self.loading,
            "policy": self.policy.model_dump(mode="json"),
            "policy_text": self.policy.text(),
            "failed": {str(v): f.reason for v, f in sorted(self.failed.items())},
            "unloaded": self.unloaded,
            "error": self.store_error,
            "device": self.runtime.device if self.runtime is not None else self.options.device,
            "signature": self.config.signature,
            "max_rows": self.config.max_rows,
        }

    def store_status(self) -> dict[str, Any]:
        return {
            "uri": self.config.store,
            "policy": self.policy.text(),
            "serving": self.version,
            "serving_since": self.serving_since,
            "converge_within_s": self.converge_within_s,
            "swaps": self.swaps,
            "warmup": self.warmup,
            "failed": {str(v): f.reason for v, f in sorted(self.failed.items())},
            "skipped": {str(v): r for v, r in sorted(self.skipped.items())},
            "error": self.store_error,
            "last_poll": self.last_poll,
        }

    @property
    def converge_within_s(self) -> float:
        """How long replicas of this model may serve different versions: two polls (one to
        see the change, one in case the files were still arriving), the first retry of a
        version that failed in one process only, and one load."""
        return 2 * self.config.poll_interval_s + RETRY_BASE_S + LOAD_ALLOWANCE_S


def is_device_fault(message: str) -> bool:
    """A runtime error that leaves this process's CUDA context unusable."""
    return any(m in message for m in DEVICE_FAULTS) and not any(m in message for m in RECOVERABLE)
