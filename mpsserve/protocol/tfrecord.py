"""TFRecord files without TensorFlow: the framing TF Serving's warm-up files use.

A record is ``uint64 length``, ``uint32 masked CRC-32C of those 8 bytes``, ``length`` bytes of
data, ``uint32 masked CRC-32C of the data``, all little-endian (TensorFlow's
``core/lib/io/record_writer.cc``). Both CRCs are checked; a file that is cut short, claims a
record longer than what is left of it, or fails a CRC raises ``ModelLoadError`` naming the file,
the record (from 0) and its byte offset. Only uncompressed files are read (TF Serving's warm-up
files are).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from mpsserve.errors import ModelLoadError

_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes | memoryview) -> int:
    """TensorFlow's masked CRC-32C (``crc32c::Mask``): rotated right by 15 bits, plus a
    constant, so a CRC stored inside CRC'd data does not check itself. google_crc32c is
    imported here, on the first warm-up file read: a process that never reads one (the GPU
    host's offline bundle has no google_crc32c) does not need it."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The records of ``path`` in order; ModelLoadError on a corrupt one, and on record number
    ``limit`` (the file holds more records than the reader takes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        index = 0
        while file.tell() < size:
            if limit is not None and index >= limit:
                raise ModelLoadError(f"{path}: holds more than {limit} records, the most read")
            yield _read_one(file, path, index, size)
            index += 1


def _read_one(file: BinaryIO, path: Path, index: int, size: int) -> bytes:
    offset = file.tell()

    def corrupt(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: record {index} (at byte {offset}) {problem}")

    header = file.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise corrupt(f"is cut short: {len(header)} bytes of its 12-byte header")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc(header[:8]) != length_crc:
        raise corrupt("has a corrupt header: its length fails its CRC")
    left = size - file.tell() - _CRC.size
    if length > left:  # never allocate for a length the file cannot hold
        raise corrupt(
            f"is cut short or corrupt: it claims {length} bytes of data; the file has "
            f"{max(left, 0)} left"
        )
    data = file.read(length)
    footer = file.read(_CRC.size)
    if len(data) < length or len(footer) < _CRC.size:
        raise corrupt("is cut short")
    if masked_crc(data) != _CRC.unpack(footer)[0]:
        raise corrupt(f"has corrupt data: its {length} bytes fail their CRC")
    return data


def encode_record(data: bytes) -> bytes:
    """One record, framed as TensorFlow's writer frames it."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, _CRC.pack(masked_crc(length)), data, _CRC.pack(masked_crc(data))))


def write_records(path: Path, records: Iterable[bytes]) -> int:
    """Write ``records`` to ``path`` (replacing it); returns how many were written."""
    count = 0
    with open(path, "wb") as file:
        for record in records:
            file.write(encode_record(record))
            count += 1
    return count
