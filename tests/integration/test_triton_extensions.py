"""Issue 18 items 1 and 2 against a running ``mpsserve serve``, driven by unmodified clients:
tritonclient (HTTP and gRPC) for model configuration, statistics and the model repository
(index, load, unload), grpcio-health-checking's and grpcio-reflection's own stubs, requests
for the error bodies. One service with ``ingress.repository_api`` and reflection on (two
ingress replicas, so the statistics are seen to be the replicas', whichever ingress answers);
one with the defaults, briefly, for the refusal. Loopback only; ports follow
MPSSERVE_TEST_PORT_OFFSET."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from mpsserve.ops.demo import make_request, write_demo_model
from tests.conftest import SEED, SMALL
from tests.integration.conftest import PORT_OFFSET
from tests.integration.test_grpc import triton_inputs as grpc_inputs
from tests.integration.test_serving import triton_inputs
from tests.processes import Service, service_config, until

HTTP = 28350 + PORT_OFFSET  # gRPC: HTTP + 1000
HTTP_DEFAULTS = 28360 + PORT_OFFSET
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOAD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def store(tf_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-store")
    shutil.copytree(tf_store / "1", root / "1")
    write_demo_model(root, "tensorflow", version=2, seed=SEED + 1, spec=SMALL)
    return root


def http_client(port: int) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(
        f"127.0.0.1:{port}", connection_timeout=LOAD_TIMEOUT_S, network_timeout=LOAD_TIMEOUT_S
    )


def grpc_client(port: int) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{port + 1000}")


def test_load_and_unload_are_refused_by_default(store: Path, tmp_path: Path) -> None:
    """First in the module, so its service is gone before the module's own starts."""
    config = service_config(store, HTTP_DEFAULTS, "triton-defaults", ingress_replicas=1)
    with Service(tmp_path, config):
        http, grpc_ = http_client(HTTP_DEFAULTS), grpc_client(HTTP_DEFAULTS)
        for call in (http.load_model, http.unload_model):
            with pytest.raises(InferenceServerException) as info:
                call("rec")
            assert "ingress.repository_api" in info.value.message()
        for call in (grpc_.load_model, grpc_.unload_model):
            with pytest.raises(InferenceServerException) as info:
                call("rec")
            assert info.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "ingress.repository_api" in info.value.message()
        assert http.is_model_ready("rec")  # nothing changed
        assert [e["state"] for e in http.get_model_repository_index()] == [
            "UNAVAILABLE",
            "READY",
        ]


@pytest.fixture(scope="module")
def svc(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    config = service_config(store, HTTP, "triton-ext", ingress_replicas=2)
    config["ingress"]["repository_api"] = True
    config["ingress"]["grpc_reflection"] = True
    with Service(tmp_path_factory.mktemp("triton-ext"), config) as service:
        yield service
    assert service.returncode == 0, service.output[-3000:]


def http_inputs(req: dict[str, np.ndarray]) -> list[triton_http.InferInput]:
    return triton_inputs(req, binary=True)


def served_version(port: int = HTTP) -> str:
    result = http_client(port).infer("rec", http_inputs(make_request(SMALL, rows=4, seed=3)))
    return str(result.get_response()["model_version"])


def test_model_config_over_http_and_grpc(svc: Service) -> None:
    config = http_client(HTTP).get_model_config("rec")
    assert config["name"] == "rec" and config["platform"] == "tensorflow_savedmodel"
    assert config["backend"] == "tensorflow" and config["max_batch_size"] == 0
    inputs = {i["name"]: i for i in config["input"]}
    assert inputs["dense"]["data_type"] == "TYPE_FP32" and inputs["dense"]["dims"] == [-1, 13]
    assert inputs["history_lengths"]["data_type"] == "TYPE_INT64"
    assert config["output"][0]["name"] == "score"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"] == [{"name": "rec", "kind": "KIND_CPU", "count": 1}]
    message = grpc_client(HTTP).get_model_config("rec").config
    assert message.name == "rec" and message.max_batch_size == 0
    assert [i.name for i in message.input] == [i["name"] for i in config["input"]]
    assert list(message.input[0].dims) == config["input"][0]["dims"]
    assert message.version_policy.latest.num_versions == 1
    assert message.instance_group[0].kind == message.instance_group[0].KIND_CPU
    assert http_client(HTTP).get_model_config("rec", "2")["name"] == "rec"
    with pytest.raises(InferenceServerException) as info:
        http_client(HTTP).get_model_config("nope")
    assert "unknown model 'nope'" in info.value.message()


def test_statistics_count_every_request_whichever_ingress(svc: Service) -> None:
    http, grpc_ = http_client(HTTP), grpc_client(HTTP)
    before = http.get_inference_statistics("rec")["model_stats"]
    done = sum(entry["inference_count"] for entry in before)
    for seed in range(6):  # new connections: both ingress replicas take some
        req = make_request(SMALL, rows=50, seed=seed)
        http_client(HTTP).infer("rec", http_inputs(req))
        grpc_client(HTTP).infer("rec", grpc_inputs(req))
    [entry] = http.get_inference_statistics("rec", "2")["model_stats"]
    assert entry["name"] == "rec" and entry["version"] == "2"
    assert entry["inference_count"] == entry["execution_count"] == done + 12
    stats = entry["inference_stats"]
    assert stats["success"]["count"] == done + 12
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[part]["count"] == done + 12 and stats[part]["ns"] > 0
    assert stats["compute_infer"]["ns"] <= stats["success"]["ns"]
    assert entry["last_inference"] > 0
    message = grpc_.get_inference_statistics("rec")
    [proto] = [m for m in message.model_stats if m.version == "2"]
    assert proto.inference_count >= done + 12
    assert proto.inference_stats.success.count >= done + 12
    everything = grpc_.get_inference_statistics(as_json=True)["model_stats"]
    assert {m["name"] for m in everything} == {"rec"}
    with pytest.raises(InferenceServerException) as info:
        grpc_.get_inference_statistics("rec", "9")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_over_http_and_grpc(svc: Service) -> None:
    index = http_client(HTTP).get_model_repository_index()
    assert [(e["version"], e["state"]) for e in index] == [("1", "UNAVAILABLE"), ("2", "READY")]
    assert "not selected by version policy latest 1" in index[0]["reason"]
    message = grpc_client(HTTP).get_model_repository_index()
    assert [(m.version, m.state) for m in message.models] == [
        ("1", "UNAVAILABLE"),
        ("2", "READY"),
    ]


def test_load_a_version_then_the_latest_again(svc: Service) -> None:
    pinned = json.dumps({"version_policy": {"specific": {"versions": [1]}}})
    grpc_client(HTTP).load_model("rec", config=pinned, client_timeout=LOAD_TIMEOUT_S)
    assert served_version() == "1"  # the call returned once every replica served it
    index = grpc_client(HTTP).get_model_repository_index(as_json=True)["models"]
    assert {m["version"]: m["state"] for m in index} == {"1": "READY", "2": "UNAVAILABLE"}
    assert http_client(HTTP).get_model_config("rec")["version_policy"] == {
        "specific": {"versions": [1]}
    }
    latest = json.dumps({"version_policy": {"latest": {"num_versions": 1}}})
    http_client(HTTP).load_model("rec", config=latest)
    assert served_version() == "2"
    with pytest.raises(InferenceServerException) as info:
        http_client(HTTP).load_model("rec", config=json.dumps({"version_policy": {"all": {}}}))
    assert "'all' is not served" in info.value.message()


def test_unload_and_load_as_health_watch_sees_it(svc: Service) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{HTTP + 1000}")
    health = health_pb2_grpc.HealthStub(channel)
    ask = health_pb2.HealthCheckRequest
    assert health.Check(ask(service=""), timeout=10).status == SERVING
    assert health.Check(ask(service="rec"), timeout=10).status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(ask(service="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The port is shared by two ingress replicas (SO_REUSEPORT): the watch is on one
    # channel, so on one of them; each ingress looks at the replicas every second, so the
    # other one's answers follow within a few seconds.
    watch = health.Watch(ask(service="rec"), timeout=LOAD_TIMEOUT_S)
    loaded = True
    try:
        assert next(watch).status == SERVING
        http_client(HTTP).unload_model("rec")
        loaded = False
        assert next(watch).status == NOT_SERVING
        until(
            lambda: not any(grpc_client(HTTP).is_model_ready("rec") for _ in range(4)),
            30,
            "four answers in a row (new connections: both ingresses) saying not ready",
        )
        with pytest.raises(InferenceServerException) as refused:
            grpc_client(HTTP).infer("rec", grpc_inputs(make_request(SMALL, rows=2, seed=1)))
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "unloaded" in refused.value.message()
        index = http_client(HTTP).get_model_repository_index()
        assert {e["reason"] for e in index} == {"unloaded"}
        assert health.Check(ask(service=""), timeout=10).status == SERVING  # on purpose
        grpc_client(HTTP).load_model("rec", client_timeout=LOAD_TIMEOUT_S)
        loaded = True
        assert next(watch).status == SERVING
    finally:
        watch.cancel()
        channel.close()
        if not loaded:  # leave the model served for the tests after this one
            grpc_client(HTTP).load_model("rec", client_timeout=LOAD_TIMEOUT_S)
    until(lambda: http_client(HTTP).is_model_ready("rec"), 30, "rec ready on every ingress")
    assert served_version() == "2"


def test_reflection_lists_the_services(svc: Service) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{HTTP + 1000}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_every_error_is_a_json_body_clients_decode(svc: Service) -> None:
    base = f"http://127.0.0.1:{HTTP}"
    wrong = requests.get(f"{base}/v2/models/rec/infer", timeout=10)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert "method not allowed" in wrong.json()["error"]
    missing = requests.get(f"{base}/v2/models/rec/nothing", timeout=10)
    assert missing.status_code == 404 and "no endpoint" in missing.json()["error"]
    other = requests.put(f"{base}/v2/repository/index", timeout=10)
    assert other.status_code == 405 and set(other.json()) == {"error"}
    req = make_request(SMALL, rows=2, seed=1)
    inputs = http_inputs({k: v for k, v in req.items() if k != "cat"})
    strings = triton_http.InferInput("cat", [2, 26], "BYTES")
    strings.set_data_from_numpy(np.full((2, 26), b"a", dtype=object))
    with pytest.raises(InferenceServerException) as info:
        http_client(HTTP).infer("rec", [*inputs, strings])
    assert "has datatype BYTES; the model expects INT64 (int64)" in info.value.message()
    assert "object" not in info.value.message()
