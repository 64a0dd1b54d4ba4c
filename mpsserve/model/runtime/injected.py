"""Faults injected on purpose, to test what the service does with them (never in production).

Off unless ``MPSSERVE_INJECT_FAULT_FILE`` names a file (settings: ``inject_fault_file``). When
that file appears, the first replica to claim it (an atomic rename: exactly one replica takes
each trigger) runs the action written in it during its next request, inside the request's
inference, so the fault takes the path a real one takes:

* ``fault assert`` (or ``fault``): a device-side assert (an index kernel reading out of
  bounds). Sticky: the process's CUDA context is unusable afterwards; under MPS on Volta and
  later the fault reaches every client of that GPU's server.
* ``fault address``: a kernel storing to an unmapped address (an illegal memory access),
  compiled from a few lines of PTX by the driver; same consequences.
* ``alloc <MB>``: allocate that much device memory for the request, then free it: over the
  replica's MPS pinned-memory limit this is the out-of-memory error a too-large request gets.

Without CUDA (a CPU replica, or TensorFlow, which mpsserve cannot drive kernel by kernel here)
the same actions raise the error text CUDA would give, marked as simulated: the CPU tests run
the service's side of the path; the GPU host runs the real one.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from mpsserve.errors import InferenceError
from mpsserve.model.runtime.base import ModelRuntime
from mpsserve.settings import settings

logger = logging.getLogger(__name__)

SIMULATED = "simulated by MPSSERVE_INJECT_FAULT_FILE on a replica without CUDA"
#: A kernel that stores to the address it is given (PTX, JIT-compiled by the driver for any GPU).
_PTX = b"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry poke(.param .u64 where) {
  .reg .b64 %rd<2>;
  ld.param.u64 %rd1, [where];
  st.global.u32 [%rd1], 7;
  ret;
}
"""
_UNMAPPED = 0x10  # the first page: never a device allocation


def claim() -> str | None:
    """The action of a trigger this process took, or None (no trigger, or another took it)."""
    trigger = settings().inject_fault_file
    if not trigger:
        return None
    taken = Path(f"{trigger}.taken-by-{os.getpid()}")
    try:
        os.rename(trigger, taken)
    except OSError:
        return None
    action = taken.read_text().strip() or "fault"
    logger.warning("injected fault: this replica took %s: %r", trigger, action)
    return action


def strike(action: str, runtime: ModelRuntime) -> None:
    """Run ``action`` (module docstring) on the runtime's device; raises InferenceError as
    the runtime's own inference would."""
    words = action.split()
    on_cuda = runtime.platform == "pytorch_export" and runtime.device == "gpu"
    if words[0] == "fault":
        kind = words[1] if len(words) > 1 else "assert"
        if kind not in ("assert", "address"):
            raise InferenceError(f"injected action {action!r}: fault kind is assert or address")
        _fault_cuda(kind) if on_cuda else _simulate(kind)
    elif words[0] == "alloc" and len(words) == 2 and words[1].isdigit():
        _alloc_cuda(int(words[1])) if on_cuda else _simulate_alloc(int(words[1]))
    else:
        raise InferenceError(f"unknown injected action {action!r}")


def _simulate(kind: str) -> None:
    what = "device-side assert triggered" if kind == "assert" else "an illegal memory access"
    raise InferenceError(f"CUDA error: {what} was encountered ({SIMULATED})")


def _simulate_alloc(mb: int) -> None:
    raise InferenceError(f"CUDA out of memory: tried to allocate {mb} MiB ({SIMULATED})")


def _fault_cuda(kind: str) -> None:
    import torch

    try:
        if kind == "assert":
            small = torch.zeros(4, device="cuda")
            small[torch.tensor([1 << 30], device="cuda")] += 1  # index out of bounds
        else:
            torch.zeros(1, device="cuda")  # torch's context is current on this thread
            _poke_unmapped()
        torch.cuda.synchronize()
    except RuntimeError as exc:
        raise InferenceError(f"PyTorch failed: {exc}") from exc
    raise InferenceError(f"injected fault {kind!r} did not fault the device")


def _poke_unmapped() -> None:
    """Launch the PTX kernel on the current context (torch's), storing to an unmapped page."""
    cuda = ctypes.CDLL("libcuda.so.1")
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    _check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(_PTX)), "load PTX")
    _check(cuda.cuModuleGetFunction(ctypes.byref(function), module, b"poke"), "find kernel")
    where = ctypes.c_uint64(_UNMAPPED)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(where), ctypes.c_void_p))
    launched = cuda.cuLaunchKernel(function, 1, 1, 1, 1, 1, 1, 0, None, params, None)
    _check(launched, "launch")


def _check(result: int, step: str) -> None:
    if result != 0:
        raise InferenceError(f"injected fault: cannot {step} (CUresult {result})")


def _alloc_cuda(mb: int) -> None:
    import torch

    try:
        held = torch.empty(mb << 20, dtype=torch.uint8, device="cuda")
        held.fill_(1)
        torch.cuda.synchronize()
        del held
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        raise InferenceError(f"PyTorch failed: {exc}") from exc
    finally:
        torch.cuda.empty_cache()
    logger.warning("injected alloc of %d MB succeeded", mb)
