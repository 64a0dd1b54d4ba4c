"""One model served by one process: store -> version -> runtime -> validated predict.

Lifecycle: load -> warm up -> ready. The serving layer drives it; this module knows nothing
of Ray or HTTP, so it is tested directly and reused by every transport.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.config import ModelConfig
from mpsserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from mpsserve.features import prepare_inputs, synthetic_inputs
from mpsserve.runtime import ModelRuntime, RuntimeOptions, load_runtime
from mpsserve.settings import settings
from mpsserve.store import ModelStore

logger = logging.getLogger(__name__)
#: Error text that means the CUDA context is gone (an MPS server died, a device fault).
DEVICE_FAULTS = ("CUDA error", "cudaError", "MPS", "CUDA_ERROR")


class Servable:
    """Holds the loaded version of one model and answers requests for it."""

    def __init__(self, config: ModelConfig, device: str = "auto") -> None:
        self.config = config
        self.options = RuntimeOptions(
            signature_name=config.signature,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            device=device,
        )
        cache = Path(settings().cache_dir or tempfile.gettempdir()) / "mpsserve-cache"
        self.store = ModelStore(config.store, cache / config.name)
        self.runtime: ModelRuntime | None = None
        self.version: int | None = None
        self.fault: str | None = None  # a device error that leaves this process unusable

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.fault is None

    def problem(self) -> str | None:
        """Why this process cannot serve (for health checks), or None."""
        if self.fault is not None:
            return f"device fault: {self.fault}"
        return None if self.runtime is not None else "no loaded version"

    def load(self) -> None:
        """Load the version the policy selects, warm it up, then make it the served one."""
        version = self._target_version()
        started = time.monotonic()
        runtime = load_runtime(self.config.runtime, self.store.local_path(version), self.options)
        runtime.predict(synthetic_inputs(runtime.signature))
        self.runtime, self.version = runtime, version
        logger.info(
            "model %s version %d ready on %s in %.1fs",
            self.config.name,
            version,
            runtime.device,
            time.monotonic() - started,
        )

    def _target_version(self) -> int:
        specific = self.config.version_policy.specific
        if specific:
            available = set(self.store.versions())
            wanted = [v for v in specific if v in available]
            if not wanted:
                raise ModelNotReady(f"none of the pinned versions {specific} is in the store")
            return max(wanted)
        return self.store.latest()

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: list[str] | None = None,
        version: str | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Validate, predict and select outputs; returns (served version, outputs)."""
        runtime, served = self._current(version)
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
        return served, {name: result[name] for name in wanted}

    def _current(self, version: str | None) -> tuple[ModelRuntime, str]:
        runtime, served = self.runtime, self.version  # one read: a swap may happen meanwhile
        if runtime is None or served is None:
            raise ModelNotReady(f"model {self.config.name!r} is not loaded yet")
        if version is not None and version != str(served):
            raise ModelNotFound(
                f"model {self.config.name!r} version {version} is not served; "
                f"serving version {served}"
            )
        return runtime, str(served)

    @staticmethod
    def _check_outputs(runtime: ModelRuntime, outputs: list[str] | None) -> list[str]:
        names = [spec.name for spec in runtime.signature.outputs]
        for name in outputs or ():
            if name not in names:
                raise InvalidInput(f"unknown output {name!r}; the model returns {names}")
        return list(outputs) if outputs else names

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata (datatypes are numpy names; the codec maps them)."""
        runtime = self.runtime
        if runtime is None or self.version is None:
            raise ModelNotReady(f"model {self.config.name!r} is not loaded yet")
        signature = runtime.signature
        return {
            "name": self.config.name,
            "versions": [str(self.version)],
            "platform": runtime.platform,
            "inputs": [s.to_dict() for s in signature.inputs],
            "outputs": [s.to_dict() for s in signature.outputs],
            "ragged_features": list(signature.ragged_features),
            "device": runtime.device,
        }
