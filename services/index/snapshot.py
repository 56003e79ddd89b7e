"""Index snapshots on disk and the Redis pointer that publishes them.

A snapshot is two files in the store's directory:

- ``{version:012d}.faiss``: the index, as ``faiss.serialize_index`` bytes;
- ``{version:012d}.manifest.json``: version, dimension, metric, kind, the
  resolved :class:`~services.index.builder.IndexSpec`, build time, count, the
  item-id map (position → item id) and the sha256 of the index bytes and of the
  id map.

Each file is written to a temporary name, fsynced and renamed into place (then
the directory is fsynced), index first and manifest last. A snapshot exists
once its manifest does, so a reader never sees half of one; a write that fails
(a full disk: ENOSPC) removes what it wrote of the snapshot before raising, so
nothing of it is left taking room. :meth:`SnapshotStore.read`
verifies both checksums, the count and the dimension, and raises
:class:`SnapshotError` with the reason on any mismatch.

Publishing: :func:`publish` sets the pointer key
(``KeySpace().index_current(name)``) to ``{"version", "path", "sha256"}``, where
``path`` is the manifest's absolute path and ``sha256`` the manifest file's own
hash: the pointer pins the manifest, the manifest pins the index and id map.
Readers on other machines need the directory on a shared volume at the same path.

Reading is confined and bounded, because the pointer lives in Redis and is
only as trustworthy as everyone who can write there: given the store's
directory (``root``), :func:`read_snapshot` opens only regular files directly
inside it, after resolving every symlink (so neither ``..`` nor a symlink leads
out) and without following one at the last step; it refuses a snapshot whose
manifest and index together exceed ``max_bytes`` before reading it, and it
compares checksums before any byte is parsed (the manifest's against the
pointer's, the index's against the manifest's), so faiss and numpy only ever
see the bytes the embeddings service wrote.

Versions come from the caller (the embeddings service counts its builds;
:meth:`SnapshotStore.latest_version` tells it where to resume after a restart).
Both ends enforce monotonic versions: the store refuses a version that is not
above its newest snapshot, and :func:`publish` moves the pointer in a Lua script
that refuses to move it backwards, so a stale writer cannot roll readers back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np
import redis
from redis.cluster import RedisCluster

from contracts.errors import StreamrecError
from services.index.builder import (
    IndexSpec,
    apply_search_params,
    index_kind,
    index_metric,
    resolve_spec,
)

log = logging.getLogger(__name__)

#: Manifest format version; readers refuse others.
FORMAT = 1
#: Largest snapshot (manifest + index bytes) read by default: a 1M-item flat
#: index of dimension 32 is 128 MiB, so this leaves room and still bounds memory.
DEFAULT_MAX_SNAPSHOT_BYTES = 1 << 30
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST = re.compile(r"^(\d{12})\.manifest\.json$")

# Moves the pointer only forwards. Re-publishing the same pointer is a no-op success
# (a retry after a lost reply); the same version with other content is refused.
_PUBLISH_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(cjson.decode(current)['version'])
  local new = tonumber(ARGV[1])
  if version > new or (version == new and current ~= ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class SnapshotError(StreamrecError):
    """A snapshot that cannot be used: unreadable, inconsistent or failing a checksum."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Manifest:
    """The description of one snapshot, as stored in its manifest file."""

    version: int
    dimension: int
    metric: str
    kind: str
    count: int
    #: Unix seconds at which the index was built (written, for the age gauge).
    build_time: float
    index_file: str
    index_sha256: str
    ids_sha256: str
    spec: dict[str, Any]
    item_ids: tuple[str, ...] = field(repr=False)
    #: Where the manifest file lies; not part of its content.
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": self.version,
            "dimension": self.dimension,
            "metric": self.metric,
            "kind": self.kind,
            "count": self.count,
            "build_time": self.build_time,
            "index_file": self.index_file,
            "index_sha256": self.index_sha256,
            "ids_sha256": self.ids_sha256,
            "spec": self.spec,
            "item_ids": list(self.item_ids),
        }
        return msgspec.json.encode(body)

    @classmethod
    def from_json(cls, raw: bytes, path: Path | None = None) -> Manifest:
        """Parse a manifest; raises :class:`SnapshotError` if it is malformed."""
        try:
            body = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise SnapshotError(f"manifest {path} is not JSON: {exc!r}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise SnapshotError(f"manifest {path} has an unknown format")
        try:
            body.pop("format")
            item_ids = body.pop("item_ids")
            if not all(isinstance(item, str) for item in item_ids):
                raise TypeError("item ids must be strings")
            for name in ("version", "dimension", "count"):
                if not isinstance(body[name], int):
                    raise TypeError(f"{name} must be an integer")
            return cls(**body, item_ids=tuple(item_ids), path=path)
        except (TypeError, KeyError) as exc:
            raise SnapshotError(f"manifest {path} is malformed: {exc}") from None


@dataclass(frozen=True, slots=True)
class Pointer:
    """What the Redis pointer key holds: which manifest is current, and its hash."""

    version: int
    path: str
    sha256: str

    def to_json(self) -> bytes:
        return msgspec.json.encode(
            {"version": self.version, "path": self.path, "sha256": self.sha256}
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Pointer:
        try:
            body = msgspec.json.decode(raw)
            pointer = cls(
                version=int(body["version"]), path=str(body["path"]), sha256=str(body["sha256"])
            )
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise SnapshotError(f"index pointer is malformed: {exc!r}") from None
        if pointer.version < 1 or not _SHA256.match(pointer.sha256):
            raise SnapshotError("index pointer is malformed: needs a version >= 1 and a sha256")
        return pointer


class SnapshotStore:
    """Versioned index snapshots in one directory, written atomically and pruned.

    Args:
        directory: where snapshots live (created if missing).
        keep: how many of the newest snapshots :meth:`write` keeps.
    """

    def __init__(self, directory: Path, *, keep: int = 3) -> None:
        if int(keep) != keep or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = int(keep)

    def versions(self) -> list[int]:
        """Versions of the complete snapshots on disk, oldest first."""
        found = (_MANIFEST.match(entry.name) for entry in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def latest_version(self) -> int | None:
        """The newest complete snapshot's version, or ``None`` for an empty store."""
        versions = self.versions()
        return versions[-1] if versions else None

    def manifest_path(self, version: int) -> Path:
        return self.directory / f"{version:012d}.manifest.json"

    def write(
        self,
        index: faiss.Index,
        item_ids: Sequence[str],
        spec: IndexSpec,
        version: int,
        *,
        pinned: Collection[int] = (),
    ) -> Manifest:
        """Write ``index`` and its id map as snapshot ``version``, then prune.

        ``index`` row ``i`` must be ``item_ids[i]``. ``version`` must be above every
        snapshot in the store. Pruning keeps the newest ``keep`` snapshots plus the
        ``pinned`` versions: pass the version the pointer currently names, so a
        reader loading it never finds it gone.
        """
        if int(version) != version or version < 1:
            raise ValueError(f"version must be a positive integer, got {version!r}")
        if isinstance(item_ids, str):
            raise ValueError("item_ids must be a sequence of item ids, got a str")
        if len(item_ids) != index.ntotal:
            raise ValueError(f"{len(item_ids)} item ids for an index of {index.ntotal} vectors")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids contain duplicates")
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise ValueError(f"version {version} is not above the newest snapshot {latest}")
        resolved = _resolved_spec(spec, index)
        payload = faiss.serialize_index(index).tobytes()
        index_file = f"{version:012d}.faiss"
        _write_atomically(self.directory / index_file, payload)
        manifest = Manifest(
            version=int(version),
            dimension=int(index.d),
            metric=resolved.metric,
            kind=resolved.kind,
            count=int(index.ntotal),
            build_time=time.time(),
            index_file=index_file,
            index_sha256=hashlib.sha256(payload).hexdigest(),
            ids_sha256=ids_sha256(item_ids),
            spec=resolved.to_dict(),
            item_ids=tuple(item_ids),
            path=self.manifest_path(version),
        )
        try:
            _write_atomically(self.manifest_path(version), manifest.to_json())
        except BaseException:
            # No manifest, no snapshot: the index file alone would only take room on a
            # disk that is likely full (ENOSPC), and a retry would need that room too.
            # (If the manifest did land, only its directory fsync failed: keep both.)
            if not self.manifest_path(version).exists():
                (self.directory / index_file).unlink(missing_ok=True)
            raise
        self.prune(pinned=pinned)
        return manifest

    def read(
        self, snapshot: int | Path, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
    ) -> tuple[faiss.Index, list[str], Manifest]:
        """Load and verify a snapshot of this store by version or manifest path.

        The path must lie directly in the store (see :func:`read_snapshot`).
        """
        path = self.manifest_path(snapshot) if isinstance(snapshot, int) else Path(snapshot)
        return read_snapshot(path, root=self.directory, max_bytes=max_bytes)

    def prune(self, *, pinned: Collection[int] = ()) -> list[int]:
        """Delete all but the newest ``keep`` snapshots and ``pinned``; returns those deleted.

        Also removes leftovers of interrupted writes older than the newest snapshot:
        temporary files and index files without a manifest.
        """
        versions = self.versions()
        doomed = [v for v in versions[: -self.keep] if v not in set(pinned)]
        for version in doomed:
            # Manifest first: the snapshot stops existing before its index goes.
            self.manifest_path(version).unlink(missing_ok=True)
            (self.directory / f"{version:012d}.faiss").unlink(missing_ok=True)
        if versions:
            live = {f"{v:012d}.faiss" for v in self.versions()}
            newest = versions[-1]
            for entry in self.directory.iterdir():
                stale_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
                orphan = entry.name.endswith(".faiss") and entry.name not in live
                if (stale_tmp or orphan) and _leading_version(entry.name) < newest:
                    entry.unlink(missing_ok=True)
        if doomed:
            log.info("pruned index snapshots %s from %s", doomed, self.directory)
        return doomed


def read_snapshot(
    manifest_path: Path,
    *,
    expected_sha256: str | None = None,
    root: Path | None = None,
    max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
) -> tuple[faiss.Index, list[str], Manifest]:
    """Load a snapshot and verify it; raises :class:`SnapshotError` with the reason.

    ``expected_sha256`` (from a :class:`Pointer`) must match the manifest file's hash.
    ``root``, the snapshot store's directory, confines the manifest and its index
    file: both must resolve, symlinks followed, to regular files directly inside
    it. A snapshot whose manifest and index together exceed ``max_bytes`` is
    refused before its index is read. Every checksum is compared before the bytes
    it covers are parsed.
    """
    manifest_path = Path(manifest_path)
    if root is not None:
        manifest_path = _inside(root, manifest_path, "manifest")
        if not _MANIFEST.match(manifest_path.name):
            raise SnapshotError(f"{manifest_path} is not a snapshot manifest")
    raw = _read_bounded(manifest_path, max_bytes, "manifest", confined=root is not None)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise SnapshotError(f"manifest checksum mismatch: {manifest_path}")
    manifest = Manifest.from_json(raw, path=manifest_path)
    if ids_sha256(manifest.item_ids) != manifest.ids_sha256:
        raise SnapshotError(f"id map checksum mismatch in snapshot v{manifest.version}")
    if len(manifest.item_ids) != manifest.count:
        raise SnapshotError(
            f"snapshot v{manifest.version} lists {len(manifest.item_ids)} ids"
            f" for a count of {manifest.count}"
        )
    if Path(manifest.index_file).name != manifest.index_file:
        raise SnapshotError(f"snapshot v{manifest.version}: index file must be a bare file name")
    index_path = manifest_path.parent / manifest.index_file
    if root is not None:
        index_path = _inside(root, index_path, "index file")
    payload = _read_bounded(
        index_path, max_bytes - len(raw), "index file", confined=root is not None
    )
    if hashlib.sha256(payload).hexdigest() != manifest.index_sha256:
        raise SnapshotError(f"index checksum mismatch in snapshot v{manifest.version}")
    try:
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    except RuntimeError as exc:
        raise SnapshotError(f"index of snapshot v{manifest.version} does not load: {exc}") from None
    if index.d != manifest.dimension or index.ntotal != manifest.count:
        raise SnapshotError(
            f"snapshot v{manifest.version}: index is {index.ntotal}x{index.d},"
            f" manifest says {manifest.count}x{manifest.dimension}"
        )
    try:
        kind, metric = index_kind(index), index_metric(index)
    except ValueError as exc:
        raise SnapshotError(f"snapshot v{manifest.version}: {exc}") from None
    if (kind, metric) != (manifest.kind, manifest.metric):
        raise SnapshotError(
            f"snapshot v{manifest.version}: index is {kind}/{metric},"
            f" manifest says {manifest.kind}/{manifest.metric}"
        )
    apply_search_params(index, IndexSpec.from_dict(manifest.spec))
    return index, list(manifest.item_ids), manifest


def publish(
    redis_client: redis.Redis | RedisCluster, pointer_key: str, manifest: Manifest
) -> Pointer:
    """Point ``pointer_key`` at ``manifest``'s snapshot, which must already be on disk.

    Hashes the manifest file as it lies on disk (so the pointer names durable
    bytes) and sets the pointer only if it moves forwards; raises
    :class:`SnapshotError` if the pointer already names a newer version.
    """
    if manifest.path is None:
        raise ValueError(
            "manifest has no path: publish the Manifest that SnapshotStore.write returned"
        )
    try:
        raw = manifest.path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"manifest unreadable: {exc}") from None
    pointer = Pointer(
        version=manifest.version,
        path=str(manifest.path.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
    )
    moved = redis_client.eval(_PUBLISH_LUA, 1, pointer_key, pointer.version, pointer.to_json())
    if not moved:
        raise SnapshotError(
            f"pointer {pointer_key} already names a version at or above {manifest.version}"
        )
    return pointer


def read_pointer(redis_client: redis.Redis | RedisCluster, pointer_key: str) -> Pointer | None:
    """The current pointer, or ``None`` if nothing has been published yet."""
    raw = redis_client.get(pointer_key)
    return None if raw is None else Pointer.from_json(raw)


def ids_sha256(item_ids: Sequence[str]) -> str:
    """sha256 of the id map in its canonical form: a compact UTF-8 JSON array."""
    return hashlib.sha256(msgspec.json.encode(list(item_ids))).hexdigest()


def _resolved_spec(spec: IndexSpec, index: faiss.Index) -> IndexSpec:
    """``spec`` as ``index`` was actually built (after fallbacks and derived parameters)."""
    resolved = resolve_spec(spec, n=index.ntotal, d=index.d)
    kind, metric = index_kind(index), index_metric(index)
    if (kind, metric) != (resolved.kind, resolved.metric):
        raise ValueError(
            f"index is {kind}/{metric} but the spec resolves to {resolved.kind}/{resolved.metric}"
        )
    if isinstance(index, faiss.IndexIVFPQ):
        resolved = dataclasses.replace(
            resolved, ivf_nlist=index.nlist, pq_m=index.pq.M, nprobe=index.nprobe
        )
    return resolved


def _write_atomically(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` with every symlink and ``..`` resolved, if that is directly inside ``root``."""
    try:
        base = Path(root).resolve(strict=True)
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise SnapshotError(f"{what} unreadable: {exc}") from None
    if resolved.parent != base:
        raise SnapshotError(f"{what} {path} is outside the snapshot store {base}")
    return resolved


def _read_bounded(path: Path, limit: int, what: str, *, confined: bool) -> bytes:
    """The bytes of regular file ``path`` if it holds at most ``limit``.

    Checked on the open descriptor, so what is read is what was checked: a FIFO or
    device is refused without blocking on it, and a file that grows past the limit
    while being read is refused too. ``confined`` paths were resolved by
    :func:`_inside`; opening them with ``O_NOFOLLOW`` means a symlink swapped in
    since is refused, not followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if confined else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SnapshotError(f"{what} unreadable: {exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{what} {path} is not a regular file")
        if info.st_size > limit:
            raise SnapshotError(
                f"{what} {path} is {info.st_size} bytes; snapshots are limited to"
                f" {limit} more bytes (max_snapshot_bytes)"
            )
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise SnapshotError(f"{what} {path} grew past the snapshot size limit while read")
    return data


def _leading_version(name: str) -> int:
    match = re.match(r"^\.?(\d{12})\.", name)
    return int(match.group(1)) if match else -1
