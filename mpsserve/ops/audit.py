"""CPU-fallback audit of a TensorFlow serving signature (``mpsserve audit``): the report.

The analysis itself (which ops have no GPU kernel, and which nodes a real request placed on
the CPU) lives in the model layer, ``mpsserve.model.runtime.tf_kernels``, since every model load
runs it; this module loads a model as a replica does and renders what it found. Placement is
informational: TensorFlow keeps int32 shape arithmetic on the host by design, so that list is
not counted as a fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpsserve.model.features import synthetic_inputs
from mpsserve.model.runtime.base import RuntimeOptions
from mpsserve.model.runtime.tensorflow import TensorFlowRuntime
from mpsserve.model.runtime.tf_kernels import (
    CPU_ONLY_BUILD_NOTE,
    PLUMBING_OPS,
    SIGNATURE_GRAPH,
    CpuOp,
    PlacedOp,
    gpu_kernels_registered,
    placed_on_cpu,
    tf,
)

__all__ = [
    "CPU_ONLY_BUILD_NOTE",
    "NO_GPU_NOTE",
    "PLUMBING_OPS",
    "SIGNATURE_GRAPH",
    "AuditReport",
    "CpuOp",
    "PlacedOp",
    "audit_saved_model",
    "gpu_kernels_registered",
    "placed_on_cpu",
]

NO_GPU_NOTE = "no GPU visible: placement not checked"


@dataclass
class AuditReport:
    """What the audit found for one signature of one model."""

    model_dir: str
    signature: str
    cpu_ops: list[CpuOp]
    placed_on_cpu: list[PlacedOp] | None = None  # None: placement not checked
    placement_note: str = NO_GPU_NOTE
    gpu_kernels_known: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def falls_back(self) -> bool:
        return bool(self.cpu_ops)

    def to_dict(self) -> dict[str, Any]:
        placed = self.placed_on_cpu
        return {
            "model_dir": self.model_dir,
            "signature": self.signature,
            "falls_back": self.falls_back,
            "gpu_kernels_known": self.gpu_kernels_known,
            "cpu_ops": [op.to_dict() for op in self.cpu_ops],
            "placed_on_cpu": None if placed is None else [p.to_dict() for p in placed],
            "placement_note": self.placement_note,
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        lines = [f"op audit of {self.model_dir} (signature {self.signature!r})", *self.notes]
        if self.cpu_ops:
            lines.append(f"{len(self.cpu_ops)} op(s) without a GPU kernel (they run on the CPU):")
            rows = [
                (o.op, o.node, o.function, _types_text(o.dtypes), o.reason) for o in self.cpu_ops
            ]
            lines += _table(("op", "node", "function", "dtypes", "why"), rows)
        elif self.gpu_kernels_known:
            lines.append("every op has a GPU kernel for its dtypes")
        lines.append(f"placement: {self.placement_note}")
        if self.placed_on_cpu:
            placed = [(p.op, p.node, p.device, _types_text(p.dtypes)) for p in self.placed_on_cpu]
            lines += _table(("op", "node", "device", "dtypes"), placed)
        return "\n".join(lines)


def _types_text(dtypes: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dtypes.items()) or "-"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    grid = [header, *rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(header))]
    cells = [[c.ljust(w) for c, w in zip(row, widths, strict=True)] for row in grid]
    return ["  " + "  ".join(row).rstrip() for row in cells]


def _placement(runtime: TensorFlowRuntime) -> tuple[list[PlacedOp] | None, str]:
    if runtime.device != "gpu":
        return None, NO_GPU_NOTE
    try:
        placed = placed_on_cpu(runtime.function, synthetic_inputs(runtime.signature, rows=8))
    except (tf.errors.OpError, ValueError, TypeError) as exc:
        return None, f"not checked: the synthetic request failed: {exc}"
    if not placed:
        return placed, "every node of a synthetic request ran on the GPU"
    return placed, (
        f"{len(placed)} node(s) of a synthetic request ran on the CPU (informational: "
        "TensorFlow keeps int32 shape arithmetic on the host by design)"
    )


def audit_saved_model(
    model_dir: Path | str,
    signature_name: str = "serving_default",
    custom_op_libraries: Sequence[str] = (),
    check_placement: bool = True,
) -> AuditReport:
    """Load the model as a replica does (custom op libraries first) and audit its signature.

    Raises ModelLoadError when a library or the model does not load.
    """
    options = RuntimeOptions(
        signature_name=signature_name, custom_op_libraries=tuple(custom_op_libraries)
    )
    runtime = TensorFlowRuntime.open(Path(model_dir), options)
    try:
        cpu_ops = [CpuOp(**op) for op in runtime.cpu_ops]
        report = AuditReport(str(model_dir), signature_name, cpu_ops)
        if not gpu_kernels_registered():
            report.gpu_kernels_known = False
            report.notes.append(CPU_ONLY_BUILD_NOTE)
        if check_placement:
            report.placed_on_cpu, report.placement_note = _placement(runtime)
        else:
            report.placement_note = "not checked (turned off)"
        return report
    finally:
        runtime.close()
