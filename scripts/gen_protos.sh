#!/usr/bin/env bash
# Regenerate the committed gRPC stubs of mpsserve/protocol/grpc_service.proto.
#
# Needs grpcio-tools in the environment (the dev extra), at a version whose bundled protoc is no
# newer than the installed protobuf runtime (the generated code checks this on import).
# Runs from the repository root with "-I ." so the stubs import each other package-qualified
# (from mpsserve.protocol import grpc_service_pb2). PYTHON picks the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

"$PYTHON" -m grpc_tools.protoc \
    -I . \
    --python_out=. \
    --grpc_python_out=. \
    --pyi_out=. \
    mpsserve/protocol/grpc_service.proto
