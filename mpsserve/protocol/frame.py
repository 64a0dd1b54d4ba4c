"""The ingress-to-replica wire format: one length-prefixed frame per request and response.

A connection starts with the handshake of ``protocol.handshake``; then each frame is a 12-byte
prefix (magic ``MPS1``, header length, body length, little-endian; each bounded), a JSON header
and a body holding the raw bytes of every tensor the header lists, in order, in KServe v2
binary layout (``protocol.tensors``, so numeric tensors are views on the body at either end: no
copy, no pickling). The header of a request names the operation (``infer``, ``metadata``,
``ready``, ``stats``) and its arguments; a response header is ``{"ok": true, ...}`` or
``{"ok": false, "status": <HTTP status>, "message": ..., "retry": ...}``, which the ingress
raises again as the error class of that status, so a replica's error reaches the client with
its own status.

Pure functions; the sockets live in ``ingress.replica_server`` and ``ingress.router``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from mpsserve import errors
from mpsserve.protocol.tensors import numpy_to_datatype, tensor_bytes, tensor_from_bytes

PREFIX = struct.Struct("<4sII")
MAGIC = b"MPS1"
Buffer = bytes | bytearray | memoryview


class FrameError(ConnectionError):
    """The peer sent something that is not a frame: drop the connection."""


def encode(
    header: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None
) -> list[Buffer]:
    """A frame as buffers for ``writelines`` (the tensors' bytes are not copied)."""
    specs: list[list[Any]] = []
    chunks: list[Buffer] = []
    for name, arr in (tensors or {}).items():
        datatype = numpy_to_datatype(arr.dtype)
        raw = tensor_bytes(name, arr, datatype)
        specs.append([name, datatype, list(arr.shape), len(raw)])
        chunks.append(raw)
    doc = dict(header)
    if specs:
        doc["tensors"] = specs
    head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    size = sum(len(c) for c in chunks)
    return [PREFIX.pack(MAGIC, len(head), size), head, *chunks]


def read_prefix(prefix: bytes, max_header: int, max_body: int) -> tuple[int, int]:
    """(header length, body length) from a frame's first ``PREFIX.size`` bytes. Sizes over
    the limits are refused here, before anything is allocated for them."""
    if len(prefix) != PREFIX.size:
        raise FrameError(f"the connection ended inside a frame ({len(prefix)} prefix bytes)")
    magic, head, body = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"not an mpsserve frame (magic {magic!r})")
    if head > max_header:
        raise FrameError(f"frame header of {head} bytes is over the {max_header}-byte limit")
    if body > max_body:
        raise FrameError(f"frame body of {body} bytes is over the {max_body}-byte limit")
    return head, body


def body_size(parts: list[Buffer]) -> int:
    """Bytes of an encoded frame's body (``encode``'s parts after the prefix and header)."""
    return sum(memoryview(p).nbytes for p in parts[2:])


def decode_header(head: Buffer) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(head))
    except ValueError as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise FrameError("frame header is not a JSON object")
    return doc


def tensors(header: Mapping[str, Any], body: Buffer) -> dict[str, np.ndarray]:
    """The header's tensors as views on ``body`` (writable when ``body`` is a bytearray)."""
    view = memoryview(body)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, datatype, shape, size in header.get("tensors", ()):
        out[name] = tensor_from_bytes(name, datatype, shape, view[offset : offset + size], "data")
        offset += size
    if offset != len(view):
        raise FrameError(f"frame body is {len(view)} bytes; its tensors take {offset}")
    return out


def error_header(exc: BaseException) -> dict[str, Any]:
    """A failed response: the error's HTTP status (``errors.to_status``), its client-safe
    message, and whether another replica may take the request."""
    status, _, message = errors.to_status(exc)
    retry = bool(getattr(exc, "retry_elsewhere", False))
    return {"ok": False, "message": message, "status": status, "retry": retry}


def raise_for_error(header: Mapping[str, Any]) -> None:
    """Raise the replica's error, mapped back from its status, if the response is one."""
    if header.get("ok"):
        return
    message = str(header.get("message", "the replica failed"))
    status = header.get("status")
    raise errors.from_status(
        status if isinstance(status, int) else 500, message, bool(header.get("retry"))
    )
