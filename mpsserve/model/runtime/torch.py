"""PyTorch runtime: a ``torch.export`` program (``model.pt2``) plus ``signature.json``.

The exported program takes the signature's inputs positionally, in the file's order, and
returns one tensor or a tuple in the order of the signature's outputs.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpsserve.errors import InferenceError, ModelLoadError
from mpsserve.model.runtime.base import ModelRuntime, RuntimeOptions, Signature, read_signature_file
from mpsserve.model.runtime.graphs import GraphRunner, gate

MODEL_FILE = "model.pt2"


def _device(options: RuntimeOptions) -> torch.device:
    if options.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # torch refuses to wrap read-only buffers (zero-copy decoded requests): copy those once.
    host = torch.from_numpy(array if array.flags.writeable else array.copy())
    return host.to(device, non_blocking=True) if device.type != "cpu" else host


class TorchRuntime(ModelRuntime):
    platform = "pytorch_export"

    def __init__(
        self, module: Any, signature: Signature, device: torch.device, cuda_graphs: bool = True
    ) -> None:
        super().__init__(signature, device.type.replace("cuda", "gpu"))
        self._module = module
        self._torch_device = device
        self.graphs = GraphRunner(module, signature, device) if cuda_graphs else None

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions) -> TorchRuntime:
        if options.custom_op_libraries:
            raise ModelLoadError(
                "custom_op_libraries is for the tensorflow runtime; a torch model got "
                f"{list(options.custom_op_libraries)}"
            )
        signature = read_signature_file(model_dir, required=True)
        assert signature is not None
        if options.intra_op_threads:
            torch.set_num_threads(options.intra_op_threads)
        device = _device(options)
        if device.type == "cuda":  # per process; a replica serves one model
            torch.backends.cuda.matmul.allow_tf32 = options.tf32
            torch.backends.cudnn.allow_tf32 = options.tf32
        try:
            program = torch.export.load(str(model_dir / MODEL_FILE))
            if device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            module = program.module()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {model_dir / MODEL_FILE}: {exc}") from exc
        return cls(module, signature, device, cuda_graphs=options.cuda_graphs)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.graphs is not None and self.graphs.enabled:
            replayed = self.graphs.predict(inputs, self.predict_eager)
            if replayed is not None:
                return replayed
        return self.predict_eager(inputs)

    def predict_eager(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.signature.outputs]
        try:  # every step touches CUDA: a dead context (an MPS server gone) fails any of them
            args = [_to_tensor(inputs[s.name], self._torch_device) for s in self.signature.inputs]
            with gate().work(), torch.inference_mode():
                result = self._module(*args)
            tensors = result if isinstance(result, (tuple, list)) else (result,)
            return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        except RuntimeError as exc:  # torch.AcceleratorError (CUDA) is one
            raise InferenceError(f"PyTorch failed: {exc}") from exc

    def warm_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        return self.graphs.shapes() if self.graphs is not None and self.graphs.enabled else []

    def graph_status(self) -> dict[str, Any] | None:
        return self.graphs.status() if self.graphs is not None else None

    def close(self) -> None:
        """Free the weights now: an exported module holds reference cycles, so without a
        collection its GPU memory stays allocated until Python's GC happens to run (measured:
        one version's weights kept per swap, tests/gpu/results/2026-11-26-h100-swaps.md)."""
        self._module = None
        self.graphs = None
        gc.collect()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()
