"""KServe v2 / Open Inference Protocol gRPC codec: protobuf messages <-> transport-free types.

Pure functions between the generated messages of ``grpc_service.proto`` and the types in
``mpsserve.types``; no gRPC server, no Ray. Datatypes, raw tensor bytes and the BYTES layout
come from the tensor codec every protocol shares (``mpsserve.protocol.tensors``).

Input data travels either in ``raw_input_contents`` (one buffer per input, in input order,
little-endian and row-major; BYTES elements as a 4-byte little-endian length and the bytes) or
in the typed ``contents`` field that matches the datatype. Raw numeric inputs are numpy views
on the message's bytes (no copy beyond protobuf's own; they are read-only). Outputs always
travel raw, in ``raw_output_contents``.

Every malformed request raises ``InvalidInput`` whose message names the tensor and the
problem; an output the wire cannot carry raises ``InferenceError`` (a model bug).

Never import this module in a process that also imports ``tritonclient.grpc``: both register
the same ``inference.*`` protobuf symbols and the default descriptor pool refuses the second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol import grpc_service_pb2 as pb
from mpsserve.protocol.tensors import (
    DATATYPE_TO_NUMPY,
    check_shape,
    numpy_to_datatype,
    object_array,
    pack_bytes,
    raw_view,
    tensor_from_bytes,
)
from mpsserve.text import quote
from mpsserve.types import InferRequest, InferResponse, RequestedOutput

# The one InferTensorContents field each datatype may use (FP16 has none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The numpy dtype of each contents field's protobuf type (the values protobuf accepts).
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
    "bytes_contents": np.dtype(object),
}
_CONTENTS_FIELDS = tuple(_FIELD_DTYPE)
# Parameters that ask for features this server does not have; refused rather than ignored.
_UNSUPPORTED_INPUT_PARAMETERS = ("shared_memory_region",)
_UNSUPPORTED_OUTPUT_PARAMETERS = ("shared_memory_region", "classification")


def decode_infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """Decode a ``ModelInferRequest``; raises InvalidInput naming the tensor on bad input."""
    if not msg.model_name:
        raise InvalidInput("request has no model_name")
    return InferRequest(
        model=msg.model_name,
        inputs=_decode_inputs(msg),
        outputs=_decode_outputs(msg.outputs),
        id=msg.id or None,
        version=msg.model_version or None,
        binary_output=True,  # gRPC outputs always travel raw
        parameters=_parameters(msg.parameters, "request"),
    )


def _decode_inputs(msg: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Decode every input from its raw buffer (when the request uses them) or its contents."""
    raw = msg.raw_input_contents
    entries = msg.inputs
    if raw and len(raw) != len(entries):
        if len(raw) < len(entries):
            missing = entries[len(raw)].name
            raise InvalidInput(
                f"input {quote(missing)} has no raw_input_contents entry: the request has "
                f"{len(entries)} inputs and {len(raw)} raw_input_contents entries"
            )
        names = ", ".join(f"{quote(e.name)}" for e in entries)
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has only "
            f"{len(entries)} inputs ({names}): one entry per input, in input order"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, entry in enumerate(entries):
        name = entry.name
        if not name:
            raise InvalidInput(f'inputs[{index}] has no "name"')
        if name in inputs:
            raise InvalidInput(f"duplicate input name {quote(name)}")
        inputs[name] = _decode_input(entry, raw[index] if raw else None)
    return inputs


def _decode_input(entry: Any, raw: bytes | None) -> np.ndarray:
    """One ``InferInputTensor``, from ``raw`` (its raw_input_contents buffer) or its contents."""
    name = entry.name
    datatype = entry.datatype
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(f"unknown datatype {quote(datatype)} for input {quote(name)}")
    shape = check_shape(name, list(entry.shape))
    for key in _UNSUPPORTED_INPUT_PARAMETERS:
        if key in entry.parameters:
            raise InvalidInput(f'input {quote(name)}: parameter "{key}" is not supported')
    has_contents = entry.HasField("contents")
    if raw is not None:
        if has_contents:
            raise InvalidInput(
                f'input {quote(name)} has both "contents" and a raw_input_contents entry'
            )
        return tensor_from_bytes(name, datatype, shape, memoryview(raw), "raw_input_contents entry")
    if not has_contents:
        raise InvalidInput(f'input {quote(name)} has neither "contents" nor raw_input_contents')
    return _from_contents(name, datatype, shape, entry.contents)


def _from_contents(name: str, datatype: str, shape: list[int], contents: Any) -> np.ndarray:
    """Convert the typed contents field that matches ``datatype`` to a tensor of ``shape``."""
    expected_field = CONTENTS_FIELD.get(datatype)
    if expected_field is None:
        raise InvalidInput(
            f"input {quote(name)}: {datatype} data can only travel in raw_input_contents"
        )
    for other in _CONTENTS_FIELDS:
        if other != expected_field and len(getattr(contents, other)):
            raise InvalidInput(
                f"input {quote(name)}: {datatype} data must be in contents.{expected_field}, "
                f"not contents.{other}"
            )
    values = getattr(contents, expected_field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {quote(name)}: shape {shape} needs {count} elements, "
            f"contents.{expected_field} has {len(values)}"
        )
    if datatype == "BYTES":
        return object_array(list(values)).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if count == 0:
        return np.empty(shape, dtype=dtype)
    wide = np.fromiter(values, dtype=_FIELD_DTYPE[expected_field], count=count)
    if dtype.itemsize < wide.dtype.itemsize:  # INT8/16, UINT8/16 travel in 32 bits
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidInput(
                f"input {quote(name)}: contents.{expected_field} has values out of range "
                f"for {datatype}"
            )
    return wide.astype(dtype, copy=False).reshape(shape)


def _parameters(params: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` (or ``ModelRepositoryParameter``: the same oneof)
    as plain Python values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"{what} parameter {quote(key)} has no value")
        out[key] = getattr(param, choice)
    return out


def _decode_outputs(entries: Sequence[Any]) -> list[RequestedOutput] | None:
    """Requested outputs (every one travels raw); None when none are listed: all outputs."""
    if not entries:
        return None
    outputs: list[RequestedOutput] = []
    for index, entry in enumerate(entries):
        name = entry.name
        if not name:
            raise InvalidInput(f'outputs[{index}] has no "name"')
        if any(o.name == name for o in outputs):
            raise InvalidInput(f"duplicate output name {quote(name)}")
        for key in _UNSUPPORTED_OUTPUT_PARAMETERS:
            if key in entry.parameters:
                raise InvalidInput(f'output {quote(name)}: parameter "{key}" is not supported')
        outputs.append(RequestedOutput(name=name, binary=True))
    return outputs


def encode_infer_response(response: InferResponse, request: InferRequest) -> pb.ModelInferResponse:
    """Encode every output of ``response`` raw, in ``raw_output_contents``, in output order."""
    request_id = response.id if response.id is not None else request.id
    msg = pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=request_id or ""
    )
    for name, value in response.outputs.items():
        arr = np.asarray(value)
        try:
            datatype = numpy_to_datatype(arr.dtype)
        except ValueError as exc:
            raise InferenceError(f"output {quote(name)}: {exc}") from exc
        raw = pack_bytes(name, arr) if datatype == "BYTES" else raw_view(arr).tobytes()
        msg.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        msg.raw_output_contents.append(raw)
    return msg


def model_metadata_response(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """Model metadata (numpy dtype names, as the servable reports them) as the v2 message.

    Keys other than name, versions, platform, inputs and outputs are not part of the message
    and are dropped. A dynamic dimension (-1 or None) travels as -1.
    """
    return pb.ModelMetadataResponse(
        name=str(metadata["name"]),
        versions=[str(v) for v in metadata.get("versions", ())],
        platform=str(metadata.get("platform", "")),
        inputs=[_tensor_metadata(spec) for spec in metadata.get("inputs", ())],
        outputs=[_tensor_metadata(spec) for spec in metadata.get("outputs", ())],
    )


def _tensor_metadata(spec: Mapping[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    """One tensor's metadata; a dtype the wire has no datatype for is a server bug."""
    name = str(spec["name"])
    dtype = spec["dtype"]
    if isinstance(dtype, str) and dtype in DATATYPE_TO_NUMPY:
        datatype = dtype  # already a v2 datatype
    else:
        try:
            datatype = numpy_to_datatype(dtype)
        except (TypeError, ValueError) as exc:
            raise InferenceError(f"tensor {quote(name)}: dtype {dtype!r}: {exc}") from exc
    shape = [-1 if d is None else int(d) for d in spec.get("shape", ())]
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def server_metadata_response(metadata: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    """Server metadata ``{"name", "version", "extensions"}`` as the v2 message."""
    return pb.ServerMetadataResponse(
        name=str(metadata["name"]),
        version=str(metadata.get("version", "")),
        extensions=[str(e) for e in metadata.get("extensions", ())],
    )


# -- Triton's extensions: the documents of ``protocol.triton`` as messages --------------------


def model_config_response(config: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """A model configuration document (``triton.model_config``) as the message."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))


def model_statistics_response(stats: Sequence[Mapping[str, Any]]) -> pb.ModelStatisticsResponse:
    """``model_stats`` entries (``triton.model_statistics``) as the message."""
    entries = [json_format.ParseDict(entry, pb.ModelStatistics()) for entry in stats]
    return pb.ModelStatisticsResponse(model_stats=entries)


def repository_index_response(
    entries: Sequence[Mapping[str, Any]],
) -> pb.RepositoryIndexResponse:
    """Repository index entries (``triton.index_entries``) as the message."""
    models = [pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries]
    return pb.RepositoryIndexResponse(models=models)


def repository_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A load or unload request's ``map<string, ModelRepositoryParameter>`` as plain values."""
    return _parameters(params, "repository")
