"""TFRecord framing without TensorFlow, checked against TensorFlow's own reader and writer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mpsserve.errors import ModelLoadError
from mpsserve.protocol.tfrecord import encode_record, masked_crc, read_records, write_records

RECORDS = [b"", b"one", bytes(range(256)) * 40]


def test_masked_crc_is_tensorflows() -> None:
    # CRC-32C("123456789") is 0xE3069283 (RFC 3720); masked: rotr 15, plus 0xA282EAD8.
    crc = 0xE3069283
    assert masked_crc(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert write_records(path, RECORDS) == 3
    assert list(read_records(path)) == RECORDS
    assert list(read_records(tmp_path / "f", limit=3)) == RECORDS


def test_tensorflow_reads_ours_and_we_read_tensorflows(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write_records(ours, RECORDS)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == RECORDS
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for record in RECORDS:
            writer.write(record)
    assert list(read_records(theirs)) == RECORDS


def _corrupt(tmp_path: Path, offset: int, value: bytes | None = None, cut: int = 0) -> Path:
    data = bytearray(b"".join(encode_record(r) for r in RECORDS))
    if value is not None:
        data[offset : offset + len(value)] = value
    path = tmp_path / "bad"
    path.write_bytes(bytes(data[: len(data) - cut] if cut else data))
    return path


SECOND = len(encode_record(RECORDS[0]))  # where record 1 starts


@pytest.mark.parametrize(
    ("offset", "value", "cut", "message"),
    [
        (SECOND + 12, b"X", 0, "record 1 (at byte 16) has corrupt data: its 3 bytes fail"),
        (SECOND + 8, b"\0", 0, "record 1 (at byte 16) has a corrupt header"),
        (SECOND, struct.pack("<Q", 2**40), 0, "record 1 (at byte 16) has a corrupt header"),
        (0, None, 5, "record 2 (at byte 35) is cut short or corrupt: it claims 10240 bytes"),
        (0, None, 10250, "record 2 (at byte 35) is cut short: 6 bytes of its 12-byte header"),
    ],
    ids=["data-crc", "length-crc", "length-bits", "data-cut", "header-cut"],
)
def test_corruption_is_named_by_file_and_record(
    tmp_path: Path, offset: int, value: bytes | None, cut: int, message: str
) -> None:
    path = _corrupt(tmp_path, offset, value, cut)
    with pytest.raises(ModelLoadError) as info:
        list(read_records(path))
    assert str(path) in info.value.message and message in info.value.message


def test_a_length_past_the_end_is_refused_before_reading(tmp_path: Path) -> None:
    """A length whose CRC is right but that the file cannot hold: no allocation for it."""
    length = struct.pack("<Q", 2**40)
    path = tmp_path / "long"
    path.write_bytes(length + struct.pack("<I", masked_crc(length)) + b"abc")
    with pytest.raises(
        ModelLoadError,
        match=r"record 0 \(at byte 0\) is cut short or corrupt: it claims 1099511627776",
    ):
        list(read_records(path))


def test_more_records_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "many"
    write_records(path, [b"x"] * 4)
    assert len(list(read_records(path, limit=4))) == 4
    with pytest.raises(ModelLoadError, match="holds more than 3 records"):
        list(read_records(path, limit=3))
