"""The replica transport's key and bounds, as the app hands them to its deployments.

Where the key lives, and why there. The app builder (``serving.app``, which Serve runs again
at every redeploy that changes the application's args) generates a fresh key with ``secrets`` and
stores the application's keyring (that key and the previous one) in Ray's internal KV,
under the application's name; the ingress and model replicas read it from there when they
start and every ``REFRESH_S`` after. The deployments' init args carry only the KV entry's
name and the bounds (``TransportSpec``), never a secret. The alternatives were worse:
- init args: Serve restarts deployments one replica at a time, so replicas of the last build
  and of the new one serve side by side; each would know only its own key. Init args are
  also kept by Serve's controller and shown in its checkpoints.
- ``user_config``: shown by ``serve status``, the dashboard and Serve's REST API.
- Ray's cluster token (``RAY_AUTH_MODE=token``, Ray 2.52+): off by default, one per cluster
  (every application and job would share it) and not rotated by a redeploy. Where it is on,
  it guards the KV this module uses, so it complements the per-app key.
Anyone who can read Ray's KV can already run code in every replica, so the KV is no weaker
than the replicas themselves; the data port is what was open to the network.

Rotation: a build makes ``{new, previous}``. A replica of the new build accepts the previous
key too, so an ingress of the last build keeps serving until it is replaced; an ingress of
the new build picks the previous key for an old replica (the challenge lists the ids each
side holds). Replicas that a build did not restart pick the new keyring up within
``REFRESH_S``. The keyring is never logged, and neither its repr nor any metadata shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mpsserve.config import ServiceConfig, SharedConfig
from mpsserve.errors import ModelNotReady
from mpsserve.periodic import Periodic
from mpsserve.protocol.handshake import Keyring

logger = logging.getLogger(__name__)

KV_NAMESPACE = "mpsserve"
REFRESH_S = 2.0
#: the first allocation for a frame's body; larger bodies grow (doubling) as bytes arrive
FIRST_BODY_CHUNK = 4 * 2**20


@dataclass(frozen=True)
class WireLimits:
    """Bounds of the data port, for both ends (``TransportConfig`` in bytes and seconds)."""

    max_header_bytes: int = 64 * 2**10
    max_request_bytes: int = 64 * 2**20
    max_response_bytes: int = 64 * 2**20
    handshake_timeout_s: float = 2.0
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 10.0
    max_connections: int = 256

    @classmethod
    def of(cls, config: ServiceConfig | SharedConfig) -> WireLimits:
        transport = config.transport
        return cls(
            max_header_bytes=transport.max_header_kb * 2**10,
            max_request_bytes=int(config.ingress.max_request_mb * 2**20),
            max_response_bytes=int(transport.max_response_mb * 2**20),
            handshake_timeout_s=transport.handshake_timeout_s,
            idle_timeout_s=transport.idle_timeout_s,
            read_timeout_s=transport.read_timeout_s,
            max_connections=transport.max_connections,
        )


@dataclass(frozen=True)
class TransportSpec:
    """What each deployment gets from the app builder: where the keyring is, the bounds,
    the bind address. No secret."""

    keys_name: str
    limits: WireLimits = field(default_factory=WireLimits)
    bind_host: str | None = None

    @classmethod
    def of(cls, config: ServiceConfig | SharedConfig) -> TransportSpec:
        return cls(config.ray.app_name, WireLimits.of(config), config.transport.bind_host)

    def hosts(self) -> tuple[str, str]:
        """(address to bind, address to advertise in the directory)."""
        import ray

        node = ray.util.get_node_ip_address()
        bind = self.bind_host or node
        return bind, node if bind in ("0.0.0.0", "::", "") else bind


def _kv_key(name: str) -> bytes:
    return f"transport-keys/{name}".encode()


def rotate(name: str) -> Keyring:
    """A new current key for application ``name`` (the old current one stays as previous);
    called by the app builder, so each build rotates."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_kv_key(name), namespace=KV_NAMESPACE)
    ring = Keyring.load(raw).rotated() if raw else Keyring.generate()
    internal_kv._internal_kv_put(_kv_key(name), ring.dump(), overwrite=True, namespace=KV_NAMESPACE)
    return ring


def load(name: str) -> Keyring:
    """Application ``name``'s keyring, as the last build stored it."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_kv_key(name), namespace=KV_NAMESPACE)
    if not raw:
        raise ModelNotReady(
            f"application {name!r} has no transport key in Ray's KV (apps are built by "
            "mpsserve.serving.app, which makes one)"
        )
    return Keyring.load(raw)


class KeyWatcher(Periodic):
    """Holds this process's keyring and reloads it every ``REFRESH_S`` (a redeploy that did
    not restart this replica rotated it); ``get`` is what the data port's ends call. While
    the GCS restarts the keys it has stay (``Periodic`` logs the failed reloads)."""

    def __init__(self, name: str, read: Callable[[str], Keyring] = load) -> None:
        super().__init__("transport-keys", REFRESH_S, self._reload, immediately=False)
        self._name, self._read = name, read
        self._ring = read(name)  # at start: a replica without a key must not come up

    def get(self) -> Keyring:
        return self._ring

    def _reload(self) -> None:
        try:
            self._ring = self._read(self._name)
        except Exception as exc:  # its text may quote what was read: name the type only
            raise RuntimeError(f"cannot reload the transport keys: {type(exc).__name__}") from None
