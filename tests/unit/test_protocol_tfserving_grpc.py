"""TF Serving's gRPC codec against TensorFlow's own reading of a TensorProto: every dtype the
tensor codec supports, in ``tensor_content`` and in the typed fields, both ways; requests as
``tensorflow-serving-api`` serializes them; the errors, each naming the tensor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mpsserve.errors import InferenceError, InvalidInput, ModelLoadError, ModelNotFound
from mpsserve.protocol import tfserving_grpc as codec
from mpsserve.protocol import tfserving_pb as pb
from mpsserve.types import InferResponse, RequestedOutput

tf = pytest.importorskip("tensorflow")
apis = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
from tensorflow.core.framework import tensor_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_log_pb2,
)

#: (numpy dtype, TF DataType, TF's typed field, sample values)
CASES: list[tuple[str, str, str, list[Any]]] = [
    ("bool", "DT_BOOL", "bool_val", [True, False, True, True, False, False]),
    ("uint8", "DT_UINT8", "int_val", [0, 1, 2, 200, 254, 255]),
    ("uint16", "DT_UINT16", "int_val", [0, 1, 2, 3, 65534, 65535]),
    ("uint32", "DT_UINT32", "uint32_val", [0, 1, 2, 3, 4, 2**32 - 1]),
    ("uint64", "DT_UINT64", "uint64_val", [0, 1, 2, 3, 4, 2**64 - 1]),
    ("int8", "DT_INT8", "int_val", [-128, -1, 0, 1, 2, 127]),
    ("int16", "DT_INT16", "int_val", [-(2**15), -1, 0, 1, 2, 2**15 - 1]),
    ("int32", "DT_INT32", "int_val", [-(2**31), -1, 0, 1, 2, 2**31 - 1]),
    ("int64", "DT_INT64", "int64_val", [-(2**63), -1, 0, 1, 2, 2**63 - 1]),
    ("float16", "DT_HALF", "half_val", [0.5, -1.0, 0.0, 65504.0, 1e-3, -2.25]),
    ("float32", "DT_FLOAT", "float_val", [0.5, -1.0, 0.0, 3.25e38, 1e-30, -2.25]),
    ("float64", "DT_DOUBLE", "double_val", [0.5, -1.0, 0.0, 1e300, 1e-300, -2.25]),
]
IDS = [case[0] for case in CASES]


def ours(real: Any) -> Any:
    """A TensorFlow message, over the wire, as our class."""
    return type_of(real).FromString(real.SerializeToString())


def type_of(real: Any) -> Any:
    return {
        "TensorProto": pb.TensorProto,
        "PredictRequest": pb.PredictRequest,
        "PredictionLog": pb.PredictionLog,
    }[real.DESCRIPTOR.name]


def theirs(msg: Any, cls: Any) -> Any:
    return cls.FromString(msg.SerializeToString())


@pytest.mark.parametrize(("dtype", "dt", "field", "values"), CASES, ids=IDS)
def test_tensor_content_as_tensorflow_writes_it(
    dtype: str, dt: str, field: str, values: list[Any]
) -> None:
    array = np.array(values, dtype=dtype).reshape(2, 3)
    real = tf.make_tensor_proto(array)
    real.ClearField(field)  # make_tensor_proto uses typed fields for some dtypes
    real.tensor_content = array.tobytes()
    decoded = codec.to_numpy("x", ours(real))
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, tf.make_ndarray(real))
    assert not decoded.flags.writeable  # a view on the message's bytes, not a copy


@pytest.mark.parametrize(("dtype", "dt", "field", "values"), CASES, ids=IDS)
def test_typed_fields_as_tensorflow_reads_them(
    dtype: str, dt: str, field: str, values: list[Any]
) -> None:
    real = tensor_pb2.TensorProto(dtype=tf.as_dtype(dtype).as_datatype_enum)
    real.tensor_shape.dim.add(size=2)
    real.tensor_shape.dim.add(size=3)
    if dt == "DT_HALF":
        values = np.array(values, np.float16).view(np.uint16).tolist()
    getattr(real, field).extend(values)
    decoded = codec.to_numpy("x", ours(real))
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, tf.make_ndarray(real))


@pytest.mark.parametrize(("dtype", "dt", "field", "values"), CASES, ids=IDS)
def test_outputs_in_typed_fields_read_by_tensorflow(
    dtype: str, dt: str, field: str, values: list[Any]
) -> None:
    array = np.array(values, dtype=dtype).reshape(3, 2)
    msg = pb.TensorProto()
    codec.from_numpy("y", array, msg)
    real = theirs(msg, tensor_pb2.TensorProto)
    assert tf.dtypes.as_dtype(real.dtype).name == tf.as_dtype(dtype).name and len(
        getattr(real, field)
    ) == len(values)
    np.testing.assert_array_equal(tf.make_ndarray(real), array)


def test_strings() -> None:
    items = [b"a", b"", "\u00e9".encode(), b"\x00\xff"]
    real = tf.make_tensor_proto(np.array(items, dtype=object).reshape(2, 2))
    decoded = codec.to_numpy("s", ours(real))
    assert decoded.dtype == object and decoded.tolist() == [items[:2], items[2:]]
    msg = pb.TensorProto()
    codec.from_numpy("s", decoded, msg)
    assert tf.make_ndarray(theirs(msg, tensor_pb2.TensorProto)).tolist() == [items[:2], items[2:]]


def test_fewer_values_repeat_the_last_as_tensorflow_does() -> None:
    real = tf.make_tensor_proto(0.5, shape=[2, 3])  # one float_val for six elements
    assert len(real.float_val) == 1
    decoded = codec.to_numpy("x", ours(real))
    np.testing.assert_array_equal(decoded, tf.make_ndarray(real))
    partial = tensor_pb2.TensorProto(dtype=tf.int64.as_datatype_enum, int64_val=[1, 2])
    partial.tensor_shape.dim.add(size=4)
    assert codec.to_numpy("x", ours(partial)).tolist() == [1, 2, 2, 2]


def _proto(dt: str, shape: list[int], **fields: Any) -> Any:
    msg = pb.TensorProto(dtype=pb.DATA_TYPE.values_by_name[dt].number, **fields)
    for size in shape:
        msg.tensor_shape.dim.add(size=size)
    return msg


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (_proto("DT_FLOAT", [2, 2], float_val=[1, 2, 3, 4, 5]), "shape [2, 2] holds 4 values but"),
        (_proto("DT_FLOAT", [2, 3], tensor_content=b"\0" * 20), "tensor_content is 20 bytes but"),
        (_proto("DT_FLOAT", [3]), "has no values; shape [3] needs 3 in float_val"),
        (_proto("DT_FLOAT", [2], int_val=[1, 2]), "DT_FLOAT values go in float_val"),
        (
            _proto("DT_INT32", [1], int_val=[1], tensor_content=b"\0" * 4),
            "has both tensor_content and int_val",
        ),
        (_proto("DT_UINT8", [1], int_val=[256]), "int_val has values out of range for UINT8"),
        (_proto("DT_HALF", [1], half_val=[70000]), "half_val has values out of range for FP16"),
        (_proto("DT_BFLOAT16", [1], half_val=[1]), "dtype DT_BFLOAT16 is not supported"),
        (_proto("DT_INVALID", [1]), "dtype DT_INVALID is not supported"),
        (_proto("DT_STRING", [1], tensor_content=b"ab"), "DT_STRING values travel in string_val"),
        (_proto("DT_FLOAT", [-1], float_val=[1]), '"shape" must be a list of non-negative'),
        (pb.TensorProto(dtype=1, tensor_shape={"unknown_rank": True}), "an unknown rank"),
    ],
    ids=[
        "too-many",
        "content-size",
        "no-values",
        "wrong-field",
        "both",
        "uint8-range",
        "half-range",
        "bfloat16",
        "invalid",
        "string-content",
        "negative-dim",
        "unknown-rank",
    ],
)
def test_malformed_tensors_are_named(msg: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        codec.to_numpy("dense", msg)
    assert info.value.message.startswith('input "dense": ') and message in info.value.message


def real_request(**spec: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "rec"
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["dense"].CopyFrom(tf.make_tensor_proto(np.ones((2, 3), np.float32)))
    request.inputs["ids"].CopyFrom(tf.make_tensor_proto(np.arange(2, dtype=np.int64)))
    return request


def test_decode_predict_from_the_real_stub_message() -> None:
    request = real_request(signature_name="serving_default", version=3)
    request.output_filter.append("score")
    decoded = codec.decode_predict(ours(request))
    assert decoded.model == "rec" and decoded.version == "3"
    assert decoded.outputs == [RequestedOutput("score", binary=True)]
    assert decoded.inputs["dense"].shape == (2, 3) and decoded.inputs["ids"].tolist() == [0, 1]
    plain = codec.decode_predict(ours(real_request()))  # no signature: serving_default
    assert plain.version is None and plain.outputs is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"signature_name": "classify"}, 'signature_name "classify" not found'),
        ({"version_label": "stable"}, 'version label "stable": version labels are not supported'),
        ({"name": ""}, "model_spec.name is empty"),
    ],
    ids=["signature", "label", "no-name"],
)
def test_decode_predict_refusals(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.decode_predict(ours(real_request(**spec)))


def test_duplicate_output_filter_and_no_inputs() -> None:
    request = real_request()
    request.output_filter.extend(["score", "score"])
    with pytest.raises(InvalidInput, match='output_filter names "score" twice'):
        codec.decode_predict(ours(request))
    with pytest.raises(InvalidInput, match="the request has no inputs"):
        codec.decode_predict(pb.PredictRequest(model_spec={"name": "rec"}))


def test_encode_predict_reads_back_with_the_real_classes() -> None:
    scores = np.array([0.25, 0.75], np.float32)
    msg = codec.encode_predict(InferResponse("rec", "3", {"score": scores}))
    real = theirs(msg, predict_pb2.PredictResponse)
    assert list(real.outputs["score"].float_val) == [0.25, 0.75]
    np.testing.assert_array_equal(tf.make_ndarray(real.outputs["score"]), scores)
    assert real.model_spec.name == "rec" and real.model_spec.version.value == 3
    assert real.model_spec.signature_name == "serving_default"
    with pytest.raises(InferenceError, match="no outputs"):
        codec.encode_predict(InferResponse("rec", "3", {}))


METADATA = {
    "name": "rec",
    "versions": ["3"],
    "platform": "tensorflow_savedmodel",
    "inputs": [
        {"name": "dense", "dtype": "float32", "shape": [-1, 13]},
        {"name": "ids", "dtype": "int64", "shape": [-1]},
    ],
    "outputs": [{"name": "score", "dtype": "float32", "shape": [-1]}],
}


def test_metadata_response_is_tf_servings_signature_def_map() -> None:
    real = theirs(
        codec.metadata_response(METADATA), get_model_metadata_pb2.GetModelMetadataResponse
    )
    assert real.model_spec.name == "rec" and real.model_spec.version.value == 3
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert real.metadata["signature_def"].Unpack(sigmap)
    signature = sigmap.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    dense = signature.inputs["dense"]
    assert dense.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in dense.tensor_shape.dim] == [-1, 13]
    assert signature.outputs["score"].dtype == tf.float32.as_datatype_enum
    assert set(signature.inputs) == {"dense", "ids"}


def test_metadata_json_has_tf_servings_rest_shape() -> None:
    doc = codec.metadata_json(METADATA)
    assert doc["model_spec"] == {"name": "rec", "signature_name": "", "version": "3"}
    signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["dense"] == {
        "name": "dense",
        "dtype": "DT_FLOAT",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "13", "name": ""}],
                         "unknown_rank": False},
    }  # fmt: skip


def test_metadata_fields() -> None:
    codec.check_metadata_fields(["signature_def"])
    with pytest.raises(InvalidInput, match="at least one metadata_field"):
        codec.check_metadata_fields([])
    with pytest.raises(InvalidInput, match='metadata field "graph" is not supported'):
        codec.check_metadata_fields(["signature_def", "graph"])


def test_status_response() -> None:
    msg = codec.status_response(codec.served_versions(METADATA, None))
    real = theirs(msg, get_model_status_pb2.GetModelStatusResponse)
    [status] = real.model_version_status
    assert status.version == 3 and status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0 and status.status.error_message == ""
    assert codec.served_versions(METADATA, "3") == ["3"]
    with pytest.raises(ModelNotFound, match=r"version 4 is not served; serving \['3'\]"):
        codec.served_versions(METADATA, "4")


def test_warmup_records_from_the_real_prediction_log() -> None:
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(real_request())
    inputs = codec.warmup_inputs(log.SerializeToString(), "f: record 0")
    assert inputs is not None and set(inputs) == {"dense", "ids"}
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = "rec"
    assert codec.warmup_inputs(classify.SerializeToString(), "f: record 1") is None
    with pytest.raises(ModelLoadError, match="f: record 2 is not a PredictionLog"):
        codec.warmup_inputs(b"\xff\xff\xff", "f: record 2")
    bad = prediction_log_pb2.PredictionLog()
    bad.predict_log.request.CopyFrom(real_request(signature_name="other"))
    with pytest.raises(ModelLoadError, match='f: record 3: signature_name "other" not found'):
        codec.warmup_inputs(bad.SerializeToString(), "f: record 3")


def test_warmup_record_is_a_real_prediction_log() -> None:
    record = codec.warmup_record({"dense": np.ones((2, 3), np.float32)}, model="rec")
    log = prediction_log_pb2.PredictionLog.FromString(record)
    assert log.WhichOneof("log_type") == "predict_log"
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["dense"]), np.ones((2, 3)))
