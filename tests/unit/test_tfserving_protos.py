"""The trimmed TF Serving protos: the committed descriptor set is what scripts/gen_protos.sh
makes of them, and every field and RPC they declare is TF Serving's own (same number, type,
label and message type as ``tensorflow-serving-api`` 2.21 and TensorFlow declare), so the
wire is the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from mpsserve.protocol import tfserving_pb
from mpsserve.protocol.tfserving_descriptors import FILE_DESCRIPTOR_SET

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "mpsserve" / "protocol" / "tfserving_protos"


def test_committed_descriptors_are_generated_from_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "set.pb"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTOS), "--include_imports",
         f"--descriptor_set_out={out}", *files],
        check=True,
    )  # fmt: skip
    assert out.read_bytes() == FILE_DESCRIPTOR_SET, "run scripts/gen_protos.sh and commit"


def _ours() -> list[descriptor_pb2.FileDescriptorProto]:
    return list(descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file)


def _check_message(ours: descriptor_pb2.DescriptorProto, theirs: object, where: str) -> None:
    fields = {f.name: f for f in theirs.fields}  # type: ignore[attr-defined]
    for field in ours.field:
        real = fields.get(field.name)
        assert real is not None, f"{where}.{field.name} is not TF Serving's"
        repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        assert (field.number, field.type, repeated) == (real.number, real.type, real.is_repeated), (
            f"{where}.{field.name}"
        )
        if field.type_name:
            kind = real.message_type if real.message_type is not None else real.enum_type
            assert field.type_name.lstrip(".") == kind.full_name, f"{where}.{field.name}"
    nested = {n.name: n for n in theirs.nested_types}  # type: ignore[attr-defined]
    for message in ours.nested_type:
        _check_message(message, nested[message.name], f"{where}.{message.name}")


def test_every_declared_field_and_rpc_is_tf_servings() -> None:
    pytest.importorskip("tensorflow_serving")
    from google.protobuf import descriptor_pool
    from tensorflow_serving.apis import (  # noqa: F401 - registers them in the default pool
        model_service_pb2,
        prediction_log_pb2,
        prediction_service_pb2,
    )

    real = descriptor_pool.Default()
    checked = 0
    for file in _ours():
        if file.package.startswith("google"):
            continue
        for message in file.message_type:
            name = f"{file.package}.{message.name}"
            _check_message(message, real.FindMessageTypeByName(name), name)
            checked += 1
        for enum in file.enum_type:
            theirs = real.FindEnumTypeByName(f"{file.package}.{enum.name}")
            assert {v.name: v.number for v in enum.value}.items() <= {
                v.name: v.number for v in theirs.values
            }.items()
        for service in file.service:
            theirs = real.FindServiceByName(f"{file.package}.{service.name}")
            for method in service.method:
                rpc = theirs.methods_by_name[method.name]
                assert method.input_type.lstrip(".") == rpc.input_type.full_name
                assert method.output_type.lstrip(".") == rpc.output_type.full_name
    assert checked >= 14
    assert set(tfserving_pb.RPCS) == {
        ("tensorflow.serving.PredictionService", "Predict"),
        ("tensorflow.serving.PredictionService", "GetModelMetadata"),
        ("tensorflow.serving.ModelService", "GetModelStatus"),
    }
