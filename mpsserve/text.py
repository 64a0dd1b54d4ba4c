"""Client-controlled text, made safe before it reaches a log line, a header or a message.

A request id, a model or input name, a version: a client chooses each of them, and each
ends up somewhere a control character or a megabyte does harm (a CR/LF splits a header or
forges an access-log line; a huge name echoed in gRPC metadata makes the client refuse the
answer). These helpers are pure and cheap, so every adapter can call them on every request.
"""

from __future__ import annotations

import uuid

#: Request ids longer than this, or with characters outside visible ASCII, are replaced.
MAX_REQUEST_ID_CHARS = 128
#: Characters of a client-sent name quoted in an error message.
NAME_CHARS = 64
#: Characters of any error message sent to a client (a last bound behind quote()).
MESSAGE_CHARS = 2048


def valid_request_id(value: str) -> bool:
    """1 to 128 visible ASCII characters (0x21-0x7E): safe in an HTTP header, gRPC metadata
    and a space-separated log line (a space could forge a ``key=value`` field)."""
    return (
        0 < len(value) <= MAX_REQUEST_ID_CHARS
        and value.isascii()
        and value.isprintable()
        and (" " not in value)
    )


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def escape(text: str, mark: str = '"') -> str:
    """Control, non-ASCII and ``mark`` characters as backslash escapes: one printable line."""
    return text.encode("unicode_escape").decode("ascii").replace(mark, "\\" + mark)


def quote(name: str, limit: int = NAME_CHARS, mark: str = '"') -> str:
    """A client-sent name for an error message: quoted with ``mark``, escaped, cut after
    ``limit`` characters (``"aaaa..."``), so a 1 MB name costs the client 70 bytes."""
    if len(name) > limit:
        return f"{mark}{escape(name[:limit], mark)}...{mark}"
    return f"{mark}{escape(name, mark)}{mark}"


def log_field(value: str) -> str:
    """A value for the text access log: escaped, and spaces too, so one request is one line
    with the fields the server wrote."""
    return escape(value).replace(" ", "\\x20") if not _plain(value) else value


def _plain(value: str) -> bool:
    return value.isascii() and value.isprintable() and " " not in value and '"' not in value


def bound_message(message: str, limit: int = MESSAGE_CHARS) -> str:
    """An error message cut to ``limit`` characters: the last guard before a transport."""
    return message if len(message) <= limit else message[:limit] + "..."
