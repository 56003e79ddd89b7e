"""A faiss index that follows its Redis pointer and swaps new snapshots in without downtime.

A background thread polls the pointer key. When the pointer names a newer
version, the thread loads and verifies that snapshot (checksums, count,
dimension) off the query path and then swaps one reference to an immutable
:class:`LoadedIndex`. :meth:`ReloadableIndex.search` reads that reference once
and works on its own copy of it, so there is no lock on the query path: a query
never waits for a load and never sees half of a swap, and the old index stays
alive until the last query holding it returns.

A snapshot that fails verification is refused: the last good index keeps
serving, ``streamrec_index_swap_failures_total`` counts the refusal and the log
says why. A refused pointer is not retried until the pointer moves again.

The pointer is read from Redis, so it is not trusted further than it can be
checked: given ``snapshot_dir`` (serving always passes the snapshot store),
only snapshots directly inside it are opened (a pointer to ``/etc/passwd``, a
``..`` path or a symlink out of the store is refused), snapshots above
``max_snapshot_bytes`` are refused before they are read, and the manifest's
checksum (pinned by the pointer) and the index's (pinned by the manifest) are
compared before faiss or numpy parse a byte. A malformed pointer is refused and
counted the same way, once per pointer value.

Metrics (in the injected registry; one ``ReloadableIndex`` per registry):
``streamrec_index_version``, ``streamrec_index_age_seconds`` (now minus the
snapshot's build time, computed at scrape), ``streamrec_index_items``,
``streamrec_index_swaps_total``, ``streamrec_index_swap_failures_total`` and
``streamrec_index_swap_duration_seconds`` (pointer seen → new index serving).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.cluster import RedisCluster

from contracts.errors import StreamrecError
from services.common.clients import REDIS_ERRORS
from services.index.snapshot import (
    DEFAULT_MAX_SNAPSHOT_BYTES,
    Manifest,
    Pointer,
    SnapshotError,
    read_snapshot,
)

log = logging.getLogger(__name__)


class IndexNotReady(StreamrecError, RuntimeError):
    """No snapshot has been loaded yet (nothing published, or every one refused)."""


@dataclass(frozen=True, slots=True)
class LoadedIndex:
    """One loaded, verified snapshot: what a query reads, as one immutable reference.

    Besides nearest-neighbour search it answers :meth:`vectors`, the stored vectors
    of given items (serving pools a user's recent items into a query vector), so
    the vectors and the search come from the same snapshot.
    """

    index: faiss.Index
    item_ids: tuple[str, ...]
    manifest: Manifest
    #: item id -> row; derived from ``item_ids`` when loaded, off the query path.
    positions: Mapping[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.positions and self.item_ids:
            object.__setattr__(
                self, "positions", {item: row for row, item in enumerate(self.item_ids)}
            )
        if isinstance(self.index, faiss.IndexIVF) and self.index.direct_map.type == 0:
            # IVF lists are not addressable by id until a direct map is built.
            self.index.make_direct_map()

    def vectors(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of ``item_ids`` (``float32 (n, d)``) and a mask of the known ones.

        Unknown ids get zero rows. IVF-PQ indexes return their decoded (approximate)
        vectors.
        """
        if isinstance(item_ids, str):
            raise ValueError("item_ids must be a sequence of item ids, got a str")
        rows = np.fromiter(
            (self.positions.get(item, -1) for item in item_ids), dtype=np.int64, count=len(item_ids)
        )
        known = rows >= 0
        out = np.zeros((len(rows), self.manifest.dimension), dtype=np.float32)
        if known.any():
            out[known] = self.index.reconstruct_batch(rows[known])
        return out, known


class ReloadableIndex:
    """Nearest-item search over the snapshot the Redis pointer names, reloaded in the background.

    Args:
        redis_client: where the pointer lives.
        pointer_key: ``KeySpace().index_current(name)``.
        poll_interval: seconds between pointer reads.
        registry: Prometheus registry for the metrics; ``None`` gives a private one
            (see :attr:`registry`).
        threads: OpenMP threads faiss may use per query (set in each querying thread);
            1 suits many concurrent single-vector queries.
        dimension: the vector dimension callers query with; ``None`` takes it from the
            first snapshot loaded. Snapshots of another dimension are refused.
        snapshot_dir: the snapshot store's directory; pointers naming anything but a
            snapshot directly inside it are refused. ``None`` trusts the pointer's path:
            only for a Redis that nobody but the publisher can write.
        max_snapshot_bytes: larger snapshots (manifest + index file) are refused unread.
    """

    def __init__(
        self,
        redis_client: redis.Redis | RedisCluster,
        pointer_key: str,
        *,
        poll_interval: float = 0.5,
        registry: CollectorRegistry | None = None,
        threads: int = 1,
        dimension: int | None = None,
        snapshot_dir: Path | str | None = None,
        max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
    ) -> None:
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(f"poll_interval must be a positive number, got {poll_interval!r}")
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        if dimension is not None and (int(dimension) != dimension or dimension < 1):
            raise ValueError(f"dimension must be a positive integer, got {dimension!r}")
        if int(max_snapshot_bytes) != max_snapshot_bytes or max_snapshot_bytes < 1:
            raise ValueError(f"max_snapshot_bytes must be positive, got {max_snapshot_bytes!r}")
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.max_snapshot_bytes = int(max_snapshot_bytes)
        self._redis = redis_client
        self.pointer_key = pointer_key
        self.poll_interval = float(poll_interval)
        self.threads = int(threads)
        self._dimension = dimension
        self.registry = registry if registry is not None else CollectorRegistry()
        self._current: LoadedIndex | None = None
        # Serialises loaders (the poller and explicit refresh() calls); search never takes it.
        self._load_lock = threading.Lock()
        # Wakes wait_for_version(); also never taken by search.
        self._swapped = threading.Condition()
        # The raw value of the last pointer refused, so it is refused (and counted) once.
        self._refused: bytes | str | None = None
        self._thread_config = threading.local()
        self._stop = threading.Event()
        self._define_metrics()
        self._thread = threading.Thread(
            target=self._poll, name=f"reloadable-index:{pointer_key}", daemon=True
        )
        self._thread.start()

    @property
    def current(self) -> LoadedIndex:
        """The snapshot now serving; raises :class:`IndexNotReady` before the first one."""
        current = self._current
        if current is None:
            raise IndexNotReady(f"no index snapshot loaded yet from {self.pointer_key!r}")
        return current

    @property
    def version(self) -> int | None:
        """Version of the snapshot now serving, ``None`` before the first one."""
        current = self._current
        return None if current is None else current.manifest.version

    def search(
        self, vectors: np.ndarray, k: int, *, snapshot: LoadedIndex | None = None
    ) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` nearest items to each query vector.

        ``vectors`` is ``(m, d)`` or a single ``(d,)`` query (answered as ``m = 1``).
        Returns ``m`` lists of item ids, best first, and scores ``float32 (m, k')``
        with ``k' = min(k, items)``: inner products for ``ip`` (higher is better),
        squared distances for ``l2`` (lower is better). Where an approximate index
        finds fewer than ``k'`` items a row's id list is shorter and the missing
        scores are NaN. ``snapshot`` searches that :attr:`current` snapshot instead
        of the newest one.
        """
        # The one read of the shared reference, unless the caller holds a snapshot
        # (from :attr:`current`) it also read item vectors from.
        current = snapshot if snapshot is not None else self.current
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        dimension = current.manifest.dimension
        if queries.ndim != 2 or queries.shape[1] != dimension:
            raise ValueError(
                f"query vectors must have shape (m, {dimension}) or ({dimension},),"
                f" got {np.shape(vectors)}"
            )
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        width = min(int(k), current.manifest.count)
        if width == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))], np.zeros((len(queries), 0), np.float32)
        self._configure_thread()
        scores, rows = current.index.search(np.ascontiguousarray(queries), width)
        ids = current.item_ids
        found = [[ids[row] for row in hits if row >= 0] for hits in rows]
        return found, np.where(rows >= 0, scores, np.float32(np.nan))

    def refresh(self) -> bool:
        """Read the pointer once and swap in a newer snapshot; True if one was swapped in.

        The poller calls this every ``poll_interval``; callers may too (at startup,
        to serve as soon as possible). Redis errors are logged and leave the
        current index serving.
        """
        with self._load_lock:
            try:
                raw = self._redis.get(self.pointer_key)
            except REDIS_ERRORS as exc:
                log.warning("cannot read index pointer %s: %s", self.pointer_key, exc)
                return False
            if raw is None or raw == self._refused:
                return False
            try:
                pointer = Pointer.from_json(raw)
            except SnapshotError as exc:
                self._refuse(raw, exc.reason, "malformed pointer")
                return False
            current = self._current
            if current is not None and pointer.version <= current.manifest.version:
                return False
            started = time.perf_counter()
            try:
                loaded = self._load(pointer)
            except Exception as exc:
                reason = exc.reason if isinstance(exc, SnapshotError) else repr(exc)
                self._refuse(raw, reason, f"index snapshot v{pointer.version} ({pointer.path})")
                return False
            self._current = loaded  # the swap: one reference assignment
            self._swap_seconds.observe(time.perf_counter() - started)
            self._swaps.inc()
            self._version_gauge.set(loaded.manifest.version)
            self._items_gauge.set(loaded.manifest.count)
        with self._swapped:
            self._swapped.notify_all()
        log.info(
            "index v%d serving (%s, %d items)",
            loaded.manifest.version,
            loaded.manifest.kind,
            loaded.manifest.count,
        )
        return True

    def _refuse(self, raw: bytes | str, reason: str, what: str) -> None:
        self._refused = raw
        self._swap_failures.inc()
        log.error("refused %s: %s; still serving v%s", what, reason, self.version)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until a snapshot at or above ``version`` serves; False on timeout."""
        with self._swapped:
            return self._swapped.wait_for(lambda: (self.version or 0) >= version, timeout=timeout)

    def close(self) -> None:
        """Stop the poller. Searches keep answering from the last snapshot."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> ReloadableIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - logged; the background loop must outlive any one failure
                log.exception("index poller for %s failed; retrying", self.pointer_key)
            self._stop.wait(self.poll_interval)

    def _load(self, pointer: Pointer) -> LoadedIndex:
        index, item_ids, manifest = read_snapshot(
            Path(pointer.path),
            expected_sha256=pointer.sha256,
            root=self.snapshot_dir,
            max_bytes=self.max_snapshot_bytes,
        )
        if manifest.version != pointer.version:
            raise SnapshotError(
                f"pointer names v{pointer.version} but the manifest is v{manifest.version}"
            )
        current = self._current
        expected = self._dimension or (current.manifest.dimension if current else None)
        if expected is not None and manifest.dimension != expected:
            raise SnapshotError(f"dimension {manifest.dimension}, expected {expected}")
        return LoadedIndex(index=index, item_ids=tuple(item_ids), manifest=manifest)

    def _configure_thread(self) -> None:
        # OpenMP thread counts are per calling thread, so each query thread sets its own.
        if getattr(self._thread_config, "threads", None) != self.threads:
            faiss.omp_set_num_threads(self.threads)
            self._thread_config.threads = self.threads

    def _define_metrics(self) -> None:
        registry = self.registry
        self._version_gauge = Gauge(
            "streamrec_index_version", "Version of the index snapshot serving.", registry=registry
        )
        self._items_gauge = Gauge(
            "streamrec_index_items", "Items in the index snapshot serving.", registry=registry
        )
        age = Gauge(
            "streamrec_index_age_seconds",
            "Seconds since the serving snapshot was built (NaN before the first).",
            registry=registry,
        )
        age.set_function(self._age_seconds)
        self._swaps = Counter(
            "streamrec_index_swaps_total", "Index snapshots swapped in.", registry=registry
        )
        self._swap_failures = Counter(
            "streamrec_index_swap_failures_total",
            "Index pointers and snapshots refused (malformed pointer, outside the store, "
            "too large, unreadable, checksum mismatch, wrong dimension).",
            registry=registry,
        )
        self._swap_seconds = Histogram(
            "streamrec_index_swap_duration_seconds",
            "Time from reading a new pointer to its snapshot serving (load, verify, swap).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )

    def _age_seconds(self) -> float:
        current = self._current
        return math.nan if current is None else time.time() - current.manifest.build_time
