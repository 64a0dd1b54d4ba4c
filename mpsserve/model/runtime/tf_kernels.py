"""The TensorFlow kernel analysis: which ops of a graph have no GPU kernel (model layer).

A model served on a GPU still runs every op without a GPU kernel on the CPU, with copies
across PCIe around it; under MPS, with many replicas per card, that silently turns a GPU
deployment into a CPU-bound one. The runtime runs the static check on every load (its
``cpu_fallback`` policy); ``mpsserve.ops.audit`` (ops) builds its report on the same functions.

- static (any host): every node of the signature's graph and of the functions it calls,
  recursively (StatefulPartitionedCall bodies, while and if branches), against the kernels
  registered in this process. A node falls back when no kernel for device type ``GPU`` (or
  ``DEFAULT``, which serves every device) accepts its type attributes, when its op is not
  registered at all, or when the graph pins it to the CPU. This needs a TensorFlow build with
  CUDA kernels: the Linux x86-64 wheel registers them with or without a GPU present; a
  CPU-only build registers none, and then nothing can be said (``gpu_kernels_registered``).
- placement (a host with a visible GPU): one synthetic request with run metadata on, and the
  nodes TensorFlow's placer put on the CPU.

TensorFlow is imported here, once, with the service's log level (``TF_CPP_MIN_LOG_LEVEL``,
read at import: TensorFlow's C++ INFO lines bury the service's own output; a user's value
wins); ``mpsserve.model.runtime.tensorflow`` takes ``tf`` from this module. On a host with no
GPU for this process, the import's CUDA probe is made quiet (``_quiet_cuda_probe``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.model.runtime.stderr_filter import dropping_lines

#: Lines TensorFlow's CUDA probe writes when the process has no GPU: they say only that, and
#: the failed cuInit one, logged as an ERROR, sends operators of CPU services hunting.
CUDA_PROBE_NOISE = (
    "failed call to cuInit",
    "Could not find cuda drivers on your machine",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "All log messages before absl::InitializeLog() is called",  # the header of those lines
)
#: A C++ log line's severity letter (absl: I0000 00:00:... file.cc:N] text), by level.
_SEVERITY = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 hides the letters before its own


def _no_gpu_for_this_process() -> bool:
    """True where CUDA cannot find a GPU: hidden (CUDA_VISIBLE_DEVICES empty or -1) or no
    NVIDIA device node (/dev/nvidiactl; /dev/dxg is WSL's). Cheap: no CUDA or NVML call."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return True
    return not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/dxg"))


def _quiet_cuda_probe(line: str) -> bool:
    """The lines to drop while TensorFlow loads and probes for GPUs on a host without one.

    Why filter rather than TF_CPP_MIN_LOG_LEVEL=3: level 3 would hide every ERROR TensorFlow
    logs for the life of the process (a model that fails to load says why there), and its
    INFO lines before absl's logging starts ignore the level anyway. Why only without a GPU:
    on a GPU host a failed cuInit or a missing driver library is a real fault and must show,
    so there the import is not touched. Lines below the configured level (TensorFlow's own
    promise, which it breaks before absl starts) and the probe's lines go; the rest pass."""
    if any(noise in line for noise in CUDA_PROBE_NOISE):
        return True
    severity = _SEVERITY.match(line)
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    hidden = _LEVELS[: int(level)] if level.isdigit() else ""
    return severity is not None and severity.group(1) in hidden


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
if _no_gpu_for_this_process():
    with dropping_lines(_quiet_cuda_probe):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the probe (cuInit) runs now, in the window
else:
    import tensorflow as tf

#: Stands for the signature's own graph in ``CpuOp.function``.
SIGNATURE_GRAPH = "(signature)"
#: Kernel device types that serve a GPU: DEFAULT kernels (function calls, control flow,
#: variables, identity) are registered once for every device.
GPU_DEVICE_TYPES = ("GPU", "DEFAULT")
#: Executor plumbing that sits on every device's partition; not model work.
PLUMBING_OPS = frozenset(
    {"_Arg", "_Retval", "_Send", "_Recv", "_HostSend", "_HostRecv", "NoOp", "_DeviceArg"}
)

CPU_ONLY_BUILD_NOTE = (
    "this TensorFlow build registers no GPU kernels (a CPU-only build): the static check "
    "cannot tell which ops would fall back; run the audit with a CUDA build of TensorFlow"
)


@dataclass(frozen=True)
class CpuOp:
    """A node with no usable GPU kernel, where it is, and why."""

    op: str
    node: str
    function: str  # the FunctionDef holding the node, or SIGNATURE_GRAPH
    dtypes: dict[str, str]  # the node's type attributes (or fixed input types), by name
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlacedOp:
    """A node TensorFlow's placer put on the CPU during a real request."""

    op: str
    node: str
    device: str
    dtypes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the static check ------------------------------------------------------------------------


def gpu_kernels_registered() -> bool:
    """Whether this TensorFlow build registers GPU kernels at all (a CUDA build does, GPU or
    not); without them the static check has nothing to compare against."""
    from tensorflow.python.framework import kernels

    matmul = kernels.get_registered_kernels_for_op("MatMul").kernel
    return any(k.device_type == "GPU" for k in matmul)


class _Registry:
    """Op definitions and GPU kernels, looked up once per op type during one audit."""

    def __init__(self) -> None:
        from tensorflow.python.framework import kernels, op_def_registry

        self._kernels: Callable[[str], Any] = kernels.get_registered_kernels_for_op
        self._op_def: Callable[[str], Any] = op_def_registry.get
        self._cache: dict[str, tuple[Any, list[Any]]] = {}

    def lookup(self, op: str) -> tuple[Any, list[Any]]:
        """(OpDef or None, the kernels usable on a GPU)."""
        if op not in self._cache:
            op_def = self._op_def(op)
            gpu = [] if op_def is None else self._gpu_kernels(op)
            self._cache[op] = (op_def, gpu)
        return self._cache[op]

    def _gpu_kernels(self, op: str) -> list[Any]:
        return [k for k in self._kernels(op).kernel if k.device_type in GPU_DEVICE_TYPES]


def _scalars(value: Any) -> list[Any]:
    """The values an AttrValue holds, as a flat list (a type, a string, a list of types...)."""
    kind = value.WhichOneof("value")
    if kind == "list":
        lst = value.list
        return list(lst.type) or list(lst.s) or list(lst.i) or list(lst.b) or list(lst.f)
    return [getattr(value, kind)] if kind in ("type", "s", "i", "b", "f") else []


def _attrs(node: Any, op_def: Any) -> dict[str, Any]:
    """The node's attributes, with the op's defaults for those a FunctionDef left out."""
    values = {a.name: a.default_value for a in op_def.attr if a.HasField("default_value")}
    values.update(node.attr)
    return values


def _rejects(kernel: Any, attrs: Mapping[str, Any], label: bytes) -> list[str]:
    """The attributes whose values this kernel does not take (empty: the kernel fits)."""
    if kernel.label.encode() != label:
        return ["_kernel"]
    bad = []
    for constraint in kernel.constraint:
        allowed = _scalars(constraint.allowed_values)
        value = attrs.get(constraint.name)
        if value is None or not set(_scalars(value)) <= set(allowed):
            bad.append(constraint.name)
    return bad


def _dtype_name(enum: int) -> str:
    return str(tf.dtypes.as_dtype(enum).name)


def _type_attrs(node: Any, op_def: Any) -> dict[str, str]:
    """Type attributes as names (``T=string``); for ops with fixed types, their inputs'."""
    out = {}
    for name, value in _attrs(node, op_def).items():
        kind = value.WhichOneof("value")
        if kind == "type":
            out[name] = _dtype_name(value.type)
        elif kind == "list" and value.list.type:
            out[name] = "[" + ",".join(_dtype_name(t) for t in value.list.type) + "]"
    if not out:
        out = {a.name: _dtype_name(a.type) for a in op_def.input_arg if a.type}
    return out


def _why_not_gpu(node: Any, op_def: Any, gpu_kernels: list[Any]) -> str | None:
    if op_def is None:
        return "op not registered in this process (is its custom op library loaded?)"
    if not gpu_kernels:
        return f"no GPU kernel registered for {node.op}"
    attrs = _attrs(node, op_def)
    label = _scalars(attrs["_kernel"])[0] if "_kernel" in attrs else b""
    rejected = [_rejects(k, attrs, label) for k in gpu_kernels]
    if any(not bad for bad in rejected):
        return _pinned(node)
    names = sorted({n for bad in rejected for n in bad if n != "_kernel"})
    if not names:
        return f"no GPU kernel with label {label.decode()!r}"
    taken = {n: _allowed_types(gpu_kernels, n) for n in names}
    got = _type_attrs(node, op_def)
    return "; ".join(
        f"no GPU kernel for {n}={got.get(n, '?')} (GPU kernels take {', '.join(taken[n])})"
        for n in names
    )


def _allowed_types(kernels: Iterable[Any], name: str) -> list[str]:
    types = {
        t
        for k in kernels
        for c in k.constraint
        if c.name == name
        for t in c.allowed_values.list.type
    }
    return sorted(_dtype_name(t) for t in types)


def _pinned(node: Any) -> str | None:
    if _device_type(node.device) == "CPU":
        return f"pinned to the CPU by the graph (device {node.device!r})"
    return None


def _device_type(device: str) -> str:
    if not device:
        return ""
    try:
        return str(tf.DeviceSpec.from_string(device).device_type or "").upper()
    except ValueError:  # not a device name TensorFlow parses: judge by its text
        return "CPU" if "CPU" in device.upper() else ""


def _calls(node: Any, library: Mapping[str, Any]) -> Iterator[str]:
    """Library functions a node calls: as its op, or through func attributes (f, body, ...)."""
    if node.op in library:
        yield node.op
    for value in node.attr.values():
        names = [value.func.name] if value.HasField("func") else []
        names += [f.name for f in value.list.func] if value.HasField("list") else []
        yield from (n for n in names if n in library)


def audit_graph_def(graph_def: Any) -> list[CpuOp]:
    """Nodes of ``graph_def`` and of every library function reachable from it that have no
    GPU kernel for their types, in the order met (the graph first, then callees)."""
    registry = _Registry()
    library = {f.signature.name: f for f in graph_def.library.function}
    pending: list[tuple[str, Any]] = [(SIGNATURE_GRAPH, graph_def.node)]
    seen: set[str] = set()
    found: list[CpuOp] = []
    while pending:
        where, nodes = pending.pop(0)
        for node in nodes:
            for name in _calls(node, library):
                if name not in seen:
                    seen.add(name)
                    pending.append((name, library[name].node_def))
            if node.op in library:
                continue
            op_def, gpu_kernels = registry.lookup(node.op)
            reason = _why_not_gpu(node, op_def, gpu_kernels)
            if reason is not None:
                dtypes = {} if op_def is None else _type_attrs(node, op_def)
                found.append(CpuOp(node.op, node.name, where, dtypes, reason))
    return found


def audit_function(fn: Any) -> list[CpuOp]:
    """The static check of a concrete function (a loaded SavedModel signature)."""
    return audit_graph_def(fn.graph.as_graph_def())


# -- placement on a real request -------------------------------------------------------------


def placed_on_cpu(fn: Any, inputs: Mapping[str, np.ndarray]) -> list[PlacedOp]:
    """Run ``fn`` once with run metadata on and list the model's nodes placed on the CPU.

    Reads the partition graphs TensorFlow exports for the function call: each node there
    carries the device the placer chose, after soft placement and colocation, which is
    what runs. Every node is on the CPU when no GPU is visible.
    """
    from tensorflow.python.eager import context

    ctx = context.context()
    ctx.enable_run_metadata()
    try:
        fn(**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
        metadata = ctx.export_run_metadata()
    finally:
        ctx.disable_run_metadata()
    registry = _Registry()
    return [
        PlacedOp(node.op, node.name, node.device, _placed_types(node, registry))
        for graph in metadata.function_graphs
        for partition in graph.partition_graphs
        for node in partition.node
        if _device_type(node.device) == "CPU" and node.op not in PLUMBING_OPS
    ]


def _placed_types(node: Any, registry: _Registry) -> dict[str, str]:
    op_def, _ = registry.lookup(node.op)
    return {} if op_def is None else _type_attrs(node, op_def)
