"""TensorFlow Serving's gRPC API codec: its messages <-> numpy and the transport-free types.

Spec: TF Serving's ``tensorflow_serving/apis`` protos (``tfserving_protos/``, loaded by
``tfserving_pb``) and TensorFlow's ``Tensor::FromProto`` for the rules of a ``TensorProto``.
Pure functions; no gRPC server, no Ray, no TensorFlow. Datatypes and raw bytes go through the
tensor codec every protocol shares (``protocol.tensors``).

A ``TensorProto`` carries its values either in ``tensor_content`` (row-major little-endian
bytes, decoded as a numpy view: no copy beyond protobuf's own) or in the typed field of its
dtype (``float_val`` ...). As in TensorFlow, a typed field with fewer values than the shape
holds is filled with its last value (one value fills the whole tensor); more values than the
shape holds, no values at all, values in the wrong field or in both forms are refused with
``InvalidInput`` naming the tensor. Outputs travel in the typed fields, as TF Serving sends
them by default (clients read ``outputs["score"].float_val``), so ``tf.make_ndarray`` and
plain protobuf readers both work.

The served signature is called ``serving_default`` here, as on the REST API (the model config
picks which SavedModel signature that is). Version labels are not supported: this server has
no label configuration, so a ``version_label`` is refused as TF Serving refuses an unknown one
(INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format

from mpsserve.errors import InferenceError, InvalidInput, ModelLoadError, ModelNotFound
from mpsserve.protocol import tfserving_pb as pb
from mpsserve.protocol.tensors import (
    DATATYPE_TO_NUMPY,
    check_shape,
    elements_as_bytes,
    numpy_to_datatype,
    object_array,
    tensor_from_bytes,
)
from mpsserve.text import quote
from mpsserve.types import InferRequest, InferResponse, RequestedOutput

SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"  # SignatureDef.method_name of a predict signature
METADATA_FIELD = "signature_def"  # the one GetModelMetadata field TF Serving knows
LABELS_UNSUPPORTED = (
    "version label {label}: version labels are not supported (this server has no label "
    "configuration); name a version, or none for the served one"
)

#: TensorFlow DataType name -> the wire datatype of the tensor codec, and the typed field.
_DTYPES: dict[str, tuple[str, str]] = {
    "DT_BOOL": ("BOOL", "bool_val"),
    "DT_UINT8": ("UINT8", "int_val"),
    "DT_UINT16": ("UINT16", "int_val"),
    "DT_UINT32": ("UINT32", "uint32_val"),
    "DT_UINT64": ("UINT64", "uint64_val"),
    "DT_INT8": ("INT8", "int_val"),
    "DT_INT16": ("INT16", "int_val"),
    "DT_INT32": ("INT32", "int_val"),
    "DT_INT64": ("INT64", "int64_val"),
    "DT_HALF": ("FP16", "half_val"),
    "DT_FLOAT": ("FP32", "float_val"),
    "DT_DOUBLE": ("FP64", "double_val"),
    "DT_STRING": ("BYTES", "string_val"),
}
_BY_NUMBER = {pb.DATA_TYPE.values_by_name[n].number: n for n in _DTYPES}
_BY_DATATYPE = {datatype: name for name, (datatype, _) in _DTYPES.items()}
#: Every typed value field, and the numpy dtype its protobuf type holds.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_val": np.dtype(np.bool_),
    "int_val": np.dtype(np.int32),
    "uint32_val": np.dtype(np.uint32),
    "uint64_val": np.dtype(np.uint64),
    "int64_val": np.dtype(np.int64),
    "half_val": np.dtype(np.int32),  # the 16-bit pattern of each half
    "float_val": np.dtype(np.float32),
    "double_val": np.dtype(np.float64),
    "string_val": np.dtype(object),
    "scomplex_val": np.dtype(np.float32),
    "dcomplex_val": np.dtype(np.float64),
}


# -- tensors ----------------------------------------------------------------------------------


def dtype_name(number: int) -> str:
    """A DataType number's name (``DT_FLOAT``), or the number where the enum has none."""
    value = pb.DATA_TYPE.values_by_number.get(number)
    return value.name if value is not None else str(number)


def to_numpy(name: str, proto: Any) -> np.ndarray:
    """One ``TensorProto`` as a numpy array (numeric ``tensor_content``: a read-only view)."""
    entry = _DTYPES.get(_BY_NUMBER.get(proto.dtype, ""))
    if entry is None:
        raise InvalidInput(
            f"input {quote(name)}: dtype {dtype_name(proto.dtype)} is not supported; "
            f"supported: {', '.join(_DTYPES)}"
        )
    datatype, field = entry
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"input {quote(name)}: tensor_shape has an unknown rank")
    shape = check_shape(name, [dim.size for dim in proto.tensor_shape.dim])
    used = [f for f in _FIELD_DTYPE if len(getattr(proto, f))]
    content = proto.tensor_content
    if content:
        if datatype == "BYTES":
            raise InvalidInput(f"input {quote(name)}: DT_STRING values travel in string_val")
        if used:
            raise InvalidInput(
                f"input {quote(name)}: has both tensor_content and {used[0]}; send one"
            )
        return tensor_from_bytes(name, datatype, shape, memoryview(content), "tensor_content")
    if any(f != field for f in used):
        other = next(f for f in used if f != field)
        raise InvalidInput(
            f"input {quote(name)}: {dtype_name(proto.dtype)} values go in {field} or "
            f"tensor_content, not {other}"
        )
    return _from_field(name, datatype, field, shape, getattr(proto, field))


def _from_field(
    name: str, datatype: str, field: str, shape: list[int], values: Sequence[Any]
) -> np.ndarray:
    """The typed field's values as the tensor; fewer than the shape holds repeat the last."""
    count, given = math.prod(shape), len(values)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if given > count:
        raise InvalidInput(
            f"input {quote(name)}: shape {shape} holds {count} values but {field} has {given}"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype)
    if given == 0:
        raise InvalidInput(
            f"input {quote(name)}: has no values; shape {shape} needs {count} in {field} or "
            "tensor_content"
        )
    if datatype == "BYTES":
        flat = object_array(list(values))
    else:
        flat = _narrow(name, datatype, field, np.fromiter(values, _FIELD_DTYPE[field], given))
    if given < count:  # TensorFlow's rule: the last value fills the rest
        flat = np.concatenate([flat, np.full(count - given, flat[-1], dtype=flat.dtype)])
    return flat.reshape(shape)


def _narrow(name: str, datatype: str, field: str, wide: np.ndarray) -> np.ndarray:
    """Values of a wider protobuf type as the tensor's dtype, refusing any out of range."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    if datatype == "FP16":  # half_val holds the bit patterns
        target = np.dtype(np.uint16)
    elif dtype.kind in "iu" and dtype.itemsize < wide.dtype.itemsize:
        target = dtype
    else:
        return wide.astype(dtype, copy=False)
    info = np.iinfo(target)
    if int(wide.min()) < info.min or int(wide.max()) > info.max:
        raise InvalidInput(f"input {quote(name)}: {field} has values out of range for {datatype}")
    narrow = wide.astype(target)
    return narrow.view(np.float16) if datatype == "FP16" else narrow


def from_numpy(name: str, array: np.ndarray, proto: Any) -> None:
    """Fill ``proto`` (a ``TensorProto``) with ``array``: dtype, shape and the typed field."""
    arr = np.asarray(array)
    try:
        dt_name = _BY_DATATYPE[numpy_to_datatype(arr.dtype)]
    except (KeyError, ValueError) as exc:
        raise InferenceError(f"output {quote(name)}: dtype {arr.dtype} has no TF DataType") from exc
    proto.dtype = pb.DATA_TYPE.values_by_name[dt_name].number
    for size in arr.shape:
        proto.tensor_shape.dim.add(size=size)
    datatype, field = _DTYPES[dt_name]
    values = getattr(proto, field)
    if datatype == "BYTES":
        values.extend(elements_as_bytes(name, arr))
    elif datatype == "FP16":
        values.extend(arr.astype("<f2").view(np.uint16).ravel().tolist())
    else:
        values.extend(arr.ravel().tolist())


# -- requests ---------------------------------------------------------------------------------


def requested_version(spec: Any) -> str | None:
    """The version a ``ModelSpec`` names (None: the served one); a label is refused."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        label = quote(spec.version_label)
        raise InvalidInput("model_spec." + LABELS_UNSUPPORTED.format(label=label))
    return str(spec.version.value) if choice == "version" else None


def check_signature(spec: Any) -> str:
    """The signature a ``ModelSpec`` asks for; the only one served is ``serving_default``."""
    signature = spec.signature_name or SIGNATURE
    if signature != SIGNATURE:
        raise InvalidInput(
            f'signature_name {quote(signature)} not found; this model serves "{SIGNATURE}" only'
        )
    return signature


def model_name(spec: Any) -> str:
    if not spec.name:
        raise InvalidInput("model_spec.name is empty")
    return str(spec.name)


def decode_predict(msg: Any, request_id: str | None = None) -> InferRequest:
    """A ``PredictRequest`` as an ``InferRequest`` (InvalidInput naming what is wrong)."""
    spec = msg.model_spec
    check_signature(spec)
    return InferRequest(
        model=model_name(spec),
        inputs=decode_inputs(msg.inputs),
        outputs=_output_filter(msg.output_filter),
        id=request_id,
        version=requested_version(spec),
        binary_output=True,
    )


def decode_inputs(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not inputs:
        raise InvalidInput("the request has no inputs")
    return {name: to_numpy(name, proto) for name, proto in inputs.items()}


def _output_filter(names: Sequence[str]) -> list[RequestedOutput] | None:
    """``output_filter`` (output aliases to return); empty: every output."""
    if not names:
        return None
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if list(names).count(n) > 1)
        raise InvalidInput(f"output_filter names {quote(duplicate)} twice")
    return [RequestedOutput(name=name, binary=True) for name in names]


def encode_predict(response: InferResponse) -> Any:
    """A ``PredictResponse``: every output in its typed field, and the model spec served."""
    if not response.outputs:
        raise InferenceError("the model returned no outputs")
    msg = pb.PredictResponse()
    _fill_spec(msg.model_spec, response.model, response.version, SIGNATURE)
    for name, array in response.outputs.items():
        from_numpy(name, array, msg.outputs[name])
    return msg


def _fill_spec(spec: Any, name: str, version: str | None, signature: str = "") -> None:
    spec.name = name
    if version is not None and version.isdigit():
        spec.version.value = int(version)
    if signature:
        spec.signature_name = signature


# -- metadata and status ----------------------------------------------------------------------


def check_metadata_fields(fields: Sequence[str]) -> None:
    """TF Serving's rule: at least one field, and each one it knows (``signature_def``)."""
    if not fields:
        raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != METADATA_FIELD:
            raise InvalidInput(f"metadata field {quote(field)} is not supported")


def signature_def_map(metadata: Mapping[str, Any]) -> Any:
    """The model's signature (KServe-style metadata, numpy dtype names) as TF Serving's
    ``SignatureDefMap`` with one ``serving_default`` predict signature."""
    sigmap = pb.SignatureDefMap()
    signature = sigmap.signature_def[SIGNATURE]
    signature.method_name = PREDICT_METHOD
    for spec in metadata["inputs"]:
        _tensor_info(spec, signature.inputs[str(spec["name"])])
    for spec in metadata["outputs"]:
        _tensor_info(spec, signature.outputs[str(spec["name"])])
    return sigmap


def _tensor_info(spec: Mapping[str, Any], info: Any) -> None:
    name = str(spec["name"])
    try:
        dt_name = _BY_DATATYPE[numpy_to_datatype(spec["dtype"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise InferenceError(
            f"tensor {quote(name)}: dtype {spec['dtype']!r} has no TF DataType"
        ) from exc
    info.name = name
    info.dtype = pb.DATA_TYPE.values_by_name[dt_name].number
    for size in spec.get("shape", ()):
        info.tensor_shape.dim.add(size=-1 if size is None else int(size))


def metadata_response(metadata: Mapping[str, Any]) -> Any:
    """``GetModelMetadataResponse``: the served version and ``metadata["signature_def"]``, an
    ``Any`` holding the ``SignatureDefMap``."""
    msg = pb.GetModelMetadataResponse()
    _fill_spec(msg.model_spec, str(metadata["name"]), _served(metadata))
    packed = msg.metadata[METADATA_FIELD]
    packed.type_url = pb.SIGNATURE_DEF_MAP_URL
    packed.value = signature_def_map(metadata).SerializeToString()
    return msg


def metadata_json(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """``GET /v1/models/{name}[/versions/{v}]/metadata`` as TF Serving's REST API writes it:
    the proto's JSON with every field (int64 as strings), the map unwrapped from its Any."""
    sigmap = json_format.MessageToDict(
        signature_def_map(metadata),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    spec = {"name": str(metadata["name"]), "signature_name": "", "version": _served(metadata)}
    return {"model_spec": spec, "metadata": {METADATA_FIELD: sigmap}}


def _served(metadata: Mapping[str, Any]) -> str:
    versions = [str(v) for v in metadata.get("versions", ())]
    return versions[-1] if versions else ""


def status_response(versions: Iterable[str]) -> Any:
    """``GetModelStatusResponse``: each served version AVAILABLE with an OK status."""
    msg = pb.GetModelStatusResponse()
    available = pb.VERSION_STATE.values_by_name["AVAILABLE"].number
    for version in versions:
        entry = msg.model_version_status.add(version=int(version), state=available)
        entry.status.error_code = pb.ERROR_CODE.values_by_name["OK"].number
    return msg


def served_versions(metadata: Mapping[str, Any], version: str | None) -> list[str]:
    """The versions a status request asks about: all served ones, or the one it names."""
    versions = [str(v) for v in metadata.get("versions", ())]
    if version is None:
        return versions
    if version not in versions:
        raise ModelNotFound(
            f"model {quote(str(metadata['name']))} version {version} is not served; "
            f"serving {versions}"
        )
    return [version]


# -- warm-up files ----------------------------------------------------------------------------


def warmup_inputs(record: bytes, where: str) -> dict[str, np.ndarray] | None:
    """The inputs of one warm-up record (a ``PredictionLog``): its ``predict_log.request``;
    None for a record of another kind (classify, regress, ...), which this server does not
    serve. ``where`` names the file and record in errors (ModelLoadError)."""
    try:
        log = pb.PredictionLog.FromString(record)
    except Exception as exc:  # protobuf's DecodeError, whatever the backend
        raise ModelLoadError(f"{where} is not a PredictionLog: {exc}") from None
    if log.WhichOneof("log_type") != "predict_log":
        return None
    request = log.predict_log.request
    try:
        check_signature(request.model_spec)
        return decode_inputs(request.inputs)
    except InvalidInput as exc:
        raise ModelLoadError(f"{where}: {exc.message}") from None


def warmup_record(inputs: Mapping[str, np.ndarray], model: str = "") -> bytes:
    """One ``PredictionLog`` record of a predict request with ``inputs`` (for writers)."""
    log = pb.PredictionLog()
    request = log.predict_log.request
    request.model_spec.name = model
    request.model_spec.signature_name = SIGNATURE
    for name, array in inputs.items():
        from_numpy(name, array, request.inputs[name])
    data: bytes = log.SerializeToString()
    return data
