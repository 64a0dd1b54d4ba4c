"""Issue 14 item 4 against a running service: ONE ``mpsserve serve`` with bearer tokens, TLS
and mutual TLS on both public ports, driven by real clients (tritonclient HTTP and gRPC,
grpcio, requests, curl). Loopback only; the service is shared by the whole module."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from mpsserve.ops.demo import make_request
from tests.certs import Pki, make_pki
from tests.conftest import SMALL
from tests.integration.test_ingress_limits import ingress_pids, rss_mb
from tests.processes import Service, service_config

HTTP = 28800  # gRPC: HTTP + 1000
GOOD = "integration-good-token-0123456789"
NEXT = "integration-next-token-0123456789"
WRONG = "integration-wrong-token-012345678"
RELOAD_S = 0.5


class Secured:
    def __init__(self, service: Service, pki: Pki, tokens: Path) -> None:
        self.service, self.pki, self.tokens = service, pki, tokens
        self.url = f"https://127.0.0.1:{HTTP}"
        self.body = service.request_body()

    @property
    def cert(self) -> tuple[str, str]:
        return str(self.pki.client_cert), str(self.pki.client_key)

    def post(self, token: str | None, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs.setdefault("cert", self.cert)
        return requests.post(
            f"{self.url}/v2/models/rec/infer",
            data=self.body,
            headers=headers,
            verify=str(self.pki.ca),
            timeout=30,
            **kwargs,
        )

    def triton_http(self) -> triton_http.InferenceServerClient:
        return triton_http.InferenceServerClient(
            f"127.0.0.1:{HTTP}",
            ssl=True,
            ssl_options={
                "ca_certs": str(self.pki.ca),
                "certfile": str(self.pki.client_cert),
                "keyfile": str(self.pki.client_key),
            },
        )

    def triton_grpc(self, client_cert: bool = True) -> triton_grpc.InferenceServerClient:
        pki = self.pki
        return triton_grpc.InferenceServerClient(
            f"127.0.0.1:{HTTP + 1000}",
            ssl=True,
            root_certificates=str(pki.ca),
            private_key=str(pki.client_key) if client_cert else None,
            certificate_chain=str(pki.client_cert) if client_cert else None,
        )


@pytest.fixture(scope="module")
def secured(tf_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    cwd = tmp_path_factory.mktemp("secured")
    pki = make_pki(cwd)
    tokens = cwd / "tokens"
    tokens.write_text(f"# issued for the test\n{GOOD}\n")
    config = service_config(tf_store, HTTP, "secured", ingress_replicas=1)
    config["ingress"]["auth"] = {"token_file": "tokens", "reload_interval_s": RELOAD_S}
    config["ingress"]["tls"] = {
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "client_ca_file": str(pki.ca),
    }
    with Service(cwd, config) as service:
        yield Secured(service, pki, tokens)
    assert service.returncode == 0, service.output[-3000:]


def test_banner_says_what_protects_the_ports(secured: Secured) -> None:
    banner = secured.service.banner
    assert "public ports:     bearer tokens (health probes exempt), mutual TLS" in banner
    assert f"https://127.0.0.1:{HTTP}/v2/models/rec/infer" in banner
    assert 'Authorization: Bearer $TOKEN"' in banner and GOOD not in banner


def triton_inputs(protocol: Any) -> list[Any]:
    inputs = []
    for name, array in make_request(SMALL, rows=8, seed=1).items():
        datatype = {"int64": "INT64", "float32": "FP32", "int32": "INT32"}[array.dtype.name]
        tensor = protocol.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_tritonclient_http_with_token_and_client_certificate(secured: Secured) -> None:
    client = secured.triton_http()
    good = {"Authorization": f"Bearer {GOOD}"}
    result = client.infer("rec", triton_inputs(triton_http), headers=good)
    assert result.as_numpy("score").shape == (8,)
    assert client.is_server_live()  # health: exempt, no token
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("rec", triton_inputs(triton_http), headers=headers)
        assert info.value.status() == "401", info.value
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("rec", headers=headers)
    client.close()


def test_tritonclient_grpc_with_token_and_client_certificate(secured: Secured) -> None:
    client = secured.triton_grpc()
    good = {"authorization": f"Bearer {GOOD}"}
    result = client.infer("rec", triton_inputs(triton_grpc), headers=good)
    assert np.isfinite(result.as_numpy("score")).all()
    assert client.is_server_live() and client.is_server_ready()  # exempt
    for headers in ({}, {"authorization": f"Bearer {WRONG}"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("rec", triton_inputs(triton_grpc), headers=headers)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
    client.close()


def test_grpcio_without_a_client_certificate_is_refused(secured: Secured) -> None:
    client = secured.triton_grpc(client_cert=False)
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live()
    assert "UNAVAILABLE" in str(info.value.status())
    client.close()


def test_http_without_a_client_certificate_is_refused(secured: Secured) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        secured.post(GOOD, cert=None)
    rogue = (str(secured.pki.rogue_cert), str(secured.pki.rogue_key))
    with pytest.raises(requests.exceptions.ConnectionError):
        secured.post(GOOD, cert=rogue)


def test_plain_http_and_insecure_grpc_are_refused(secured: Secured) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{HTTP}/v2/health/live", timeout=5)
    with (
        grpc.insecure_channel(f"127.0.0.1:{HTTP + 1000}") as channel,
        pytest.raises(grpc.FutureTimeoutError),
    ):
        grpc.channel_ready_future(channel).result(timeout=3)


def test_health_endpoints_are_exempt(secured: Secured) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/-/healthz"):
        answer = requests.get(
            secured.url + path, verify=str(secured.pki.ca), cert=secured.cert, timeout=10
        )
        assert answer.status_code == 200, path
    answer = requests.get(
        secured.url + "/v2/models/rec", verify=str(secured.pki.ca), cert=secured.cert, timeout=10
    )
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "bearer token" in answer.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_with_cacert_and_token(secured: Secured) -> None:
    body = secured.service.cwd / ".mpsserve" / "request-rec.json"
    done = subprocess.run(
        [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "--cacert", str(secured.pki.ca),
            "--cert", str(secured.pki.client_cert), "--key", str(secured.pki.client_key),
            "-H", f"Authorization: Bearer {GOOD}", "-H", "Content-Type: application/json",
            "--data-binary", f"@{body}", f"{secured.url}/v2/models/rec/infer",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == "200", done.stderr


def test_rotation_and_removal_without_restart(secured: Secured) -> None:
    secured.tokens.write_text(f"{GOOD}\n{NEXT}\n")  # both during the switch
    time.sleep(RELOAD_S * 3)
    assert secured.post(NEXT).status_code == 200 and secured.post(GOOD).status_code == 200
    secured.tokens.write_text(f"{NEXT}\n{GOOD} not_after=2001-01-01T00:00:00Z\n")
    time.sleep(RELOAD_S * 3)
    assert secured.post(GOOD).status_code == 401  # expired
    secured.tokens.write_text(f"{NEXT}\n")
    time.sleep(RELOAD_S * 3)
    assert secured.post(GOOD).status_code == 401  # removed
    assert secured.post(NEXT).status_code == 200
    secured.tokens.write_text(f"{GOOD}\n")
    time.sleep(RELOAD_S * 3)


def test_an_unauthenticated_body_is_not_read(secured: Secured) -> None:
    """50 MB claimed with a wrong token, 20 connections: 401 each at once, RSS flat."""
    (pid,) = ingress_pids(HTTP)
    before = rss_mb(pid)
    context = ssl.create_default_context(cafile=str(secured.pki.ca))
    context.load_cert_chain(*secured.cert)
    head = (
        b"POST /v2/models/rec/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n"
        + f"Authorization: Bearer {WRONG}\r\n\r\n".encode()
    )
    for _ in range(20):
        with (
            socket.create_connection(("127.0.0.1", HTTP), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            started = time.monotonic()
            sock.sendall(head + b"\0" * 65536)  # the start of the body: dropped unread
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
            assert time.monotonic() - started < 2.0
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert rss_mb(pid) - before < 50
    assert secured.post(GOOD).status_code == 200
