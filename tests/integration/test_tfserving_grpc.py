"""TensorFlow Serving's gRPC API and REST metadata, driven by ``tensorflow-serving-api``'s own
stubs (``PredictionServiceStub``, ``ModelServiceStub``) on the gRPC port that also serves
KServe v2; and warm-up files, through ``mpsserve serve`` as a user runs it.

Predict must give the scores KServe v2 gives for the same request (tritonclient.grpc), and the
demo's numpy reference. Ports honour MPSSERVE_TEST_PORT_OFFSET.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
import tritonclient.grpc as triton
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mpsserve.model.warmup import WARMUP_FILE
from mpsserve.ops.demo import make_request, make_weights, reference, write_warmup_file
from tests.conftest import SEED, SMALL
from tests.integration.conftest import PORT_OFFSET
from tests.processes import Service, service_config, until

SERVICE_HTTP = 26000 + PORT_OFFSET  # its gRPC port: + 1000 (tests/processes.py)
WARMUP_REQUESTS = 3
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


# -- warm-up files through `mpsserve serve` (first: its Ray comes and goes before the session's)


def replica(svc: Service) -> dict[str, Any]:
    [row] = svc.status()["replicas"]
    return dict(row)


def predict_version(channel: grpc.Channel, req: dict[str, np.ndarray]) -> tuple[int, np.ndarray]:
    reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        predict_request(req), timeout=60
    )
    return reply.model_spec.version.value, tf.make_ndarray(reply.outputs["score"])


def test_warmup_file_then_a_corrupt_one(tf_store: Path, tmp_path: Path) -> None:
    """v1 ships 3 warm-up requests: its replica ran exactly those (status, log). v2 ships a
    file with a bad CRC: not swapped in, the failure names the file and the record, and v1
    keeps answering TF Serving's Predict."""
    store = tmp_path / "store"
    shutil.copytree(tf_store / "1", store / "1")
    path = write_warmup_file(store / "1", SMALL, WARMUP_REQUESTS)
    config = service_config(store, SERVICE_HTTP, "tfs-warmup", poll_interval_s=0.5)
    with Service(tmp_path, config) as svc:
        warmup = replica(svc)["store"]["warmup"]
        assert warmup["file"].endswith(str(Path("1") / WARMUP_FILE))
        assert warmup["file_requests"] == WARMUP_REQUESTS and warmup["synthetic_requests"] == 0
        assert warmup["file_s"] > 0

        shutil.copytree(store / "1", tmp_path / "v2")
        corrupt = tmp_path / "v2" / WARMUP_FILE
        data = bytearray(corrupt.read_bytes())
        data[-10] ^= 0xFF  # inside the last record's data
        corrupt.write_bytes(bytes(data))
        (tmp_path / "v2").rename(store / "2")
        failed = until(lambda: replica(svc)["store"]["failed"].get("2"), 120, "version 2 refused")
        assert str(store / "2" / WARMUP_FILE) in failed
        assert f"record {WARMUP_REQUESTS - 1} (at byte" in failed and "fail their CRC" in failed
        with grpc.insecure_channel(f"127.0.0.1:{SERVICE_HTTP + 1000}") as channel:
            version, scores = predict_version(channel, make_request(SMALL, rows=5, seed=2))
        assert version == 1 and scores.shape == (5,)
    logged = re.findall(r"warmed up with (\d+) requests from (\S+)", svc.output + svc.banner)
    assert (str(WARMUP_REQUESTS), str(path)) in logged


# -- the session's service: Predict, GetModelMetadata, GetModelStatus, REST metadata


@pytest.fixture(scope="module")
def channel(grpc_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_address) as chan:
        yield chan


@pytest.fixture(scope="module")
def prediction(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(
    req: dict[str, np.ndarray], typed: bool = False, **spec: Any
) -> predict_pb2.PredictRequest:
    """What a TF Serving client sends: ``tf.make_tensor_proto`` (tensor_content), or the
    typed value fields (``float_val``, ``int64_val``)."""
    message = predict_pb2.PredictRequest()
    message.model_spec.name = spec.pop("name", "rec")
    for key, value in spec.items():
        if key == "version":
            message.model_spec.version.value = value
        else:
            setattr(message.model_spec, key, value)
    for name, array in req.items():
        if typed:
            proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(array.dtype).as_datatype_enum)
            proto.tensor_shape.dim.extend(
                tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape
            )
            field = "float_val" if array.dtype == np.float32 else "int64_val"
            getattr(proto, field).extend(array.ravel().tolist())
            message.inputs[name].CopyFrom(proto)
        else:
            message.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return message


def kserve_scores(grpc_address: str, req: dict[str, np.ndarray]) -> np.ndarray:
    client = triton.InferenceServerClient(grpc_address)
    inputs = []
    for name, array in req.items():
        item = triton.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64")
        item.set_data_from_numpy(array)
        inputs.append(item)
    scores: np.ndarray = client.infer("rec", inputs).as_numpy("score")
    return scores


@pytest.mark.parametrize("typed", [False, True], ids=["tensor_content", "typed-fields"])
def test_predict_gives_kserve_v2s_scores(
    prediction: prediction_service_pb2_grpc.PredictionServiceStub, grpc_address: str, typed: bool
) -> None:
    req = make_request(SMALL, rows=2000, seed=71)
    reply = prediction.Predict(predict_request(req, typed=typed), timeout=60)
    assert reply.model_spec.name == "rec" and reply.model_spec.version.value == 1
    assert reply.model_spec.signature_name == "serving_default"
    assert len(reply.outputs["score"].float_val) == 2000  # typed, as TF Serving answers
    scores = tf.make_ndarray(reply.outputs["score"])
    assert scores.dtype == np.float32 and scores.shape == (2000,)
    assert np.abs(scores - kserve_scores(grpc_address, req)).max() <= 1e-6
    assert np.abs(scores - reference(SMALL, make_weights(SMALL, SEED), req)).max() <= 1e-5


def test_predict_with_version_signature_and_output_filter(
    prediction: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    message = predict_request(
        make_request(SMALL, rows=3, seed=5), version=1, signature_name="serving_default"
    )
    message.output_filter.append("score")
    reply = prediction.Predict(message, timeout=60)
    assert list(reply.outputs) == ["score"] and len(reply.outputs["score"].float_val) == 3


def _error(call: Any, message: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(message, timeout=60)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    ("spec", "code", "details"),
    [
        ({"signature_name": "predict_v2"}, "INVALID_ARGUMENT", 'signature_name "predict_v2"'),
        ({"version_label": "stable"}, "INVALID_ARGUMENT", "version labels are not supported"),
        ({"version": 7}, "NOT_FOUND", "version 7 is not served; serving version 1"),
        ({"name": "nope"}, "NOT_FOUND", "unknown model 'nope'"),
    ],
    ids=["signature", "label", "version", "model"],
)
def test_predict_errors(
    prediction: prediction_service_pb2_grpc.PredictionServiceStub,
    spec: dict[str, Any],
    code: str,
    details: str,
) -> None:
    message = predict_request(make_request(SMALL, rows=2, seed=6), **spec)
    got_code, got_details = _error(prediction.Predict, message)
    assert got_code.name == code and details in got_details


def test_predict_input_errors_name_the_tensor(
    prediction: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    req = make_request(SMALL, rows=2, seed=8)
    message = predict_request(req)
    message.inputs["dense"].tensor_content = message.inputs["dense"].tensor_content[:-4]
    code, details = _error(prediction.Predict, message)
    assert code.name == "INVALID_ARGUMENT"
    assert 'input "dense": tensor_content is 100 bytes' in details
    message = predict_request({**req, "age": np.ones(2, np.int64)})
    code, details = _error(prediction.Predict, message)
    assert code.name == "INVALID_ARGUMENT" and "unknown input 'age'" in details
    message = predict_request(req)
    message.output_filter.append("logits")
    code, details = _error(prediction.Predict, message)
    assert code.name == "INVALID_ARGUMENT" and "unknown output 'logits'" in details


def test_get_model_metadata(prediction: prediction_service_pb2_grpc.PredictionServiceStub) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "rec"
    reply = prediction.GetModelMetadata(request, timeout=30)
    assert reply.model_spec.name == "rec" and reply.model_spec.version.value == 1
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert reply.metadata["signature_def"].Unpack(sigmap)
    signature = sigmap.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert set(signature.inputs) == {"dense", "cat", "history_values", "history_lengths"}
    dense = signature.inputs["dense"]
    assert dense.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in dense.tensor_shape.dim] == [-1, SMALL.n_dense]
    assert signature.outputs["score"].dtype == tf.float32.as_datatype_enum
    request.ClearField("metadata_field")
    code, details = _error(prediction.GetModelMetadata, request)
    assert code.name == "INVALID_ARGUMENT" and "at least one metadata_field" in details


def test_get_model_status(channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "rec"
    [status] = stub.GetModelStatus(request, timeout=30).model_version_status
    assert status.version == 1 and status.state == AVAILABLE and status.status.error_code == 0
    request.model_spec.version.value = 1
    assert stub.GetModelStatus(request, timeout=30).model_version_status[0].state == AVAILABLE
    request.model_spec.version.value = 9
    code, details = _error(stub.GetModelStatus, request)
    assert code.name == "NOT_FOUND" and "version 9 is not served" in details


def test_rpcs_not_served_answer_unimplemented(
    prediction: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "rec"
    code, _ = _error(prediction.Classify, request)
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_rest_metadata(base_url: str) -> None:
    doc = requests.get(f"{base_url}/v1/models/rec/metadata", timeout=30).json()
    assert doc["model_spec"] == {"name": "rec", "signature_name": "", "version": "1"}
    signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["dense"]["dtype"] == "DT_FLOAT"
    assert signature["inputs"]["dense"]["tensor_shape"]["dim"][0] == {"size": "-1", "name": ""}
    assert signature["outputs"]["score"]["dtype"] == "DT_FLOAT"
    assert requests.get(f"{base_url}/v1/models/rec/versions/1/metadata", timeout=30).json() == doc
    missing = requests.get(f"{base_url}/v1/models/rec/versions/9/metadata", timeout=30)
    assert missing.status_code == 404 and "is not served" in missing.json()["error"]
    label = requests.get(f"{base_url}/v1/models/rec/labels/stable/metadata", timeout=30)
    assert label.status_code == 400 and "labels are not supported" in label.json()["error"]
