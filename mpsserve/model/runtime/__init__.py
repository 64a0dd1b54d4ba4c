"""Model runtimes. Frameworks import lazily: a torch-only host never imports TensorFlow."""

from __future__ import annotations

from pathlib import Path

from mpsserve.model.runtime.base import ModelRuntime, RuntimeOptions, Signature, TensorSpec

RUNTIMES = ("tensorflow", "torch")
#: Files a model version must hold before the store counts it (no framework import needed).
REQUIRED_FILES = {"tensorflow": ("saved_model.pb",), "torch": ("model.pt2", "signature.json")}


def runtime_class(kind: str) -> type[ModelRuntime]:
    """The runtime class for a config's ``runtime`` field."""
    if kind == "tensorflow":
        from mpsserve.model.runtime.tensorflow import TensorFlowRuntime

        return TensorFlowRuntime
    if kind == "torch":
        from mpsserve.model.runtime.torch import TorchRuntime

        return TorchRuntime
    raise ValueError(f"unknown runtime {kind!r}; expected one of {RUNTIMES}")


def load_runtime(kind: str, model_dir: Path, options: RuntimeOptions) -> ModelRuntime:
    """Load ``model_dir`` with the named runtime."""
    return runtime_class(kind).load(model_dir, options)


__all__ = ["ModelRuntime", "RuntimeOptions", "Signature", "TensorSpec", "load_runtime"]
