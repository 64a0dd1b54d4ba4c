"""GPU tier: marked ``gpu``, skipped cleanly where no NVIDIA GPU is visible."""

from __future__ import annotations

import pytest


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="no NVIDIA GPU visible (NVML)") if gpu_count() == 0 else None
    for item in items:
        if "tests/gpu" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)
