"""TensorFlow SavedModel runtime: a signature (``serving_default``) on the native TF backend.

No graph conversion. Each process turns on GPU memory growth before TensorFlow touches the
GPU, so several replica processes can share one card instead of the first taking it all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# TensorFlow's C++ INFO lines (CPU features, CUDA probing) bury the service's own output;
# warnings and errors still show. Set before the import, which reads it; a user's value wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
import tensorflow as tf

from mpsserve.errors import InferenceError, InvalidInput, ModelLoadError
from mpsserve.runtime.base import (
    ModelRuntime,
    RuntimeOptions,
    Signature,
    TensorSpec,
    read_signature_file,
)

logger = logging.getLogger(__name__)
_configured = False


def configure_process(options: RuntimeOptions) -> None:
    """Set thread pools and GPU memory growth once per process, before TF's first op."""
    global _configured
    if _configured:
        return
    try:
        if options.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(options.intra_op_threads)
        if options.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(options.inter_op_threads)
        gpus = tf.config.list_physical_devices("GPU")
        if options.device == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
        for gpu in gpus if options.device != "cpu" else []:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # TF already initialised in this process
        logger.warning("TensorFlow process settings not applied: %s", exc)
    _configured = True


def _spec(name: str, spec: tf.TensorSpec) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name=name, dtype=np.dtype(spec.dtype.as_numpy_dtype).name, shape=shape)


def _signature(fn: Any) -> Signature:
    inputs = [_spec(n, s) for n, s in sorted(fn.structured_input_signature[1].items())]
    outputs = [_spec(n, s) for n, s in sorted(fn.structured_outputs.items())]
    return Signature.build(inputs, outputs)


class TensorFlowRuntime(ModelRuntime):
    platform = "tensorflow_savedmodel"

    def __init__(self, loaded: Any, fn: Any, signature: Signature, device: str) -> None:
        super().__init__(signature, device)
        self._loaded = loaded  # keeps the functions' variables alive
        self._fn = fn

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions) -> TensorFlowRuntime:
        configure_process(options)
        try:
            loaded = tf.saved_model.load(str(model_dir))
        except (OSError, ValueError, tf.errors.OpError) as exc:
            raise ModelLoadError(f"cannot load SavedModel {model_dir}: {exc}") from exc
        if options.signature_name not in loaded.signatures:
            available = sorted(loaded.signatures.keys())
            raise ModelLoadError(
                f"SavedModel {model_dir} has no signature {options.signature_name!r}; "
                f"it has {available}"
            )
        fn = loaded.signatures[options.signature_name]
        signature = _signature(fn)
        sidecar = read_signature_file(model_dir, required=False)
        if sidecar is not None:
            signature = signature.with_bounds_from(sidecar)
        device = "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
        return cls(loaded, fn, signature, device)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            result = self._fn(**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidInput(f"the model rejected the request: {exc.message}") from exc
        except tf.errors.OpError as exc:
            raise InferenceError(f"TensorFlow failed: {exc.message}") from exc
        return {name: tensor.numpy() for name, tensor in result.items()}

    def close(self) -> None:
        self._fn = None
        self._loaded = None
