"""Small real SavedModels for the op audit and custom op tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.custom_ops.build import WRAPPER


def _tf() -> Any:
    from mpsserve.model.runtime.tensorflow import tf  # TensorFlow with the runtime's log level

    return tf


def write_add_one_model(store: Path, library: Path, version: int = 1) -> Path:
    """``<store>/<version>/``: a signature ``x (float32, [-1]) -> y = AddOne(x)``."""
    from mpsserve.model.runtime.tensorflow import load_op_library

    tf = _tf()
    add_one = getattr(load_op_library(str(library)), WRAPPER)

    class AddOne(tf.Module):  # type: ignore[name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"y": add_one(x)}

    module = AddOne()
    path = store / str(version)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def write_fallback_model(path: Path, library: Path) -> Path:
    """A model whose fallbacks hide at several depths of its functions:

    - ``StringToHashBucketFast`` (no GPU kernel at all) in the signature's function;
    - ``MatMul`` on int32 (GPU kernels exist, for floating types only) in a nested function;
    - the custom ``MpsserveAddOne`` (CPU kernel only) in a while loop's body in that function;
    - a float ``Mul`` the author pinned to the CPU.
    A float32 ``MatMul``, which has a GPU kernel, must not be listed.
    """
    from mpsserve.model.runtime.tensorflow import load_op_library

    tf = _tf()
    add_one = getattr(load_op_library(str(library)), WRAPPER)

    @tf.function
    def nested(x: Any, ids: Any) -> tuple[Any, Any]:
        counts = tf.matmul(ids, ids, transpose_b=True)  # int32: no GPU kernel

        def body(i: Any, acc: Any) -> tuple[Any, Any]:
            return i + 1, add_one(acc)

        _, y = tf.while_loop(lambda i, acc: i < 3, body, (tf.constant(0), x))
        return y, counts

    class Fallbacks(tf.Module):  # type: ignore[name-defined]
        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="words"),
                tf.TensorSpec([None, 4], tf.float32, name="x"),
                tf.TensorSpec([None, 4], tf.int32, name="ids"),
            ]
        )
        def serve(self, words: Any, x: Any, ids: Any) -> dict[str, Any]:
            buckets = tf.strings.to_hash_bucket_fast(words, 100)
            with tf.device("/CPU:0"):
                doubled = x * 2.0
            y, counts = nested(x, ids)
            dense = tf.matmul(y, doubled, transpose_b=True)  # float32: has a GPU kernel
            return {"buckets": buckets, "dense": dense, "counts": counts}

    module = Fallbacks()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path
