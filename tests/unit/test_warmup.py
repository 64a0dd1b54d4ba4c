"""Warm-up from a version's TF Serving warm-up file: a real PyTorch demo model on disk, a real
``Servable``, files written as ``mpsserve demo-model --warmup-requests`` writes them (and as
TensorFlow reads them, tests/unit/test_tfrecord.py); no Ray."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tensorflow_serving.apis import prediction_log_pb2

from mpsserve.config import ModelConfig
from mpsserve.errors import ModelNotReady
from mpsserve.metrics import WARMUP_REQUESTS, WARMUP_SECONDS
from mpsserve.model.servable import Servable
from mpsserve.model.warmup import MAX_RECORDS, WARMUP_FILE
from mpsserve.ops.demo import make_request, write_warmup_file
from mpsserve.protocol.tfrecord import encode_record, write_records
from mpsserve.protocol.tfserving_grpc import warmup_record
from tests.conftest import SMALL
from tests.unit.conftest import Recorder


@pytest.fixture
def store(torch_store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(torch_store / "1", root / "1")
    return root


def servable(store: Path) -> Servable:
    config = ModelConfig(
        name="rec", store=str(store), runtime="torch", intra_op_threads=1, poll_interval_s=3600
    )
    return Servable(config, device="cpu")


def classify_record() -> bytes:
    log = prediction_log_pb2.PredictionLog()
    log.classify_log.request.model_spec.name = "rec"
    return log.SerializeToString()


def warmup_counts(recorder: Recorder) -> dict[str, float]:
    return {tags["source"]: value for value, tags in recorder.of(WARMUP_REQUESTS.name)}


def test_a_version_with_a_warmup_file_is_warmed_with_its_requests(
    store: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_warmup_file(store / "1", SMALL, 3)
    served = servable(store)
    with caplog.at_level(logging.INFO, logger="mpsserve.model.servable"):
        served.load()
    assert served.warmup is not None
    assert served.warmup["file"] == str(path) and served.warmup["file_requests"] == 3
    assert served.warmup["synthetic_requests"] == 0  # the file replaces the synthetic request
    assert warmup_counts(recorder) == {"file": 3}
    [(seconds, tags)] = recorder.of(WARMUP_SECONDS.name)
    assert seconds > 0 and tags == {"model": "rec", "version": "1", "source": "file"}
    assert f"warmed up with 3 requests from {path}" in caplog.text
    assert served.store_status()["warmup"] == served.warmup
    version, out = served.infer(make_request(SMALL, rows=4, seed=3))
    assert version == "1" and out["score"].shape == (4,)


def test_without_a_file_the_synthetic_request_warms(store: Path, recorder: Recorder) -> None:
    served = servable(store)
    served.load()
    assert served.warmup is not None and served.warmup["file"] is None
    assert warmup_counts(recorder) == {"synthetic": 1}


def test_other_log_kinds_are_skipped_and_a_file_of_none_falls_back(
    store: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    (store / "1" / WARMUP_FILE).parent.mkdir()
    write_records(store / "1" / WARMUP_FILE, [classify_record(), classify_record()])
    served = servable(store)
    with caplog.at_level(logging.WARNING, logger="mpsserve.model.servable"):
        served.load()
    assert served.warmup is not None
    assert served.warmup["file_requests"] == 0 and served.warmup["synthetic_requests"] == 1
    assert "2 records of" in caplog.text and "are not predict requests; skipped" in caplog.text


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            lambda: [warmup_record(make_request(SMALL, 4)), b"\x00"],
            "record 1 is not a PredictionLog",
        ),
        (
            lambda: [warmup_record({**make_request(SMALL, 4), "age": np.ones(4, np.int64)})],
            "record 0: unknown input 'age'",
        ),
        (lambda: [classify_record()] * (MAX_RECORDS + 1), f"holds more than {MAX_RECORDS}"),
    ],
    ids=["not-a-log", "refused-request", "too-many"],
)
def test_a_bad_file_fails_the_first_load_naming_file_and_record(
    store: Path, records: object, message: str
) -> None:
    path = store / "1" / WARMUP_FILE
    path.parent.mkdir()
    write_records(path, records())  # type: ignore[operator]
    with pytest.raises(ModelNotReady) as info:
        servable(store).load()
    assert f"version 1 failed its warm-up: {path}" in info.value.message
    assert message in info.value.message


def test_a_corrupt_file_keeps_the_serving_version(store: Path) -> None:
    """TF Serving's rule: a warm-up file that cannot be read fails the version's load; here the
    serving version keeps serving and the failure names the file and the record."""
    served = servable(store)
    served.load()
    shutil.copytree(store / "1", store / ".2")
    path = write_warmup_file(store / ".2", SMALL, 2)
    data = bytearray(path.read_bytes())
    second = len(encode_record(warmup_record(make_request(SMALL, 2000, seed=1000))))
    data[second + 40] ^= 0xFF  # inside record 1's data
    path.write_bytes(bytes(data))
    (store / ".2").rename(store / "2")
    served.poll()
    assert served.version == 1
    reason = served.failed[2].reason
    assert f"{store / '2' / WARMUP_FILE}: record 1 (at byte {second}) has corrupt data" in reason
    version, _ = served.infer(make_request(SMALL, rows=2, seed=4))
    assert version == "1"


def test_demo_model_command_writes_a_warmup_file(tmp_path: Path) -> None:
    from mpsserve.ops import cli
    from mpsserve.protocol.tfrecord import read_records

    with pytest.raises(SystemExit):
        cli.main(["demo-model", "--out", str(tmp_path), "--warmup-requests", "1001"])
    assert not any(tmp_path.iterdir())  # refused before building anything
    args = ["--format", "torch", "--table-rows", "1000", "--warmup-requests", "2"]
    assert cli.main(["demo-model", "--out", str(tmp_path), *args]) == 0
    records = list(read_records(tmp_path / "1" / WARMUP_FILE))
    assert len(records) == 2
    log = prediction_log_pb2.PredictionLog.FromString(records[1])
    assert log.predict_log.request.inputs["dense"].tensor_shape.dim[0].size == 256
