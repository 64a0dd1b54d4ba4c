"""The model repository: ``<base>/<version>/`` with integer versions, as TF Serving lays it out.

Any fsspec URI works for listing (``file://``, a plain path, ``memory://``, ``s3://`` with
s3fs installed). A remote version is copied into a local cache directory before a runtime
loads it. Watching, policies beyond ``latest`` and the per-node shared cache come with the
store issue; this module is where they go.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import fsspec

from mpsserve.errors import ModelLoadError, ModelNotReady

logger = logging.getLogger(__name__)


def _split(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise ModelLoadError(f"cannot open model store {uri!r}: {exc}") from exc
    return fs, path.rstrip("/")


class ModelStore:
    """Versions of one model under a base URI."""

    def __init__(self, uri: str, cache_dir: Path) -> None:
        self.uri = uri
        self._fs, self._base = _split(uri)
        self._cache = cache_dir
        self.is_local = "file" in (
            self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        )

    def versions(self) -> list[int]:
        """Complete versions, oldest first: integer-named, non-empty directories."""
        try:
            entries = self._fs.ls(self._base, detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ModelLoadError(f"cannot list model store {self.uri!r}: {exc}") from exc
        found = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.isdigit() and self._is_dir(entry) and self._fs.ls(entry["name"]):
                found.append(int(name))
        return sorted(found)

    def _is_dir(self, entry: dict[str, object]) -> bool:
        """Directories, including local symlinks to one (fsspec reports those as links)."""
        return entry["type"] == "directory" or bool(
            entry.get("islink") and self._fs.isdir(entry["name"])
        )

    def latest(self) -> int:
        """The newest complete version; ModelNotReady when the store holds none."""
        versions = self.versions()
        if not versions:
            raise ModelNotReady(f"model store {self.uri!r} holds no version yet")
        return versions[-1]

    def local_path(self, version: int) -> Path:
        """A local directory holding ``version``, copied into the cache when remote."""
        source = f"{self._base}/{version}"
        if self.is_local:
            return Path(source)
        target = self._cache / str(version)
        if not target.exists():
            partial = self._cache / f".{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            logger.info("copying %s/%d into %s", self.uri, version, target)
            try:
                self._fs.get(source + "/", str(partial), recursive=True)
            except OSError as exc:
                raise ModelLoadError(f"cannot copy {self.uri}/{version}: {exc}") from exc
            partial.rename(target)
        return target
