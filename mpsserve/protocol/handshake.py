"""The data port's handshake: a peer proves it holds the application's transport key before
the replica reads a single frame from it.

On accept the replica sends a challenge: a fresh 32-byte nonce and the ids of the keys it
accepts (the current one and the previous one, newest first). The client answers with the id
of the newest key both hold and HMAC-SHA256(key, CONTEXT || nonce || key id); the replica
checks it with ``hmac.compare_digest`` and answers ``ACCEPTED``, or closes the connection.
Challenge and answer have fixed sizes, so before the proof a replica holds a few dozen bytes
per connection, whatever the peer claims. The handshake is per connection (the ingress pools
them), so it costs nothing per request.

Why key ids and two keys: a redeploy rotates the key (``serving.transport``) and Ray Serve
restarts deployments one replica at a time, so for a while an ingress of the last build talks
to model replicas of the new one and the other way round. Each side holds ``{new, previous}``
or ``{previous, older}``; the ids let the client pick the key both hold instead of failing.
Key ids are random, not derived from the secret, and say nothing about it.

Pure functions and the ``Keyring`` value; sockets live in ``ingress.replica_server`` (server)
and ``ingress.router`` (client).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass

from mpsserve.protocol.frame import FrameError

SECRET_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 32
KEPT = 2  # keys a keyring holds: the current one and the one before it
CONTEXT = b"mpsserve data port v1\x00"

#: magic, nonce, number of key ids, the ids (KEPT slots, unused ones zero)
CHALLENGE = struct.Struct(f"<4s{NONCE_BYTES}sB{KEPT * KEY_ID_BYTES}s")
#: magic, key id, HMAC-SHA256 digest
ANSWER = struct.Struct(f"<4s{KEY_ID_BYTES}s32s")
CHALLENGE_MAGIC = b"MPSC"
ANSWER_MAGIC = b"MPSA"
ACCEPTED = b"MPS+"


class HandshakeError(FrameError):
    """The peers could not authenticate (no key in common, a refused answer): the connection
    is unusable. A ``FrameError``, so the ingress sets the replica aside like one that fails."""


@dataclass(frozen=True, repr=False)
class Keyring:
    """An application's transport keys, ``(key id, secret)`` newest first. Its repr and str
    never show a secret: a keyring in a log line or a traceback says only how many keys."""

    keys: tuple[tuple[bytes, bytes], ...]

    def __repr__(self) -> str:
        return f"Keyring({len(self.keys)} keys)"

    __str__ = __repr__

    @classmethod
    def generate(cls) -> Keyring:
        return cls(((secrets.token_bytes(KEY_ID_BYTES), secrets.token_bytes(SECRET_BYTES)),))

    def rotated(self) -> Keyring:
        """A new current key; the current one becomes the previous one, older ones go."""
        return Keyring(Keyring.generate().keys + self.keys[: KEPT - 1])

    def ids(self) -> list[bytes]:
        return [key_id for key_id, _ in self.keys]

    def secret(self, key_id: bytes) -> bytes | None:
        return next((s for i, s in self.keys if hmac.compare_digest(i, key_id)), None)

    def dump(self) -> bytes:
        """For Ray's internal KV (``serving.transport``); never for a log or a file."""
        return json.dumps([[i.hex(), s.hex()] for i, s in self.keys]).encode()

    @classmethod
    def load(cls, raw: bytes) -> Keyring:
        pairs = json.loads(raw)
        return cls(tuple((bytes.fromhex(i), bytes.fromhex(s)) for i, s in pairs[:KEPT]))


def _mac(secret: bytes, nonce: bytes, key_id: bytes) -> bytes:
    return hmac.new(secret, CONTEXT + nonce + key_id, hashlib.sha256).digest()


def challenge(ring: Keyring) -> tuple[bytes, bytes]:
    """(nonce, the challenge message) for a new connection."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    ids = ring.ids()[:KEPT]
    slots = b"".join(ids).ljust(KEPT * KEY_ID_BYTES, b"\0")
    return nonce, CHALLENGE.pack(CHALLENGE_MAGIC, nonce, len(ids), slots)


def answer(ring: Keyring, message: bytes) -> bytes:
    """The client's answer to a challenge, with the newest key both sides hold."""
    if len(message) != CHALLENGE.size:
        raise HandshakeError("the data port closed the connection before its challenge")
    magic, nonce, count, slots = CHALLENGE.unpack(message)
    if magic != CHALLENGE_MAGIC or count > KEPT:
        raise HandshakeError("the data port did not send a handshake challenge")
    offered = {slots[k * KEY_ID_BYTES : (k + 1) * KEY_ID_BYTES] for k in range(count)}
    for key_id, secret in ring.keys:
        if key_id in offered:
            return ANSWER.pack(ANSWER_MAGIC, key_id, _mac(secret, nonce, key_id))
    raise HandshakeError(
        "the replica accepts none of this process's transport keys (a redeploy rotated them "
        "twice within a refresh, or the replica belongs to another application)"
    )


def verify(ring: Keyring, nonce: bytes, message: bytes) -> bool:
    """Whether ``message`` proves its sender holds a key of ``ring`` for this ``nonce``."""
    magic, key_id, digest = ANSWER.unpack(message)
    secret = ring.secret(key_id)
    if magic != ANSWER_MAGIC or secret is None:
        return False
    return hmac.compare_digest(digest, _mac(secret, nonce, key_id))
