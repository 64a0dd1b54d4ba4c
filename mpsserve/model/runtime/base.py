"""The ModelRuntime interface and the signature every runtime exposes.

A runtime loads one model directory and predicts on numpy arrays. It knows nothing of Ray,
HTTP or the store. Ragged features follow the wire convention: a pair of inputs
``<name>_values`` (1-D) and ``<name>_lengths`` (one entry per row).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from mpsserve.errors import ModelLoadError
from mpsserve.types import LENGTHS_SUFFIX, VALUES_SUFFIX, ragged_feature

SIGNATURE_FILE = "signature.json"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature; -1 marks a dynamic dimension."""

    name: str
    dtype: str  # numpy dtype name: float32, int64, ...
    shape: tuple[int, ...]
    ragged: bool = False  # one half of a <feature>_values / <feature>_lengths pair
    min_value: float | None = None  # inclusive bounds checked before the model sees ids
    max_value: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            dtype=np.dtype(data["dtype"]).name,
            shape=tuple(int(d) for d in data["shape"]),
            min_value=data.get("min_value"),
            max_value=data.get("max_value"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return {k: v for k, v in out.items() if v is not None and k != "ragged"}


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in the order the model takes and returns them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ragged_features: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Signature:
        """Mark ragged pairs by the naming convention and freeze."""
        names = {spec.name for spec in inputs}
        found = (ragged_feature(spec.name, names) for spec in inputs)
        ragged = tuple(feature for feature in found if feature is not None)
        members = {f + VALUES_SUFFIX for f in ragged} | {f + LENGTHS_SUFFIX for f in ragged}
        marked = tuple(replace(s, ragged=s.name in members) for s in inputs)
        return cls(inputs=marked, outputs=tuple(outputs), ragged_features=ragged)

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        inputs = [TensorSpec.from_dict(d) for d in data["inputs"]]
        outputs = [TensorSpec.from_dict(d) for d in data["outputs"]]
        return cls.build(inputs, outputs)

    def with_bounds_from(self, other: Signature) -> Signature:
        """Take value bounds declared in a sidecar file onto specs read from the model."""
        bounds = {s.name: (s.min_value, s.max_value) for s in other.inputs}
        inputs = [
            replace(s, min_value=bounds[s.name][0], max_value=bounds[s.name][1])
            if s.name in bounds
            else s
            for s in self.inputs
        ]
        return Signature.build(inputs, list(self.outputs))


def read_signature_file(model_dir: Path, required: bool) -> Signature | None:
    """Read ``signature.json`` beside the model; a broken file is a load error."""
    path = model_dir / SIGNATURE_FILE
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path} is missing; this runtime needs it")
        return None
    try:
        return Signature.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a valid signature file: {exc}") from exc


def write_signature_file(model_dir: Path, signature: Signature) -> None:
    (model_dir / SIGNATURE_FILE).write_text(json.dumps(signature.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class RuntimeOptions:
    """Per-process runtime settings, from the model's config."""

    signature_name: str = "serving_default"
    intra_op_threads: int = 0  # 0: the framework's default
    inter_op_threads: int = 0
    device: str = "auto"  # auto: the GPU when one is visible, else the CPU
    cpu_fallback: Literal["warn", "fail"] = "warn"  # ops without a GPU kernel: log or refuse
    custom_op_libraries: tuple[str, ...] = ()  # shared libraries loaded before the model
    cuda_graphs: bool = True  # PyTorch on a GPU: replay captured graphs (runtime/graphs.py)
    tf32: bool = False  # PyTorch on a GPU: TF32 matmuls (TensorFlow's default on Ampere+)


class ModelRuntime(ABC):
    """One loaded model in this process."""

    #: KServe v2 ``platform`` string for model metadata.
    platform: ClassVar[str]

    def __init__(self, signature: Signature, device: str) -> None:
        self.signature = signature
        self.device = device
        #: Ops of the model with no GPU kernel for their dtypes (``tf_kernels.CpuOp`` as
        #: dicts: op, node, function, dtypes, reason); empty where a runtime cannot tell.
        self.cpu_ops: list[dict[str, Any]] = []

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, options: RuntimeOptions) -> ModelRuntime:
        """Load the model in ``model_dir``; raise ModelLoadError on any failure."""

    @abstractmethod
    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on validated inputs (every signature input, right dtype)."""

    def warm_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Input shapes this runtime has prepared for (one request of each), so that the next
        version can be warmed with them before it takes traffic; none by default."""
        return []

    def graph_status(self) -> dict[str, Any] | None:
        """CUDA-graph replay's state (enabled, graphs captured), None where there is none."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free on GC
        """Release what the model holds; the object is not used afterwards."""
