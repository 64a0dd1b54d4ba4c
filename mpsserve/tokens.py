"""Bearer tokens for the public ports: the file format, and the set an ingress accepts.

One token per line, optionally ``not_after=<ISO 8601 instant with a zone>``; ``#`` starts a
comment. Several lines are accepted at once, so a rotation is: add the new token, move the
clients, remove the old one. A token is never logged or put in an error message: errors
name the source and the line number only.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from mpsserve.errors import ConfigError

logger = logging.getLogger(__name__)

#: RFC 6750's b64token, 16 characters at least (shorter ones are guessable).
TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]{16,4096}=*$")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Token:
    value: bytes
    not_after: float | None  # epoch seconds; None: never expires

    def valid_at(self, now: float) -> bool:
        return self.not_after is None or now < self.not_after


def _not_after(field: str, where: str) -> float:
    key, _, raw = field.partition("=")
    if key != "not_after" or not raw:
        raise ConfigError(f"{where}: expected 'not_after=<ISO 8601 time>' after the token")
    try:
        instant = datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"{where}: not_after {raw!r} is not an ISO 8601 time") from None
    if instant.tzinfo is None:
        raise ConfigError(f"{where}: not_after {raw!r} needs a zone (e.g. Z or +02:00)")
    return instant.timestamp()


def parse_tokens(text: str, source: str) -> list[Token]:
    """The tokens of ``text``; ConfigError naming ``source`` and the line (never the token)."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}, line {number}"
        if not TOKEN.fullmatch(fields[0]):
            raise ConfigError(
                f"{where}: a token is {MIN_TOKEN_CHARS}+ characters of A-Za-z0-9-._~+/ "
                "(then any '=')"
            )
        if len(fields) > 2:
            raise ConfigError(f"{where}: a token and at most one not_after=... per line")
        expiry = _not_after(fields[1], where) if len(fields) == 2 else None
        tokens.append(Token(fields[0].encode("ascii"), expiry))
    return tokens


def _nonempty(tokens: list[Token], source: str) -> list[Token]:
    if not tokens:
        raise ConfigError(f"{source} holds no token")
    return tokens


def read_token_file(path: str) -> list[Token]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"cannot read token file {path}: {reason}") from None
    return _nonempty(parse_tokens(text, f"token file {path}"), f"token file {path}")


def read_token_env(name: str) -> list[Token]:
    """The tokens in environment variable ``name`` (named by the config, so read here rather
    than through ``settings``, which declares mpsserve's own knobs)."""
    text = os.environ.get(name)
    if not text:
        raise ConfigError(f"environment variable {name} (ingress.auth.token_env) is not set")
    return _nonempty(parse_tokens(text, f"environment variable {name}"), f"variable {name}")


def _file_signature(path: str) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced (a Secret volume swaps a symlink)."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ino, st.st_size


class TokenSet:
    """The tokens an ingress accepts now: the environment's (fixed) and the file's (re-read
    when its status changes, looked at no more than every ``reload_interval_s``, on the
    request path: a monotonic clock read per request, a stat() per interval)."""

    def __init__(
        self,
        token_file: str | None,
        token_env: str | None,
        reload_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.reload_interval_s, self.clock = token_file, reload_interval_s, clock
        self._fixed = read_token_env(token_env) if token_env else []
        self._from_file: Sequence[Token] = []
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()  # the gRPC and HTTP servers may check from two threads
        if token_file is not None:
            self._signature = _file_signature(token_file)
            self._from_file = read_token_file(token_file)

    def accepts(self, presented: bytes) -> bool:
        """Whether ``presented`` is an accepted token now. Every token is compared (in
        constant time), so the answer's timing tells nothing about which one nearly matched."""
        self._maybe_reload()
        now, accepted = self.clock(), False
        for token in (*self._fixed, *self._from_file):
            accepted |= hmac.compare_digest(presented, token.value) and token.valid_at(now)
        return accepted

    def __len__(self) -> int:
        return len(self._fixed) + len(self._from_file)

    def _maybe_reload(self) -> None:
        if self.path is None or time.monotonic() < self._next_check:
            return
        with self._lock:
            if time.monotonic() < self._next_check:
                return
            self._next_check = time.monotonic() + self.reload_interval_s
            self._reload(self.path)

    def _reload(self, path: str) -> None:
        try:
            signature = _file_signature(path)
            if signature == self._signature:
                return
            tokens = parse_tokens(_read_text(path), f"token file {path}")
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            logger.error("token file %s not reloaded, keeping the last good set: %s", path, exc)
            return
        self._signature, self._from_file = signature, tokens
        logger.info("token file %s reloaded: %d token(s)", path, len(tokens))
        if not tokens:
            logger.warning("token file %s holds no token: every request is refused", path)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()
