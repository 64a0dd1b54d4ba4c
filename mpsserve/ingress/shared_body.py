"""Request bodies through shared memory, between an ingress and a model replica on one node.

On the data port a 2000-row request is ~0.6 MB of tensors: through the loopback socket the
kernel copies it out of the ingress and into the replica, in many reads. When both ends are on
one node, the ingress instead copies the body into a shared segment (``/dev/shm``, a file only
its user can open) and sends a frame whose header names it (``frame.out_of_band``); the replica
copies it out once into its own buffer and answers as usual. One segment per pooled
connection: a connection carries one exchange at a time and the segment is written again only
after the answer, so the replica's copy is never torn. The replica copies rather than reading
the segment in place so that nothing the ingress writes later can change a request after it
was validated.

What keeps it bounded and safe: a segment is reserved with ``posix_fallocate`` when it is
created (a full ``/dev/shm`` is an error here, then the body goes through the socket, never a
SIGBUS later); it grows by powers of two up to the largest body sent (``max_request_bytes``
bounds it); its name is unlinked as soon as the replica has answered a frame through it (both
ends keep their mapping), so a killed process leaves no file behind; the replica opens only
names of this form, regular files of its own user, without following links, read-only, and no
larger than the frame limit. A replica that cannot open the segment (another mount namespace,
shared memory off) answers ``shm: unavailable`` and the ingress sends that replica's bodies
through the socket from then on.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from mpsserve.protocol import frame

SHM_DIR = Path("/dev/shm")
PREFIX = "mpsserve-body-"
NAME = re.compile(rf"^{PREFIX}\d+-[0-9a-f]{{32}}$")
#: Bodies smaller than this go through the socket: a copy there costs less than the round.
MIN_BYTES = 64 * 1024
FIRST_BYTES = 1 << 20
UNAVAILABLE = "unavailable"


class SharedBodyUnavailable(Exception):
    """This end cannot use the named segment: the body must go through the socket."""


class Outbox:
    """The ingress end: one connection's segment, written before each frame that uses it."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self.name = ""
        self._map: mmap.mmap | None = None
        self._linked = False  # the name still exists (the replica has not answered yet)

    def put(self, chunks: Sequence[frame.Buffer], size: int) -> str | None:
        """Copy ``chunks`` (``size`` bytes) into the segment; its name, or None when no
        segment can hold them (then the caller sends them through the socket)."""
        if (self._map is None or len(self._map) < size) and not self._grow(size):
            return None
        assert self._map is not None
        view, offset = memoryview(self._map), 0
        for chunk in chunks:
            raw = memoryview(chunk).cast("B")
            view[offset : offset + raw.nbytes] = raw
            offset += raw.nbytes
        view.release()
        return self.name

    def answered(self) -> None:
        """The replica answered a frame through the segment, so it holds its own mapping:
        the name can go (nothing is left in /dev/shm if this process is killed)."""
        if self._linked:
            self._unlink()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._linked:
            self._unlink()

    def _grow(self, size: int) -> bool:
        self.close()
        capacity = max(FIRST_BYTES, 1 << (size - 1).bit_length())
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, capacity)  # ENOSPC now rather than SIGBUS on a write
            self._map = mmap.mmap(fd, capacity)
        except OSError:
            path.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)
        self.name, self._linked = name, True
        return True

    def _unlink(self) -> None:
        (self.directory / self.name).unlink(missing_ok=True)
        self._linked = False


class Inbox:
    """The replica end: the mapping of the segment one connection's peer writes into."""

    def __init__(self, directory: Path = SHM_DIR) -> None:
        self.directory = directory
        self.name = ""
        self._map: mmap.mmap | None = None

    def take(self, spec: object, max_bytes: int) -> bytearray:
        """A private copy of the body a frame's ``shm`` field names (``[name, size]``).
        FrameError for a field no ingress sends; SharedBodyUnavailable when the segment
        cannot be used here."""
        if (
            not isinstance(spec, list)
            or len(spec) != 2
            or not isinstance(spec[0], str)
            or not NAME.match(spec[0])
            or not isinstance(spec[1], int)
            or not 0 <= spec[1] <= max_bytes
        ):
            raise frame.FrameError("malformed shared-body field in a frame header")
        name, size = spec
        if name != self.name:
            self._open(name)
        assert self._map is not None
        if size > len(self._map):
            raise frame.FrameError(f"shared body of {size} bytes overruns its segment")
        with memoryview(self._map) as view:
            return bytearray(view[:size])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self.name = ""

    def _open(self, name: str) -> None:
        self.close()
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise SharedBodyUnavailable(f"cannot open the shared body: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise SharedBodyUnavailable("the shared body is not this user's regular file")
            if info.st_size == 0:
                raise SharedBodyUnavailable("the shared body's segment is empty")
            self._map = mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
