"""GPU inventory and usage through NVML (pynvml): names, compute capability, memory, load.

NVML reads device state without creating a CUDA context, so it is safe to call before MPS is
set up. Without a driver the inventory is empty and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
#: MPS on Volta and later: 48 clients per GPU, per-client limits.
MPS_MIN_COMPUTE_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    compute_capability: tuple[int, int]
    memory_total_mb: int
    compute_mode: str

    @property
    def supports_mps(self) -> bool:
        return self.compute_capability >= MPS_MIN_COMPUTE_CAPABILITY


@dataclass(frozen=True)
class Inventory:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    error: str | None = None  # why NVML could not be read, when it could not


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read(nvml: object, index: int) -> GpuInfo:
    n = nvml  # pynvml's functions, typed loosely
    handle = n.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
    major, minor = n.nvmlDeviceGetCudaComputeCapability(handle)  # type: ignore[attr-defined]
    memory = n.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
    mode = n.nvmlDeviceGetComputeMode(handle)  # type: ignore[attr-defined]
    return GpuInfo(
        index=index,
        name=_text(n.nvmlDeviceGetName(handle)),  # type: ignore[attr-defined]
        uuid=_text(n.nvmlDeviceGetUUID(handle)),  # type: ignore[attr-defined]
        compute_capability=(int(major), int(minor)),
        memory_total_mb=int(memory.total) // 2**20,
        compute_mode=COMPUTE_MODES.get(int(mode), str(mode)),
    )


def inventory() -> Inventory:
    """Every GPU NVML sees on this node; empty (with the reason) when there is no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver not loaded
        return Inventory(error=f"NVML unavailable: {exc}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        gpus = [_read(pynvml, i) for i in range(count)]
        return Inventory(gpus=gpus, driver_version=_text(pynvml.nvmlSystemGetDriverVersion()))
    except pynvml.NVMLError as exc:
        return Inventory(error=f"NVML error: {exc}")
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's load right now, for the node's metrics sampler."""

    index: int
    utilization_ratio: float  # share of the last sample period a kernel ran, 0..1
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None  # None where the board does not report power


def _power_watts(nvml: Any, handle: object) -> float | None:
    try:
        return float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0  # milliwatts
    except nvml.NVMLError:  # NVMLError_NotSupported on some boards
        return None


def _usage(nvml: Any, index: int) -> GpuUsage:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuUsage(
        index=index,
        utilization_ratio=float(rates.gpu) / 100.0,
        memory_used_bytes=int(memory.used),
        memory_total_bytes=int(memory.total),
        power_watts=_power_watts(nvml, handle),
    )


@dataclass(frozen=True)
class Usage:
    gpus: list[GpuUsage] = field(default_factory=list)
    error: str | None = None  # why NVML could not be read, when it could not


def usage() -> Usage:
    """Every GPU's utilisation, memory and power; empty (with the reason) without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver not loaded
        return Usage(error=f"NVML unavailable: {exc}")
    try:
        return Usage(gpus=[_usage(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())])
    except pynvml.NVMLError as exc:
        return Usage(error=f"NVML error: {exc}")
    finally:
        pynvml.nvmlShutdown()
