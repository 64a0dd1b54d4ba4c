"""The model repository: ``<base>/<version>/`` with integer versions, as TF Serving lays it out.

Every backend goes through fsspec (a plain path, ``file://``, ``memory://``, ``s3://``,
``gs://``, ``hdfs://``); only ``storage_options`` differ. A version counts when it holds the
runtime's required files and, for writers that upload file by file, a marker file written last.
Remote versions are copied once per node into a cache shared by every replica there: a file
lock per version makes one process download while the others wait, and a manifest of the
remote listing tells a valid cached copy from a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from mpsserve.config import VersionPolicy
from mpsserve.errors import ModelLoadError, ModelNotReady
from mpsserve.locks import file_lock

logger = logging.getLogger(__name__)

#: Written inside each cached version: remote file -> size and content tag.
MANIFEST = ".mpsserve-manifest.json"
#: Info keys fsspec backends use for a content tag (s3, gcs, local and hdfs, memory).
_TAG_KEYS = ("ETag", "etag", "md5Hash", "md5", "LastModified", "updated", "mtime", "created")

Files = dict[str, dict[str, Any]]  # path relative to the version -> fsspec info


@dataclass(frozen=True)
class Scan:
    """One look at the store: complete versions, and why each other version does not count."""

    complete: list[int] = field(default_factory=list)  # ascending
    skipped: dict[int, str] = field(default_factory=dict)  # version -> reason


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _version_of(name: str) -> int | None:
    """The version a name stands for; None for anything else (``007`` too: it would alias 7)."""
    if name.isascii() and name.isdigit() and str(int(name)) == name:
        return int(name)
    return None


def _tag(info: dict[str, Any]) -> str | None:
    """A content tag that changes when a file is rewritten, when the backend gives one."""
    for key in _TAG_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return None


def _manifest(files: Files) -> dict[str, dict[str, Any]]:
    return {
        rel: {"size": int(info["size"]), "tag": _tag(info)}
        for rel, info in sorted(files.items())
        if info["type"] != "directory"
    }


class ModelStore:
    """Versions of one model under a base URI, and a node-local cache of remote versions."""

    def __init__(
        self,
        uri: str,
        cache_dir: Path,
        required_files: tuple[str, ...] = (),
        marker: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.uri = uri
        self.required_files = tuple(required_files)
        self.marker = marker
        try:
            self._fs, base = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        except (ImportError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"cannot open model store {uri!r}: {exc}") from exc
        self._base: str = base.rstrip("/")
        self._cache = Path(cache_dir)
        protocol = self._fs.protocol
        self.is_local = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def scan(self) -> Scan:
        """List the base once, then each integer-named entry once; nothing is read twice.

        Listings bypass fsspec's listing cache: a watcher polls this and must see new uploads.
        """
        try:
            entries = self._fs.ls(self._base, detail=True, refresh=True)
        except FileNotFoundError:
            return Scan()
        except Exception as exc:  # backends raise their own types (botocore, pyarrow, ...)
            raise ModelLoadError(f"cannot list model store {self.uri!r}: {exc}") from exc
        complete: list[int] = []
        skipped: dict[int, str] = {}
        for entry in entries:
            version = _version_of(_name(entry["name"]))
            if version is None:
                continue
            reason = self._check_entry(entry)
            if reason is None:
                complete.append(version)
            else:
                skipped[version] = reason
        return Scan(sorted(complete), dict(sorted(skipped.items())))

    def _check_entry(self, entry: dict[str, Any]) -> str | None:
        """Why a listed version does not count, or None when it does."""
        if not self._is_dir(entry):
            return "not a directory"
        path = entry["name"].rstrip("/")
        try:
            listed = self._fs.ls(path, detail=True, refresh=True)
            # An S3 "directory" may be a zero-byte placeholder key named like itself: not content.
            names = {_name(e["name"]) for e in listed if e["name"].rstrip("/") != path}
            wanted = (*self.required_files, self.marker or "")
            nested = {f for f in wanted if "/" in f and self._fs.exists(f"{path}/{f}")}
        except FileNotFoundError:  # S3 has no empty directories: gone while we looked
            return "empty"
        except Exception as exc:
            return f"unreadable: {exc}"
        return self._why_incomplete(lambda f: f in names or f in nested, empty=not names)

    def _is_dir(self, entry: dict[str, Any]) -> bool:
        """Directories, including local symlinks to one (some fsspec versions say 'link')."""
        return entry["type"] == "directory" or bool(
            entry.get("islink") and self._fs.isdir(entry["name"])
        )

    def _why_incomplete(self, present: Callable[[str], bool], empty: bool) -> str | None:
        """Every reason a version is incomplete, joined; None when it is complete."""
        if empty:
            return "empty"
        problems = [f"no {f}" for f in self.required_files if not present(f)]
        if self.marker and not present(self.marker):
            problems.append(f"marker {self.marker} missing")
        return "; ".join(problems) or None

    def versions(self) -> list[int]:
        """Complete versions, oldest first."""
        return self.scan().complete

    def latest(self) -> int:
        """The newest complete version; ModelNotReady when the store holds none."""
        scan = self.scan()
        if not scan.complete:
            why = "".join(f"; {v}: {r}" for v, r in scan.skipped.items())
            raise ModelNotReady(f"model store {self.uri!r} holds no complete version yet{why}")
        return scan.complete[-1]

    def select(self, policy: VersionPolicy) -> list[int]:
        """The versions a policy serves, ascending (``VersionPolicy.selected``); empty when
        none qualifies."""
        return policy.selected(self.scan().complete)

    def fetch(self, version: int) -> Path:
        """A local directory holding ``version``, ready to load; ModelLoadError otherwise.

        Local stores are read in place. Remote versions land in ``cache_dir/<version>``, once
        per node: under the version's file lock, a cached copy whose manifest matches the
        remote listing is reused; anything else is downloaded, verified and renamed in.
        """
        if self.is_local:
            self._listing(version)
            return Path(self._version_path(version))
        with file_lock(self._cache / f".{version}.lock"):
            files = self._listing(version)
            target = self._cache / str(version)
            if self._cached_ok(target, files):
                return target
            if target.exists():
                logger.info("cached %s differs from the store; fetching again", target)
            self._download(version, files, target)
            return target

    def _version_path(self, version: int) -> str:
        return f"{self._base}/{version}"

    def fingerprint(self, version: int) -> str:
        """A digest of the version's files (names, sizes, content tags: ETag, mtime, ...):
        it changes when any file is added, grows or is rewritten, so a version that failed
        to load is tried again once its files change (a slow upload completing)."""
        digest = hashlib.sha256(json.dumps(_manifest(self._files(version))).encode())
        return digest.hexdigest()[:16]

    def _files(self, version: int) -> Files:
        """Every file and directory under the version, complete or not."""
        root = self._version_path(version)
        try:
            self._fs.invalidate_cache(root)
            found = self._fs.find(root, withdirs=True, detail=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot list {self.uri}/{version}: {exc}") from exc
        files: Files = {}
        for path, info in found.items():
            if path.startswith(root + "/") and path.rstrip("/") != root:
                files[path[len(root) + 1 :].rstrip("/")] = info
        return files

    def _listing(self, version: int) -> Files:
        """Every file and directory of a complete version; ModelLoadError when it is not."""
        files = self._files(version)
        only = {rel for rel, info in files.items() if info["type"] != "directory"}
        if not only:
            raise ModelLoadError(f"version {version} of {self.uri} is missing or empty")
        reason = self._why_incomplete(lambda f: f in only, empty=False)
        if reason is not None:
            raise ModelLoadError(f"version {version} of {self.uri} is incomplete: {reason}")
        return files

    def _cached_ok(self, target: Path, files: Files) -> bool:
        """A cached copy counts only if it was made from this very remote listing."""
        try:
            recorded = json.loads((target / MANIFEST).read_text())
            expected = _manifest(files)
            return bool(recorded == expected) and all(
                (target / rel).stat().st_size == entry["size"] for rel, entry in expected.items()
            )
        except (OSError, ValueError):
            return False

    def _download(self, version: int, files: Files, target: Path) -> None:
        """Copy into a temporary sibling, verify sizes, write the manifest, rename into place.

        The caller holds the version's lock, so leftovers of a crashed download are ours to
        delete; whatever fails, no partial copy stays behind.
        """
        for stale in self._cache.glob(f".{version}.*-*"):  # download-, stale-, pruned-
            shutil.rmtree(stale, ignore_errors=True)
        partial = self._cache / f".{version}.download-{uuid.uuid4().hex[:12]}"
        manifest = _manifest(files)
        size = sum(entry["size"] for entry in manifest.values())
        root, source = self._version_path(version), f"{self.uri}/{version}"
        logger.info("download starts: %s (%d bytes) into %s", source, size, target)
        started = time.monotonic()
        try:
            partial.mkdir(parents=True)
            for rel, info in files.items():
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                if info["type"] == "directory":
                    (partial / rel).mkdir(exist_ok=True)
            self._fs.get(
                [f"{root}/{rel}" for rel in manifest], [str(partial / r) for r in manifest]
            )
            _verify(partial, manifest, source)
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _replace(partial, target)
        except ModelLoadError:
            raise
        except Exception as exc:  # any backend's failure, including the version vanishing
            raise ModelLoadError(f"cannot download {source}: {exc}") from exc
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already once renamed
        elapsed = time.monotonic() - started
        logger.info("download ends: %s, %d bytes in %.2fs", source, size, elapsed)

    def prune_cache(self, keep: set[int]) -> list[int]:
        """Delete cached versions not in ``keep``, each under its lock; the store is untouched.

        Returns the versions removed. Local stores are never cached, so there is nothing to do
        (which also protects a cache_dir that happens to be the store itself).
        """
        if self.is_local or not self._cache.is_dir():
            return []
        removed = []
        for entry in sorted(self._cache.iterdir()):
            version = _version_of(entry.name)
            if version is None or version in keep:
                continue
            with file_lock(self._cache / f".{version}.lock"):
                if entry.is_dir():  # another replica may have pruned it meanwhile
                    trash = self._cache / f".{version}.pruned-{uuid.uuid4().hex[:12]}"
                    entry.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)
                    removed.append(version)
        if removed:
            logger.info("pruned cached versions %s of %s from %s", removed, self.uri, self._cache)
        return sorted(removed)


def _verify(local: Path, manifest: dict[str, dict[str, Any]], source: str) -> None:
    """Every remote file arrived whole: same size here as in the listing."""
    for rel, entry in manifest.items():
        path = local / rel
        got = path.stat().st_size if path.is_file() else None
        if got != entry["size"]:
            raise ModelLoadError(
                f"download of {source} is incomplete: {rel} has {got} bytes, "
                f"the store lists {entry['size']}"
            )


def _replace(partial: Path, target: Path) -> None:
    """Rename a verified copy into place; a stale copy is moved aside first, then deleted."""
    if not target.exists():
        partial.rename(target)
        return
    trash = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:12]}")
    target.rename(trash)
    partial.rename(target)
    shutil.rmtree(trash, ignore_errors=True)
