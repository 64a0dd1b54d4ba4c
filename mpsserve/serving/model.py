"""The model deployment: each replica is one process holding one ``Servable``."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import ray
from ray import serve

from mpsserve.config import ModelConfig, VersionPolicy
from mpsserve.errors import MpsServeError
from mpsserve.mps.guardian import ReplicaMps
from mpsserve.servable import Servable
from mpsserve.settings import settings

logger = logging.getLogger(__name__)


@serve.deployment(name="model")
class ModelReplica:
    """Sync methods run in Serve's thread pool, off the replica's event loop, so inference
    never blocks it. The version policy arrives as ``user_config``: Serve calls
    ``reconfigure`` after the constructor (the first load happens there) and again whenever
    only the policy changes, without restarting the replica."""

    def __init__(self, model: dict[str, Any]) -> None:
        config = ModelConfig.model_validate(model)
        gpu = bool(ray.get_gpu_ids())
        self._servable = Servable(config, device="auto" if gpu else "cpu")
        # The MPS hook ran before this constructor; the first CUDA call is the model load.
        self._mps = ReplicaMps(settings())
        self._mps.start_guardian()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._servable.set_policy(VersionPolicy.model_validate(user_config["version_policy"]))
        if not self._servable.ready:
            self._servable.load()
            self._mps.verify()
            self._servable.start_watching()

    def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        version: str | None = None,
    ) -> tuple[str, dict[str, np.ndarray]] | MpsServeError:
        """A client's error comes back as a value: it is an answer, not a replica fault, so
        Serve neither logs its traceback nor counts it as a failed call."""
        try:
            return self._servable.infer(inputs, outputs, version)
        except MpsServeError as exc:
            return exc

    def metadata(self) -> dict[str, Any]:
        return {**self._servable.metadata(), "mps": self._mps.describe(), "pid": os.getpid()}

    def ready(self) -> bool:
        return self._servable.ready

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose health check raises."""
        problem = self._servable.problem() or self._mps.problem()
        if problem is not None:
            raise RuntimeError(f"model {self._servable.config.name!r}: {problem}")
