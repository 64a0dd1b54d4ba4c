"""Triton's extensions without Ray: the documents (``protocol.triton``), the counters
(``ingress.stats``), the REST adapter over a ``DataPlane`` with an in-process admin, the
servable's unload and reload, and the gRPC health and reflection services on a real
grpc.aio server (grpcio-health-checking's and grpcio-reflection's own stubs)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mpsserve.config import ModelConfig
from mpsserve.errors import Forbidden, InvalidInput, ModelNotReady
from mpsserve.ingress.backends import MockBackend
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.http import create_http_app
from mpsserve.ingress.stats import ReplicaStats, Timing, merge
from mpsserve.model.servable import Servable
from mpsserve.ops.demo import make_request
from mpsserve.protocol import triton
from tests.conftest import SMALL
from tests.echo import echo_backend

METADATA = {
    "name": "rec",
    "versions": ["2"],
    "platform": "tensorflow_savedmodel",
    "inputs": [
        {"name": "dense", "dtype": "float32", "shape": [-1, 13]},
        {"name": "query", "dtype": "object", "shape": [-1]},
    ],
    "outputs": [{"name": "score", "dtype": "float32", "shape": [-1]}],
    "ragged_features": ["history"],
}


def state(serving: str | None = "2", **extra: Any) -> dict[str, Any]:
    return {
        "serving": serving,
        "versions": ["1", "2", "3"],
        "loading": None,
        "policy": {"latest": 1, "specific": None},
        "policy_text": "latest 1",
        "failed": {},
        "unloaded": False,
        "error": None,
        "device": "gpu",
        "gpus": ["0"],
        "signature": "serving_default",
        "max_rows": 4000,
        **extra,
    }


# -- documents --------------------------------------------------------------------------------


def test_model_config_is_tritons_shape() -> None:
    states = [state(), state(gpus=["1"]), state(device="cpu", gpus=[])]
    config = triton.model_config("rec", METADATA, states)
    assert config["max_batch_size"] == 0 and config["backend"] == "tensorflow"
    assert config["input"][0] == {
        "name": "dense",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [-1, 13],
    }
    assert config["input"][1]["data_type"] == "TYPE_STRING"  # BYTES, as Triton names it
    assert config["output"] == [{"name": "score", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"] == [
        {"name": "rec", "kind": "KIND_GPU", "count": 2, "gpus": [0, 1]},
        {"name": "rec", "kind": "KIND_CPU", "count": 1},
    ]
    assert config["parameters"]["ragged_features"] == {"string_value": "history"}
    pinned = triton.model_config("rec", METADATA, [state(policy={"specific": [1, 2]})])
    assert pinned["version_policy"] == {"specific": {"versions": [1, 2]}}


@pytest.mark.parametrize(
    ("parameters", "policy"),
    [
        ({}, None),
        ({"config": ""}, None),
        ({"config": '{"version_policy": {"specific": {"versions": [2, 1]}}}'}, [1, 2]),
        ({"config": '{"name": "rec", "version_policy": {"latest": {"num_versions": 2}}}'}, 2),
    ],
)
def test_load_policy_from_a_config_parameter(parameters: dict[str, Any], policy: Any) -> None:
    found = triton.load_policy("rec", parameters)
    if policy is None:
        assert found is None
    elif isinstance(policy, list):
        assert found == {"latest": None, "specific": policy}
    else:
        assert found == {"latest": policy, "specific": None}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"config": "{"}, "not a JSON object"),
        ({"config": '{"version_policy": {"all": {}}}'}, "'all' is not served"),
        ({"config": '{"max_batch_size": 8}'}, "only version_policy can be changed"),
        ({"config": '{"name": "other"}'}, 'names model "other"'),
        ({"file:1/model.savedmodel": b"x"}, "cannot be uploaded"),
        ({"config": '{"version_policy": {"specific": {"versions": []}}}'}, "must list"),
    ],
)
def test_load_policy_refusals_say_why(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        triton.load_policy("rec", parameters)


def test_index_entries_state_each_version() -> None:
    states = [state(failed={"3": "version 3 failed its warm-up: boom"})]
    assert triton.index_entries("rec", states) == [
        {
            "name": "rec",
            "version": "1",
            "state": "UNAVAILABLE",
            "reason": ("not selected by version policy latest 1"),
        },
        {"name": "rec", "version": "2", "state": "READY"},
        {
            "name": "rec",
            "version": "3",
            "state": "UNAVAILABLE",
            "reason": ("version 3 failed its warm-up: boom"),
        },
    ]
    unloaded = triton.index_entries("rec", [state(serving=None, unloaded=True)])
    assert {e["state"] for e in unloaded} == {"UNAVAILABLE"}
    assert {e["reason"] for e in unloaded} == {"unloaded"}
    assert triton.index_entries("rec", [])[0]["reason"] == "no replica is running"


# -- counters ---------------------------------------------------------------------------------


def test_replica_counters_and_their_sum() -> None:
    one, two = ReplicaStats(), ReplicaStats()
    one.record("1", Timing(10, 20, 300, 40))
    one.record("1", Timing(1, 2, 3, 4))
    one.failed("1", 99)
    two.record("2", Timing(5, 5, 5, 5))
    total = merge([one.snapshot(), two.snapshot()])
    assert total["1"]["success"] == [2, 380] and total["1"]["fail"] == [1, 99]
    assert total["1"]["queue"] == [2, 11] and total["1"]["compute_infer"] == [2, 303]
    assert total["1"]["inference_count"] == total["1"]["execution_count"] == 2
    assert total["2"]["success"] == [1, 20] and total["2"]["last_inference"] > 0
    entry = triton.model_statistics("rec", "1", total["1"])
    assert entry["inference_stats"]["compute_output"] == {"count": 2, "ns": 44}
    assert entry["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}


def test_recording_costs_little_next_to_a_request() -> None:
    """The replica records every request: a few microseconds against milliseconds of
    inference (relative figures only; no absolute bound on a shared CI box)."""
    stats, timing, rounds = ReplicaStats(), Timing(1, 2, 3, 4), 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        stats.record("1", timing)
    per_record = (time.perf_counter() - started) / rounds
    request = np.random.default_rng(0).random((2000, 13), dtype=np.float32)
    started = time.perf_counter()
    for _ in range(20):
        request.copy().sum()  # a stand-in far lighter than one inference
    per_copy = (time.perf_counter() - started) / 20
    assert stats.snapshot()["1"]["execution_count"] == rounds
    assert per_record < 5 * per_copy


# -- the REST adapter over a DataPlane and an in-process admin ---------------------------------


class FakeAdmin:
    """The ``ModelAdmin`` of one model whose replicas are dicts a load or unload changes."""

    def __init__(self) -> None:
        self.states = [state(), state(gpus=["1"])]
        self.stats = [{"serving": "2", "versions": {}}, {"serving": "2", "versions": {}}]
        self.changes: list[dict[str, Any]] = []

    async def replica_states(self, model: str) -> list[dict[str, Any]]:
        return [dict(s) for s in self.states]

    async def replica_stats(self, model: str) -> list[dict[str, Any]]:
        return self.stats

    async def reconfigure(self, model: str, change: dict[str, Any]) -> None:
        self.changes.append(change)
        for s in self.states:
            s["unloaded"] = not change.get("loaded", True)
            s["serving"] = None if s["unloaded"] else "2"
            if "version_policy" in change:
                s["policy"] = change["version_policy"]
                s["serving"] = str(max(change["version_policy"]["specific"] or [2]))


def rest(repository_api: bool) -> tuple[TestClient, FakeAdmin, MockBackend]:
    admin, backend = FakeAdmin(), MockBackend(echo_backend().handler, METADATA)
    plane = DataPlane({"rec": backend}, 1 << 20, 10, admin=admin, repository_api=repository_api)
    return TestClient(create_http_app(plane)), admin, backend


def test_config_stats_and_index_over_rest() -> None:
    client, admin, _ = rest(repository_api=False)
    config = client.get("/v2/models/rec/config").json()
    assert config["name"] == "rec" and config["instance_group"][0]["count"] == 2
    assert client.get("/v2/models/rec/versions/2/config").status_code == 200
    one, two = ReplicaStats(), ReplicaStats()
    one.record("2", Timing(1, 1, 1, 1))
    two.record("2", Timing(2, 2, 2, 2))
    admin.stats = [
        {"serving": "2", "versions": one.snapshot()},
        {"serving": "2", "versions": two.snapshot()},
    ]
    for path in ("/v2/models/stats", "/v2/models/rec/stats", "/v2/models/rec/versions/2/stats"):
        [entry] = client.get(path).json()["model_stats"]
        assert entry["inference_count"] == 2 and entry["inference_stats"]["success"]["ns"] == 12
    missing = client.get("/v2/models/rec/versions/7/stats")
    assert missing.status_code == 404 and "version '7' has no statistics" in missing.json()["error"]
    index = client.post("/v2/repository/index").json()
    assert [e["state"] for e in index] == ["UNAVAILABLE", "READY", "UNAVAILABLE"]
    assert client.post("/v2/repository/index", json={"ready": True}).json() == [
        {"name": "rec", "version": "2", "state": "READY"}
    ]


def test_load_and_unload_are_refused_unless_enabled() -> None:
    client, admin, _ = rest(repository_api=False)
    for action in ("load", "unload"):
        answer = client.post(f"/v2/repository/models/rec/{action}")
        assert answer.status_code == Forbidden.http_status == 403
        assert "ingress.repository_api" in answer.json()["error"]
    assert admin.changes == []


def test_load_and_unload_change_the_replicas_and_readiness() -> None:
    client, admin, _ = rest(repository_api=True)
    assert client.post("/v2/repository/models/rec/unload").status_code == 200
    assert admin.changes == [{"loaded": False}]
    assert client.get("/v2/models/rec/ready").status_code == 503
    body = {
        "parameters": {"config": json.dumps({"version_policy": {"specific": {"versions": [3]}}})}
    }
    assert client.post("/v2/repository/models/rec/load", json=body).status_code == 200
    assert admin.changes[-1] == {
        "loaded": True,
        "version_policy": {"latest": None, "specific": [3]},
    }
    assert client.get("/v2/models/rec/ready").status_code == 200
    unknown = client.post("/v2/repository/models/nope/load")
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
    bad = client.post("/v2/repository/models/rec/load", json={"parameters": {"config": "["}})
    assert bad.status_code == 400 and "not a JSON object" in bad.json()["error"]


def test_every_refusal_is_a_json_error_body() -> None:
    client, _, _ = rest(repository_api=False)
    answer = client.get("/v2/no/such/route")
    assert answer.status_code == 404
    assert answer.json() == {
        "error": 'no endpoint "GET" "/v2/no/such/route" (the README lists the API)'
    }
    wrong = client.get("/v2/models/rec/infer")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert "method not allowed" in wrong.json()["error"]
    other = client.delete("/v2/models/rec/config")
    assert other.status_code == 405 and set(other.json()) == {"error"}


# -- the servable's unload and reload -------------------------------------------------------


def test_unload_serves_nothing_and_stays_healthy_until_reload(
    tf_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(tf_store / "1", store / "1")
    model = Servable(ModelConfig(name="rec", store=str(store), intra_op_threads=1), device="cpu")
    model.load()
    assert model.repository_state()["serving"] == "1"
    model.unload()
    assert model.problem() is None and not model.ready
    with pytest.raises(ModelNotReady, match="unloaded"):
        model.infer(make_request(SMALL, rows=2, seed=1))
    model.poll()  # a poll loads nothing while unloaded, but sees the store
    state_now = model.repository_state()
    assert state_now["serving"] is None and state_now["unloaded"] and state_now["versions"] == ["1"]
    model.reload()
    model.load()
    version, outputs = model.infer(make_request(SMALL, rows=2, seed=1))
    assert version == "1" and outputs["score"].shape == (2,)
    model.stop()


def test_a_bytes_input_error_names_the_datatype() -> None:
    from mpsserve.model.features import _dtype_mismatch

    message = _dtype_mismatch("user_ids", np.dtype(object), np.dtype("int64"))
    assert message == "input 'user_ids' has datatype BYTES; the model expects INT64 (int64)"
    assert "object" not in message


# -- gRPC health and reflection (their packages' own stubs) ---------------------------------


@pytest.fixture
def grpc_server() -> Iterator[tuple[str, MockBackend]]:
    from mpsserve.ingress.grpc import GrpcLimits, start_grpc_server

    limits = GrpcLimits(1 << 20, 8192, 1.0, 16, 10, 8, 5.0, None, 60.0, 10.0)
    backend = echo_backend()
    plane = DataPlane({"echo": backend}, 1 << 20, 10)
    plane.health.interval_s, plane.health.replica_grace_s = 0.1, 1.0
    loop = asyncio.new_event_loop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = loop.run_until_complete(
        start_grpc_server(plane, "127.0.0.1", port, limits, reflection=True)
    )
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield f"127.0.0.1:{port}", backend
    finally:
        asyncio.run_coroutine_threadsafe(_stop(server, plane), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _stop(server: Any, plane: DataPlane) -> None:
    await server.stop(0)
    plane.health.stop()
    await asyncio.sleep(0)  # the health task sees its cancellation


def test_grpc_health_check_and_watch(grpc_server: tuple[str, MockBackend]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, backend = grpc_server
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service="echo"), timeout=5).status == serving
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="echo"), timeout=20)
        assert next(watch).status == serving
        backend.is_ready = False  # its replicas are gone (or one is being reconfigured) ...
        time.sleep(0.3)
        check = stub.Check(health_pb2.HealthCheckRequest(service="echo"), timeout=5)
        assert check.status == serving  # ... for less than the grace period: still serving
        assert next(watch).status == not_serving  # then not
        backend.is_ready = True
        assert next(watch).status == serving
        watch.cancel()
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving


def test_grpc_reflection_lists_the_services(grpc_server: tuple[str, MockBackend]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address, _ = grpc_server
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


# -- error mapping and the gRPC messages ------------------------------------------------------


def test_a_refusal_by_configuration_maps_to_403_and_permission_denied() -> None:
    from mpsserve.errors import GrpcCode, from_status, to_status

    assert to_status(Forbidden("off")) == (403, GrpcCode.PERMISSION_DENIED, "off")
    assert grpc.StatusCode.PERMISSION_DENIED.value[0] == GrpcCode.PERMISSION_DENIED
    assert isinstance(from_status(403, "off"), Forbidden)  # as it crosses a replica's frame


def test_documents_become_tritons_messages() -> None:
    from google.protobuf import json_format

    from mpsserve.protocol import grpc_service_pb2 as pb
    from mpsserve.protocol import kserve_grpc

    config = triton.model_config("rec", METADATA, [state()])
    message = kserve_grpc.model_config_response(config).config
    assert message.input[1].data_type == pb.TYPE_STRING and list(message.input[0].dims) == [-1, 13]
    assert message.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert message.parameters["signature_name"].string_value == "serving_default"
    assert json_format.MessageToDict(message, preserving_proto_field_name=True)["name"] == "rec"
    one = ReplicaStats()
    one.record("2", Timing(1, 2, 3, 4))
    entry = triton.model_statistics("rec", "2", one.snapshot()["2"])
    stats = kserve_grpc.model_statistics_response([entry]).model_stats[0]
    assert stats.inference_stats.compute_infer.ns == 3 and stats.execution_count == 1
    index = kserve_grpc.repository_index_response(triton.index_entries("rec", [state()]))
    assert [(m.version, m.state) for m in index.models][1] == ("2", "READY")
    params = pb.RepositoryModelLoadRequest(
        parameters={"config": pb.ModelRepositoryParameter(string_param="{}")}
    ).parameters
    assert kserve_grpc.repository_parameters(params) == {"config": "{}"}
