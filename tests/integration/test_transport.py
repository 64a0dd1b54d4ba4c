"""The model replica's data port against a peer without the application's key, on the
session's deployed app (loopback only, a handful of connections, bounded in time): it serves
nothing, allocates nothing for claimed sizes, public metadata shows no pid, port or path, and
the ingress keeps answering meanwhile."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import requests
import tritonclient.grpc as triton

from mpsserve.ingress import transport
from mpsserve.ingress.router import call_replica
from mpsserve.ops.demo import make_request
from mpsserve.protocol import frame, handshake
from mpsserve.protocol.handshake import Keyring
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SMALL
from tests.sockets import closed_after

HANDSHAKE_S = 2.0  # transport.handshake_timeout_s's default, which the session's app uses


def replica_entry() -> dict[str, Any]:
    """The model replica's data port, as it published it to Serve."""
    from ray import serve

    handle = serve.get_deployment_handle("model-rec", app_name="mpsserve")
    [metadata] = handle.broadcast("metadata").results(timeout_s=10)
    return {"host": metadata["host"], "port": metadata["data_port"], "pid": metadata["pid"]}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def connect(entry: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection((entry["host"], entry["port"]), timeout=10)
    assert len(sock.recv(handshake.CHALLENGE.size, socket.MSG_WAITALL)) == handshake.CHALLENGE.size
    return sock


def infer_ok(base_url: str) -> bool:
    body = encode_json_request(make_request(SMALL, rows=16, seed=5))
    answer = requests.post(
        f"{base_url}/v2/models/rec/infer",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    return answer.status_code == 200


def test_the_data_port_binds_the_configured_address_and_serves_key_holders(
    base_url: str,
) -> None:
    entry = replica_entry()
    assert entry["host"] == "127.0.0.1"  # transport.bind_host in the session's config
    answer = call_replica(
        entry["host"], entry["port"], {"op": "metadata"}, transport.load("mpsserve")
    )
    assert answer["metadata"]["pid"] == entry["pid"]  # internal tools still see it


def test_a_peer_without_the_key_gets_no_inference_and_no_metadata(base_url: str) -> None:
    entry = replica_entry()
    metadata = b"".join(bytes(p) for p in frame.encode({"op": "metadata"}))
    bare = connect(entry)
    bare.sendall(metadata)  # a frame where the proof belongs
    forged = connect(entry)
    forged.sendall(handshake.ANSWER.pack(handshake.ANSWER_MAGIC, b"\0" * 8, b"\0" * 32) + metadata)
    assert closed_after(bare, 10)[0] == b"" and closed_after(forged, 10)[0] == b""
    stranger = Keyring.generate()
    try:
        call_replica(entry["host"], entry["port"], {"op": "metadata"}, stranger)
        raise AssertionError("a stranger's key was served")
    except handshake.HandshakeError:
        pass
    assert infer_ok(base_url)


def test_claimed_sizes_do_not_grow_the_replica(base_url: str) -> None:
    """Four connections claim a 2 GiB header each (4 GiB with the old port) and sit; the
    replica grows by a few MB at most, closes them after the handshake timeout, and the
    ingress's requests are answered meanwhile."""
    entry = replica_entry()
    before = rss_bytes(entry["pid"])
    liars = [connect(entry) for _ in range(4)]
    started = time.monotonic()
    for sock in liars:
        sock.sendall(frame.PREFIX.pack(frame.MAGIC, 2**31 - 1, 0))
    assert infer_ok(base_url)
    grown = rss_bytes(entry["pid"]) - before
    assert grown < 16 * 2**20, f"the replica grew {grown / 2**20:.0f} MiB"
    assert all(closed_after(sock, 10)[0] == b"" for sock in liars)
    assert time.monotonic() - started < HANDSHAKE_S + 3
    assert infer_ok(base_url)


def test_public_metadata_has_no_pid_port_or_path(
    base_url: str, grpc_address: str, tf_store: Path
) -> None:
    entry = replica_entry()
    secrets = [str(entry["pid"]), str(entry["port"]), str(tf_store), "/tmp/"]
    rest = requests.get(f"{base_url}/v2/models/rec", timeout=10)
    assert rest.status_code == 200
    assert set(rest.json()) <= {
        "name",
        "versions",
        "platform",
        "inputs",
        "outputs",
        "ragged_features",
    }
    grpc_meta = str(
        triton.InferenceServerClient(grpc_address).get_model_metadata("rec", as_json=True)
    )
    tfs = requests.get(f"{base_url}/v1/models/rec", timeout=10).text
    for text in (rest.text, grpc_meta, tfs):
        assert not [s for s in secrets if s in text], text
