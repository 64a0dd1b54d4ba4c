"""TensorFlow SavedModel runtime: a signature (``serving_default``) on the native TF backend.

No graph conversion. Each process turns on GPU memory growth before TensorFlow touches the
GPU, so several replica processes can share one card instead of the first taking it all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.errors import InferenceError, InvalidInput, ModelLoadError
from mpsserve.model.runtime.base import (
    ModelRuntime,
    RuntimeOptions,
    Signature,
    TensorSpec,
    read_signature_file,
)
from mpsserve.model.runtime.tf_kernels import (  # TensorFlow, imported there with our log level
    CPU_ONLY_BUILD_NOTE,
    audit_function,
    gpu_kernels_registered,
    tf,
)

logger = logging.getLogger(__name__)
_configured = False
_op_libraries: dict[str, Any] = {}  # real path -> the module tf.load_op_library returned
_op_libraries_lock = threading.Lock()
UNREGISTERED_OP_HINT = " (an op from a custom op library? list it in custom_op_libraries)"
#: Most fallback ops named in one log line or error; the rest are counted.
MAX_OPS_SHOWN = 10


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


def load_op_libraries(paths: Sequence[str]) -> None:
    """Load custom op libraries (``tf.load_op_library``) once per process, before a model
    that uses their ops; the same file under another path (a symlink) is not loaded again."""
    for path in paths:
        load_op_library(path)


def load_op_library(path: str) -> Any:
    """One library (cached by real path); returns its module of generated op wrappers."""
    real = os.path.realpath(path)
    with _op_libraries_lock:
        if real not in _op_libraries:
            try:
                _op_libraries[real] = tf.load_op_library(real)
            except (tf.errors.OpError, OSError, RuntimeError, ValueError) as exc:
                why = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
                raise ModelLoadError(f"cannot load custom op library {path}: {why}") from exc
            logger.info("loaded custom op library %s", real)
        return _op_libraries[real]


def _audit(fn: Any) -> list[dict[str, Any]]:
    if not gpu_kernels_registered():
        logger.warning("CPU-fallback audit skipped: %s", CPU_ONLY_BUILD_NOTE)
        return []
    return [op.to_dict() for op in audit_function(fn)]


def describe_cpu_ops(cpu_ops: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the fallback ops (op, node, function, why), at most MAX_OPS_SHOWN."""
    shown = [
        f"{o['op']} (node {o['node']!r} in {o['function']}: {o['reason']})"
        for o in cpu_ops[:MAX_OPS_SHOWN]
    ]
    more = len(cpu_ops) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


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

    @property
    def function(self) -> Any:
        """The signature's concrete function (for the audit's placement check)."""
        return self._fn

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions) -> TensorFlowRuntime:
        """Load and audit the model, then apply its ``cpu_fallback`` policy."""
        runtime = cls.open(model_dir, options)
        if runtime.cpu_ops:
            runtime._apply_cpu_fallback(model_dir, options.cpu_fallback)
        return runtime

    def _apply_cpu_fallback(self, model_dir: Path, policy: str) -> None:
        """Applied on any host, CPU or GPU: a staging run refuses what a GPU host would."""
        count, listing = len(self.cpu_ops), describe_cpu_ops(self.cpu_ops)
        if policy == "fail":
            self.close()
            raise ModelLoadError(
                f"SavedModel {model_dir} has {count} op(s) without a GPU kernel and its "
                f"cpu_fallback is 'fail': {listing}"
            )
        logger.warning(
            "SavedModel %s: %d op(s) without a GPU kernel run on the CPU: %s",
            model_dir,
            count,
            listing,
        )

    @classmethod
    def open(cls, model_dir: Path, options: RuntimeOptions) -> TensorFlowRuntime:
        """Load the custom op libraries, then the model, and audit it for CPU fallback
        (``cpu_ops``) without applying the policy: ``mpsserve audit-ops`` reports instead."""
        configure_process(options)
        load_op_libraries(options.custom_op_libraries)
        try:
            loaded = tf.saved_model.load(str(model_dir))
        except (OSError, ValueError, RuntimeError, tf.errors.OpError) as exc:
            hint = UNREGISTERED_OP_HINT if "Op type not registered" in str(exc) else ""
            raise ModelLoadError(f"cannot load SavedModel {model_dir}: {exc}{hint}") from exc
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
        runtime = cls(loaded, fn, signature, device)
        runtime.cpu_ops = _audit(fn)
        return runtime

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
